"""The Python SDK (sync and asyncio) against the real scheduler API with a worker process, and
its retry rule against a server that answers UNAVAILABLE first."""

from __future__ import annotations

import asyncio
import os
from concurrent import futures

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")

from test_live_api import reference  # noqa: E402
from test_live_engine import start_worker, wait_for  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ecoserve_client import AsyncClient, Client, EcoServeError  # noqa: E402
from ecoserve_common.pb import scheduler_pb2 as pb  # noqa: E402
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.api import SchedulerService, build_server  # noqa: E402
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend  # noqa: E402

PROMPT = [11, 22, 33, 44, 55]


@pytest.fixture(scope="module")
def address(model_dir):
    engine = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token="k").start()
    proc = start_worker(engine.address, "w0", model_dir)
    wait_for(lambda: engine.worker_ids() == ["w0"])
    frontend = Frontend(
        engine,
        AutoTokenizer.from_pretrained(model_dir),
        None,
        ApiLimits(max_model_len=2048, vocab_size=512),
    )
    server, port = build_server(SchedulerService(frontend), "127.0.0.1:0", api_key="key")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()
    proc.kill()
    proc.wait()
    engine.stop()


def test_sync_complete_and_stream(address, model_dir):
    ref = reference(model_dir, PROMPT, 8)
    with Client(address, api_key="key") as c:
        done = c.complete(token_ids=PROMPT, max_tokens=8, ignore_eos=True)
        assert done.token_ids == ref and done.finish_reason == "length"
        chunks = list(c.generate(token_ids=PROMPT, max_tokens=8, ignore_eos=True))
        assert [t for ch in chunks for t in ch.token_ids] == ref
        assert chunks[-1].finish_reason == "length"
        assert c.stats()["pending"] == 0
        with pytest.raises(EcoServeError) as e:
            c.complete("", max_tokens=8)
        assert (
            e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty prompt" in e.value.message
        )
    with Client(address, api_key="wrong") as c, pytest.raises(EcoServeError) as e:
        c.complete(token_ids=PROMPT)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_async_complete_and_stream(address, model_dir):
    ref = reference(model_dir, PROMPT, 6)

    async def main():
        async with AsyncClient(address, api_key="key") as c:
            done, chunks = await asyncio.gather(
                c.complete(token_ids=PROMPT, max_tokens=6, ignore_eos=True),
                _collect(c.generate(token_ids=PROMPT, max_tokens=6, ignore_eos=True)),
            )
            return done, chunks

    done, chunks = asyncio.run(main())
    assert done.token_ids == ref and [t for ch in chunks for t in ch.token_ids] == ref


async def _collect(stream):
    return [c async for c in stream]


class Flaky(pb_grpc.SchedulerServicer):
    """Answers UNAVAILABLE `fail` times, then a fixed completion."""

    def __init__(self, fail: int) -> None:
        self.fail, self.calls = fail, 0

    def Complete(self, request, context):
        self.calls += 1
        if self.calls <= self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.CompleteResponse(request_id="r", token_ids=[1, 2], finish_reason="length")


@pytest.mark.parametrize(("fail", "ok"), [(2, True), (4, False)])
def test_unavailable_is_retried(fail, ok):
    servicer = Flaky(fail)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=3, backoff_s=0.001) as c:
            if ok:
                assert c.complete("x").token_ids == [1, 2]
            else:
                with pytest.raises(EcoServeError) as e:
                    c.complete("x")
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert servicer.calls == min(fail + 1, 4)
    finally:
        server.stop(0).wait()
