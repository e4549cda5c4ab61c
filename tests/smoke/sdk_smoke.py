"""Smoke test of the SDK alone (run in a venv holding only ecoserve-client and its deps):
no torch, a real gRPC round trip against a stand-in Scheduler service, validation at the edge."""

from __future__ import annotations

import importlib.util
from concurrent import futures

import grpc

from ecoserve_client import Client, InvalidSampling
from ecoserve_common.pb import scheduler_pb2 as pb
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc

assert importlib.util.find_spec("torch") is None, "the SDK's environment must not hold torch"


class Echo(pb_grpc.SchedulerServicer):
    def Complete(self, request, context):
        ids = list(request.prompt_token_ids)[: request.max_tokens]
        return pb.CompleteResponse(
            request_id=request.request_id or "req-1",
            token_ids=ids,
            text=request.prompt,
            finish_reason="length",
            prompt_tokens=len(request.prompt_token_ids),
        )


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
pb_grpc.add_SchedulerServicer_to_server(Echo(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
try:
    with Client(f"127.0.0.1:{port}") as c:
        out = c.complete(token_ids=[5, 6, 7], max_tokens=2, request_id="smoke-1")
        assert (out.request_id, out.token_ids, out.finish_reason) == ("smoke-1", [5, 6], "length")
        try:
            c.complete("hi", seed=-1)
        except InvalidSampling as exc:
            assert exc.field == "seed"
        else:
            raise AssertionError("a negative seed was sent")
finally:
    server.stop(0)
print("sdk smoke: ok")
