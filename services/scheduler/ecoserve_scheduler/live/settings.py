"""Typed settings of the scheduler service: every field is a flag and an environment variable.

A field `worker_bind` is `--worker-bind` and `ECOSERVE_WORKER_BIND`; a flag beats the
environment, which beats the default. Secrets are the exception: a field marked `SECRET` is
taken from its environment variable or from the file its `*_file` field names, and its flag
only says so and exits, because a command line is visible to every user (`ps`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ecoserve_common.models import DEFAULT_MODEL

from ..core import policy_from_spec
from .slo import DEFAULT_SLO_CLASS, DEFAULT_SLO_CLASSES, SloClasses

ENV_PREFIX = "ECOSERVE_"
SECRET = {"secret": True}  # field metadata: environment or file only, never a flag's value


@dataclass(frozen=True)
class SchedulerSettings:
    model: str = DEFAULT_MODEL  # registered name, .gguf or checkpoint dir (its tokenizer)
    models_dir: str = ""  # where names are converted; empty: ecoserve_common.models.models_dir()
    # ecoserve, vllm, vllm-v0, sarathi, orca, sjf; options after a colon, as the policy's keyword
    # arguments: "ecoserve:overcommit_share=1.0,slo_guard=false" (core/policies/__init__.py)
    policy: str = "ecoserve"
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:8000"  # OpenAI-compatible API; empty: off
    worker_bind: str = "tcp://127.0.0.1:5555"  # ZeroMQ ROUTER the workers connect to
    db_url: str = "sqlite:///ecoserve.db"  # or postgresql+psycopg://user@host/db
    predictor: str = ""  # predictor gRPC address; empty: default lengths
    predictor_timeout_s: float = 0.05
    default_response_tokens: int = 256  # used when the predictor is absent or fails
    worker_auth_token: str = field(default="", metadata=SECRET)  # shared secret in Register
    worker_auth_token_file: str = ""  # a file holding it (instead of ECOSERVE_WORKER_AUTH_TOKEN)
    worker_keys_dir: str = ""  # CURVE keys (ecoserve_common.curve): server pair + workers/ list
    worker_plane_insecure: bool = False  # no keys: a plain, unauthenticated worker plane
    api_key: str = field(default="", metadata=SECRET)  # clients' bearer token; empty: open
    api_key_file: str = ""  # a file holding it (instead of ECOSERVE_API_KEY)
    max_pending: int = 1024  # requests in the system before RESOURCE_EXHAUSTED
    worker_timeout_s: float = 2.0  # silence after which a worker is dropped (it beats at /4)
    engine_process: bool = True  # the engine core in its own process (False: a thread)
    queue_without_workers: bool = False  # False: no worker registered -> 503 at once
    store_prompts: bool = True  # keep prompt text in the request store; False: token counts only
    http_max_body_bytes: int = 4 << 20  # a larger HTTP body is a 413, refused unread
    http_header_timeout_s: float = 10.0  # an HTTP request head not complete by then: closed
    # Latency SLO classes (live/slo.py): JSON {name: {"ttft_ms", "tpot_ms", "deadline_ms"}}, and
    # the class of a request that asks for none ("": such a request carries no SLO).
    slo_classes: str = DEFAULT_SLO_CLASSES
    default_slo_class: str = DEFAULT_SLO_CLASS
    log_level: str = "INFO"

    @classmethod
    def parser(cls, prog: str = "ecoserve-scheduler serve") -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=prog, description="EcoServe scheduler service")
        for f in fields(cls):
            env = ENV_PREFIX + f.name.upper()
            flag = "--" + f.name.replace("_", "-")
            if f.metadata.get("secret"):
                p.add_argument(flag, action=_RefuseSecret, help=f"not a flag: set env {env}")
                continue
            p.add_argument(
                flag,
                type=_parse_bool if isinstance(f.default, bool) else type(f.default),
                default=None,
                help=f"env {env}; default {f.default!r}",
            )
        return p

    @classmethod
    def load(cls, argv: list[str] | None = None, environ=None) -> SchedulerSettings:
        environ = os.environ if environ is None else environ
        args = vars(cls.parser().parse_args(argv))
        values = {}
        for f in fields(cls):
            if args[f.name] is not None:
                values[f.name] = args[f.name]
            elif ENV_PREFIX + f.name.upper() in environ:
                raw = environ[ENV_PREFIX + f.name.upper()]
                values[f.name] = (
                    _parse_bool(raw) if isinstance(f.default, bool) else type(f.default)(raw)
                )
        settings = cls(**values)
        for secret in ("worker_auth_token", "api_key"):  # each SECRET field's *_file
            if getattr(settings, secret + "_file"):
                path = Path(getattr(settings, secret + "_file"))
                flag = "--" + secret.replace("_", "-") + "-file"
                try:
                    value = path.read_text().strip()
                except OSError as exc:
                    raise SystemExit(f"{flag}: cannot read {path}: {exc}") from None
                settings = settings.replace(**{secret: value})
        if not settings.model:
            raise SystemExit(
                "--model (or ECOSERVE_MODEL) is empty: give a registered name "
                f"(default {DEFAULT_MODEL}), a .gguf file or a model directory"
            )
        try:
            settings.slo_table()
        except ValueError as exc:
            raise SystemExit(f"--slo-classes / --default-slo-class: {exc}") from None
        try:
            policy_from_spec(settings.policy)  # the engine core builds it again, in its process
        except ValueError as exc:
            raise SystemExit(f"--policy: {exc}") from None
        return settings

    def replace(self, **changes) -> SchedulerSettings:
        return dataclasses.replace(self, **changes)

    def slo_table(self) -> SloClasses:
        """The SLO classes these settings configure; ValueError saying what is wrong."""
        return SloClasses.parse(self.slo_classes, self.default_slo_class)


class _RefuseSecret(argparse.Action):
    """A secret's flag: refused with where to put the secret instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = self.dest
        parser.error(
            f"{option_string}: secrets are not taken on the command line (any user sees it in "
            f"ps); set {ENV_PREFIX}{name.upper()} or --{name.replace('_', '-')}-file PATH"
        )


def _parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off (bool("false") would be True)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")
