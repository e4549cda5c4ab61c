"""`ecoserve`: `up` and `demo` run here; every other command is the scheduler's
(`ecoserve-scheduler`: serve, compare, plan, profiles, fit-profile, export-pairs)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["up"]:
        from .launcher import main as up_main

        return up_main(argv[1:])
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    from ecoserve_scheduler.cli import main as scheduler_main

    return scheduler_main(argv)


if __name__ == "__main__":
    sys.exit(main())
