"""The entry point of the one-file executable (``make dist``).

``dist/agor-actors ARGS`` is ``agor-actors ARGS``.  The simulator pins the
hash seed by re-executing ``sys.executable -m sim ...``; in the executable
``sys.executable`` is the executable itself, so ``-m sim`` is taken here to
mean the simulator's own command line.
"""

from __future__ import annotations

import sys


def run(argv: list[str]) -> int:
    if argv[:2] == ["-m", "sim"]:
        from sim import main as sim_main

        return sim_main(argv[2:])
    from agor_actors.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
