"""Run twistd under cProfile and write the stats when it stops, SIGINT/SIGTERM included.

    .venv/bin/python bench/cprof.py OUT.prof -n --pidfile= wmproxy -c FILE

(``python -m cProfile`` loses the stats: twistd re-raises the stop signal with its default action.)
"""

from __future__ import annotations

import cProfile
import sys


def main() -> None:
    from twisted.application import app
    from twisted.scripts.twistd import run

    out = sys.argv[1]
    sys.argv = ["twistd", *sys.argv[2:]]
    prof = cProfile.Profile()
    exit_with_signal = app._exitWithSignal

    def dump_then_exit(sig: int) -> None:
        prof.disable()
        prof.dump_stats(out)
        exit_with_signal(sig)

    app._exitWithSignal = dump_then_exit
    prof.enable()
    try:
        run()
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
