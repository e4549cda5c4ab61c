"""bench/peer_vllm.py's measuring helpers and bench/peer_report.py's report, without a vLLM.

The peer run itself needs vLLM's own venv and minutes of CPU (`make bench-peer`); these tests
pin what turns its raw observations into the numbers the report states.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def peer():
    return _load("peer_vllm")


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("matplotlib")
    return _load("peer_report")


def test_kv_usage_reads_both_servers_metrics(peer):
    ecoserve = (
        'ecoserve_kv_blocks{state="used",worker="w0"} 30.0\n'
        'ecoserve_kv_blocks{state="total",worker="w0"} 128.0\n'
        'ecoserve_kv_blocks{state="used",worker="w1"} 34.0\n'
        'ecoserve_kv_blocks{state="total",worker="w1"} 128.0\n'
    )
    assert peer.kv_usage(ecoserve) == pytest.approx(64 / 256)
    vllm = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.375\n'
    )
    assert peer.kv_usage(vllm) == pytest.approx(0.375)
    assert peer.kv_usage("other_metric 1.0\n") is None


def test_cpu_seconds_counts_children(peer):
    """vLLM's engine core is a child of the API server: its CPU must be counted. The parent
    here only starts Python and waits; its child burns 0.4 s of CPU and stays alive."""
    import subprocess
    import time

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    child = [sys.executable, "-c", burn + "time.sleep(60)"]
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess; subprocess.run({child!r})"]
    )
    try:
        deadline = time.monotonic() + 20
        while peer.cpu_seconds(parent.pid) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the burn to happen, not timing it
        assert peer.cpu_seconds(parent.pid) >= 0.4
    finally:
        for p in Path(f"/proc/{parent.pid}/task").glob("*/children"):
            for pid in p.read_text().split():
                os.kill(int(pid), 9)
        parent.kill()
        parent.wait()


def _rates(tok_s: list[float], slo: list[float]) -> dict:
    out = {}
    for rate, t, s in zip((2, 4, 8), tok_s, slo, strict=True):
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
        }
    return out


def test_report_states_ratios_and_draws_plots(report, tmp_path):
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
