"""Medians and ranges of the shared driver's runs, by label.

    python bench/peers_summary.py [DIR]

reads ``results-feathers.jsonl``, ``results-agor.jsonl`` and
``results-ideal.jsonl`` in DIR (a copy of ``../shared/bench-peers``; default
``.``) and prints one line per label: runs, latency p50 and p99, server CPU
(% of a core), deliveries/s in the measured window (median and range), and
the runs' missing, out-of-order and contaminated counts.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
from collections import defaultdict
from typing import Any

PEERS = ("feathers", "agor", "ideal")


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(directory: pathlib.Path) -> None:
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for peer in PEERS:
        path = directory / f"results-{peer}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    run = json.loads(line)
                    runs[run["label"]].append(run)
    for label, rs in runs.items():
        print(
            f"{label:28} n={len(rs)}"
            f" p50 {_fmt([r['latency_ms']['p50'] for r in rs])}"
            f" p99 {_fmt([r['latency_ms']['p99'] for r in rs])}"
            f" cpu {_fmt([r['server_cpu_pct'] for r in rs])}"
            f" deliv/s {_fmt([r['delivered_per_s_window'] for r in rs])}"
            f" missing {sum(r['missing'] for r in rs)}"
            f" out-of-order {sum(r['out_of_order'] for r in rs)}"
            f" contaminated {sum(bool(r['contaminated']) for r in rs)}"
        )


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "."))
