from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("prompts", "histories")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    HISTORIES_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    histories: _containers.RepeatedCompositeFieldContainer[History]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., histories: _Optional[_Iterable[_Union[History, _Mapping]]] = ...) -> None: ...

class History(_message.Message):
    __slots__ = ("answer_tokens",)
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    answer_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, answer_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("point_tokens", "upper_tokens", "bucket")
    POINT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UPPER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    point_tokens: float
    upper_tokens: float
    bucket: int
    def __init__(self, point_tokens: _Optional[float] = ..., upper_tokens: _Optional[float] = ..., bucket: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_id", "bucket_edges")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_EDGES_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_id: str
    bucket_edges: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_id: _Optional[str] = ..., bucket_edges: _Optional[_Iterable[int]] = ...) -> None: ...
