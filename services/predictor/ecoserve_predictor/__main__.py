"""ecoserve-predictor: train, retrain on served requests, evaluate, or serve over gRPC.

ecoserve-predictor train --out DIR [--data-dir ../shared/data] [--kind encoder|bag]
ecoserve-predictor retrain --pairs served.jsonl --out DIR [--min-rows 1000]
    (served.jsonl: `ecoserve-scheduler export-pairs --db URL --out served.jsonl`)
ecoserve-predictor evaluate --data FILE.jsonl[.gz] [--artifact DIR] --out FILE.json
ecoserve-predictor fit-history [--data-dir ../shared/data] [--artifact DIR]
ecoserve-predictor serve [--artifact DIR] [--address 127.0.0.1:50061] [--device auto|cpu|cuda]

`serve` binds the loopback interface unless told otherwise: the predictor has no
authentication, so reaching it from other hosts (`--address 0.0.0.0:50061`, as the compose file
does inside its private network) is a deliberate choice.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

log = logging.getLogger("ecoserve_predictor")

DEFAULT_ADDRESS = "127.0.0.1:50061"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecoserve-predictor", description=__doc__.split("\n")[0])
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    def training(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", required=True, help="artifact directory to write")
        sp.add_argument("--kind", choices=("encoder", "bag"), default="encoder")
        sp.add_argument("--epochs", type=int, default=6)
        sp.add_argument("--vocab-size", type=int, default=8192)
        sp.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train on ShareGPT pairs (or synthetic ones)")
    training(t)
    t.add_argument("--data-dir", default=None, help="folder with sharegpt_v3_pairs.jsonl.gz")
    t.add_argument("--synthetic", type=int, default=0, help="N synthetic pairs instead")

    r = sub.add_parser("retrain", help="train on served requests (ecoserve-scheduler export-pairs)")
    training(r)
    r.add_argument(
        "--pairs", required=True, help="JSONL of {prompt, response_tokens}, one served request each"
    )
    r.add_argument("--min-rows", type=int, default=1000, help="refuse with fewer rows")

    e = sub.add_parser("evaluate", help="accuracy on a JSONL file of ShareGPT-format pairs")
    e.add_argument(
        "--data", required=True, help="JSONL[.gz]: id, turn, prompt, response_tokens per line"
    )
    e.add_argument("--artifact", default=None, help="artifact dir (default: the packaged one)")
    e.add_argument("--out", required=True, help="JSON file to write")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    e.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    h = sub.add_parser(
        "fit-history", help="fit the history blend (history.py) into an artifact's meta.json"
    )
    h.add_argument("--data-dir", default=None, help="folder with sharegpt_v3_pairs.jsonl.gz")
    h.add_argument("--artifact", default=None, help="artifact dir (default: the packaged one)")
    h.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    h.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")

    s = sub.add_parser("serve", help="serve an artifact over gRPC")
    s.add_argument("--artifact", default=None, help="artifact dir (default: the packaged one)")
    s.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"host:port to bind (default {DEFAULT_ADDRESS}: this machine only; no authentication)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu or cuda")
    s.add_argument("--max-batch", type=int, default=64, help="prompts per model batch")
    s.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="hold a batch open for more calls"
    )
    s.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    return p


def cmd_train(a) -> int:
    from .data import DEFAULT_DATA_DIR, honest_split, load_sharegpt, synthetic_pairs
    from .train import train_artifact

    if a.synthetic:
        pairs, source = synthetic_pairs(a.synthetic, a.seed), f"synthetic{a.synthetic}"
    else:
        pairs, source = load_sharegpt(a.data_dir or DEFAULT_DATA_DIR), "sharegpt"
    # The test side is never read here: bench/predictor.py evaluates on it.
    train, val, test = honest_split(pairs)
    train_artifact(
        a.out,
        train,
        val,
        a.kind,
        a.vocab_size,
        a.epochs,
        a.seed,
        source=source,
        log=log.info,
        test_pairs=len(test),
    )
    from .history import fit_artifact

    try:  # the history blend (history.py), on the same training side
        fit_artifact(a.out, train)
    except ValueError as exc:
        log.warning("no history blend: %s", exc)
    return 0


def cmd_retrain(a) -> int:
    import json
    from pathlib import Path

    from .data import Pair, dedup, split
    from .train import train_artifact

    # The scheduler owns the store; it exports what it served (`export-pairs`), so the predictor
    # reads a file and never the scheduler's database schema.
    with Path(a.pairs).open() as f:
        rows = [(r["prompt"], int(r["response_tokens"])) for r in map(json.loads, f) if r]
    if len(rows) < a.min_rows:
        log.error("%s has %d served requests; --min-rows is %d", a.pairs, len(rows), a.min_rows)
        return 2
    # Served requests carry no conversation id: each is its own group in the split.
    pairs = [Pair(f"r{i}", prompt, n) for i, (prompt, n) in enumerate(rows) if prompt.strip()]
    train, val = dedup(split(pairs))  # a prompt served again is not held out
    train_artifact(
        a.out, train, val, a.kind, a.vocab_size, a.epochs, a.seed, source="store", log=log.info
    )
    return 0


def cmd_evaluate(a) -> int:
    import json
    from pathlib import Path

    from .evaluate import evaluate_file
    from .runtime import PACKAGED_ARTIFACT

    result = evaluate_file(
        a.data, a.artifact or PACKAGED_ARTIFACT, a.device, a.threads, a.resamples, a.seed
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("overall", "first_turn", "later_turns", "unseen_prompt"):
        m = result if name == "overall" else result[name]
        log.info(
            "%s: n %s spearman %s mae %s coverage_upper %s",
            name,
            m["n"],
            m.get("spearman"),
            m.get("mae"),
            m.get("coverage_upper"),
        )
    return 0


def cmd_fit_history(a) -> int:
    import json

    from .data import DEFAULT_DATA_DIR, honest_split, load_sharegpt
    from .history import fit_artifact
    from .runtime import PACKAGED_ARTIFACT

    # Only the training side is passed on: validation and test never reach the fit.
    train, _val, _test = honest_split(load_sharegpt(a.data_dir or DEFAULT_DATA_DIR))
    artifact = a.artifact or PACKAGED_ARTIFACT
    entry = fit_artifact(artifact, train, a.device, a.threads)
    log.info("history_blend of %s: %s", artifact, json.dumps(entry))
    return 0


def cmd_serve(a) -> int:
    from .runtime import PACKAGED_ARTIFACT, OnnxPredictor
    from .server import build_server

    predictor = OnnxPredictor(a.artifact or PACKAGED_ARTIFACT, a.device, a.threads)
    server, port, batcher = build_server(predictor, a.address, a.max_batch, a.max_wait_ms / 1000.0)
    server.start()
    log.info("predictor %s on port %d, providers %s", predictor.model_id, port, predictor.providers)
    stopped = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    server.stop(grace=2.0).wait()
    batcher.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .evaluate import InputError

    commands = {
        "train": cmd_train,
        "retrain": cmd_retrain,
        "evaluate": cmd_evaluate,
        "fit-history": cmd_fit_history,
        "serve": cmd_serve,
    }
    try:
        return commands[a.command](a)
    except (FileNotFoundError, InputError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
