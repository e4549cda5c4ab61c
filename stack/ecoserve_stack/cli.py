"""`ecoserve`: `up`, `demo` and `keys` run here; every other command is the scheduler's
(`ecoserve-scheduler`: serve, compare, plan, profiles, fit-profile, export-pairs).

`ecoserve keys DIR` (= `python -m ecoserve_common.curve init DIR`) makes the worker plane's CURVE
keys; `ecoserve keys add-worker DIR NAME --out OUT` one more worker host's key pair."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["up"]:
        from .launcher import main as up_main

        return up_main(argv[1:])
    if argv[:1] == ["keys"]:
        from ecoserve_common.curve import main as keys_main

        rest = argv[1:]
        return keys_main(rest if rest[:1] in (["init"], ["add-worker"]) else ["init", *rest])
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    from ecoserve_scheduler.cli import main as scheduler_main

    return scheduler_main(argv)


if __name__ == "__main__":
    sys.exit(main())
