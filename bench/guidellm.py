"""guidellm (the vLLM project's load generator, 0.8.1, in its own venv) against `ecoserve up`, in
its chat-completions mode and its text-completions mode: does every request complete, and what
does guidellm measure? (`make bench-guidellm`; issue 17.)

Steps: the venv (~/.cache/ecoserve/guidellm: torch 2.13.0 CPU first, so guidellm's
dependencies never pull a CUDA torch, then guidellm and litellm, pinned) is built on first use.
`ecoserve up` starts as a process (the default stack: predictor, scheduler, `--workers` workers
on SmolLM2-135M-Instruct), with a fresh API key in ECOSERVE_API_KEY and a fresh --home (SQLite,
keys), and is used once it prints `ready`. One chat request warms it up. Then, per mode,
`guidellm run` with the openai_http backend (`request_format` /v1/chat/completions or
/v1/completions, streaming: guidellm's default), the key in GUIDELLM__SPEC__BACKEND__API_KEY
(guidellm's environment for the backend's api_key: never on a command line), a fixed workload
(synthetic prompts of --prompt-tokens, --output-tokens each with EOS ignored, --requests
requests at a constant --rate, or --profile synchronous) and the served model's own tokenizer
from its local checkout (HF_HUB_OFFLINE=1: nothing is downloaded). The stack is stopped
(SIGINT: the launcher stops its processes) and OUT gets guidellm's raw reports (`<mode>.json`,
`<mode>.csv`, its console output `<mode>.log`), the stack's log (`stack.log`) and
`summary.json`: per mode the requests completed / errored / incomplete, the success %, request
and output-token throughput, median TTFT / ITL / TPOT / latency as guidellm reports them, and
the first error it recorded; plus the machine, the model, the commands and guidellm's version.
Exit code 1 unless every mode completed 100% of its requests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from ecoserve_common.models import DEFAULT_MODEL, resolve, served_name
from ecoserve_worker.cpuinfo import cpu_model

GUIDELLM = "0.8.1"
LITELLM = "1.110.2"  # for tests/fixtures/openai_shapes/record.py, which uses the same venv
INSTALL = (
    "{py} -m venv {venv} && {venv}/bin/pip install -q -U pip && "
    "{venv}/bin/pip install -q torch==2.13.0 && "
    f"{{venv}}/bin/pip install -q guidellm=={GUIDELLM} litellm=={LITELLM}"
)
MODES = {"chat": "/v1/chat/completions", "text": "/v1/completions"}
KEY_ENV = "GUIDELLM__SPEC__BACKEND__API_KEY"
SHAPES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "openai_shapes"
READY_TIMEOUT_S = 600.0  # includes a first-time model fetch and conversion
STOP_TIMEOUT_S = 60.0


def guidellm_venv(venv: Path) -> Path:
    """The venv's guidellm executable; the venv is built first when absent (~2 min)."""
    exe = venv / "bin" / "guidellm"
    if not exe.exists():
        print(f"installing guidellm {GUIDELLM} into {venv} (about 2 min)", file=sys.stderr)
        cmd = INSTALL.format(py=sys.executable, venv=venv)
        subprocess.run(cmd, shell=True, check=True)
    return exe


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_up(a, home: Path, key: str, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    """`ecoserve up` as a process group, (process, base URL, seconds to ready) once it printed
    `ready`; every line it prints (stdout and stderr) goes to `log_path`."""
    http = free_port()
    cmd = [sys.executable, "-m", "ecoserve_stack.cli", "up", "--model", a.model]
    cmd += ["--workers", str(a.workers), "--home", str(home)]
    cmd += ["--http-port", str(http), "--grpc-port", str(free_port())]
    cmd += ["--token-budget", str(a.token_budget)] if a.token_budget else []
    cmd += ["--dtype", a.dtype] if a.dtype else []
    env = dict(os.environ, ECOSERVE_API_KEY=key, HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    ready = threading.Event()
    log = log_path.open("w")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith("ready"):
                ready.set()
        log.close()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ecoserve up was not ready (exit {proc.returncode}):\n{tail}")
    return proc, f"http://127.0.0.1:{http}", time.monotonic() - t0


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (the launcher stops its workers, scheduler and predictor), then SIGKILL of the
    whole group if it has not exited within STOP_TIMEOUT_S."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def warm_up(base: str, key: str, served: str) -> None:
    body = {
        "model": served,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
    }
    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=300)
    r.raise_for_status()


def probe(base: str, key: str, served: str, mode: str) -> dict:
    """After a mode had errors: the server's own answer to the body guidellm sends in that mode
    (the recorded one, tests/fixtures/openai_shapes/; guidellm keeps only the status line)."""
    shape = json.loads((SHAPES / f"guidellm_{mode}_stream.json").read_text())
    body = {**shape["body"], "model": served}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        r = httpx.post(base + shape["path"], json=body, headers=headers, timeout=300)
    except httpx.HTTPError as e:
        return {"fixture": f"guidellm_{mode}_stream.json", "error": repr(e)}
    return {
        "fixture": f"guidellm_{mode}_stream.json",
        "status": r.status_code,
        "response": r.text[:800] if r.status_code != 200 else r.text[-300:],
    }


def guidellm_args(a, base: str, served: str, tokenizer: Path, mode: str, out: Path) -> list[str]:
    backend = f"kind=openai_http,target={base},model={served},request_format={MODES[mode]}"
    backend += f",timeout={a.request_timeout_s:g}"
    if a.profile == "synchronous":
        profile = "kind=synchronous"
    else:
        profile = f"kind={a.profile},rate={a.rate:g}"
    data = f"kind=synthetic_text,prompt_tokens={a.prompt_tokens},output_tokens={a.output_tokens}"
    return [
        *("run", "--backend", backend, "--profile", profile),
        *("--constraint", f"kind=max_requests,count={a.requests}"),
        *("--data", data, "--tokenizer", f"kind=huggingface_auto,model={tokenizer}"),
        *("--seed", f"kind=static,value={a.seed}"),
        *("--output", f"kind=json,path={out / f'{mode}.json'}"),
        *("--output", f"kind=csv,path={out / f'{mode}.csv'}"),
        "--disable-progress",
    ]


def run_mode(exe: Path, args: list[str], key: str, log_path: Path, timeout_s: float) -> dict:
    # No inherited GUIDELLM_* setting may change the run (guidellm reads its whole config there)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUIDELLM_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    env[KEY_ENV] = key
    env["COLUMNS"] = "200"  # guidellm's console tables, unwrapped in the log
    t0 = time.monotonic()
    with log_path.open("w") as log:
        try:
            rc = subprocess.run(
                [str(exe), *args], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = log_path.read_text(errors="replace").splitlines()  # its tables pad to COLUMNS
    log_path.write_text("".join(line.rstrip() + "\n" for line in lines))
    return {"exit_code": rc, "wall_s": round(time.monotonic() - t0, 1)}


def _stat(metrics: dict, name: str, field: str = "median", group: str = "successful") -> Any:
    try:
        value = metrics[name][group][field]
    except (KeyError, TypeError):
        return None
    return round(value, 3) if isinstance(value, float) else value


def summarize_report(path: Path) -> dict:
    """What summary.json keeps of one guidellm JSON report (its first benchmark)."""
    if not path.exists():
        return {"report": None}
    bench = json.loads(path.read_text())["benchmarks"][0]
    m = bench["metrics"]
    totals = m["request_totals"]
    done, total = totals["successful"], totals["total"]
    errors = [(r.get("info") or {}).get("error") for r in bench["requests"].get("errored") or []]
    return {
        "report": path.name,
        "requests": {
            "completed": done,
            "errored": totals["errored"],
            "incomplete": totals["incomplete"],
            "total": total,
        },
        "success_pct": round(100.0 * done / total, 1) if total else 0.0,
        "duration_s": round(bench["duration"], 2),
        "requests_per_s": _stat(m, "requests_per_second", "mean"),
        "output_tokens_per_s": _stat(m, "output_tokens_per_second", "mean", "total"),
        "output_tokens_median": _stat(m, "output_token_count"),
        "prompt_tokens_median": _stat(m, "prompt_token_count"),
        "ttft_ms_median": _stat(m, "time_to_first_token_ms"),
        "itl_ms_median": _stat(m, "inter_token_latency_ms"),
        "tpot_ms_median": _stat(m, "time_per_output_token_ms"),
        "request_latency_s_median": _stat(m, "request_latency"),
        "concurrency_mean": _stat(m, "request_concurrency", "mean"),
        "first_error": next((e for e in errors if e), None),
        "warnings": [w.get("message") for w in bench.get("warnings") or []],
    }


def scrub(out: Path, key: str) -> None:
    """The API key must not reach any file written here (guidellm masks it; be sure)."""
    for f in out.iterdir():
        if f.is_file():
            text = f.read_text(errors="replace")
            if key in text:
                f.write_text(text.replace(key, "<redacted>"))


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/guidellm")
    p.add_argument("--venv", default="~/.cache/ecoserve/guidellm")
    p.add_argument("--modes", default="chat,text", help="chat, text or both")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--workers", type=int, default=2, help="`ecoserve up`'s default")
    p.add_argument("--dtype", default=None)
    p.add_argument("--token-budget", type=int, default=0, help="0: each worker profiles")
    p.add_argument("--profile", default="constant", choices=("constant", "poisson", "synchronous"))
    p.add_argument("--rate", type=float, default=1.0, help="req/s (constant / poisson)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--mode-timeout-s", type=float, default=900.0)
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s): {sorted(unknown)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = guidellm_venv(Path(a.venv).expanduser())
    served = served_name(a.model)
    key = secrets.token_urlsafe(24)
    home = Path(tempfile.mkdtemp(prefix="ecoserve-guidellm-"))
    summary: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "guidellm_version": GUIDELLM,
        "model": {"spec": a.model, "served": served},
        "stack": {
            "command": f"ecoserve up --model {a.model} --workers {a.workers}"
            + (f" --token-budget {a.token_budget}" if a.token_budget else "")
            + (f" --dtype {a.dtype}" if a.dtype else "")
            + " (ECOSERVE_API_KEY set)",
        },
        "workload": {
            "profile": a.profile,
            "rate_per_s": None if a.profile == "synchronous" else a.rate,
            "requests": a.requests,
            "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens,
            "ignore_eos": True,  # guidellm always sends it
            "streaming": True,
        },
        "modes": {},
    }
    try:
        proc, base, ready_s = start_up(a, home, key, out / "stack.log")
    except RuntimeError as e:
        summary["stack"]["error"] = str(e)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        scrub(out, key)
        print(e, file=sys.stderr)
        return 1
    summary["stack"]["ready_s"] = round(ready_s, 1)
    try:
        tokenizer = resolve(a.model)  # fetched and converted by `ecoserve up` if it was not
        summary["model"]["dir"] = str(tokenizer)
        warm_up(base, key, served)
        for mode in modes:
            args = guidellm_args(a, base, served, tokenizer, mode, out)
            print(f"guidellm {mode}: {a.requests} requests against {base}", file=sys.stderr)
            run = run_mode(exe, args, key, out / f"{mode}.log", a.mode_timeout_s)
            result = {
                "request_format": MODES[mode],
                "command": f"{KEY_ENV}=<key> guidellm " + " ".join(args),
                **run,
                **summarize_report(out / f"{mode}.json"),
            }
            if result.get("success_pct") != 100.0 or run["exit_code"]:
                result["server_answer_to_guidellm_body"] = probe(base, key, served, mode)
            summary["modes"][mode] = result
            print(json.dumps({mode: result.get("requests")}), file=sys.stderr)
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)
    summary["all_completed"] = all(
        r.get("success_pct") == 100.0 and r["exit_code"] == 0 for r in summary["modes"].values()
    ) and len(summary["modes"]) == len(modes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    scrub(out, key)
    for mode, r in summary["modes"].items():
        req = r.get("requests") or {}
        print(
            f"{mode:5s} completed {req.get('completed')}/{req.get('total')} "
            f"errored {req.get('errored')} incomplete {req.get('incomplete')}  "
            f"{r.get('requests_per_s')} req/s  {r.get('output_tokens_per_s')} out tok/s  "
            f"TTFT p50 {r.get('ttft_ms_median')} ms  ITL p50 {r.get('itl_ms_median')} ms"
            + (f"  first error: {r['first_error']}" if r.get("first_error") else "")
        )
    return 0 if summary["all_completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
