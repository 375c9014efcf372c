"""Write a run's report: one self-contained HTML page of its curves, sample rounds, evaluation scores and config.

    python -m pipeline.report RUN_DIR [--out FILE] [--max-rounds N]

The story: read metrics.jsonl → draw loss, validation loss, learning rate, gradient norm, throughput, MFU, data wait
and skip counters against step → lay the sample rounds out as a grid (a row per sample, a column per round) → add
eval/*/metrics.json and the resolved config → write RUN_DIR/report.html. Plots and images are embedded as data
URIs and the page needs no script or network, so the file can be opened from disk, copied off a cluster, or
attached to a ticket. It reads only what the run wrote, so it works during training as well as after it; a
missing or partial file gets a line in the page instead of an error. Code below the entry points calls
`pipeline.reporting.write_report` (re-exported here) instead of importing this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.reporting import DEFAULT_MAX_ROUNDS, REPORT_NAME, write_report

__all__ = ["main", "write_report"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write RUN_DIR/report.html: curves, sample rounds, eval, config.")
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl, samples/, config.yaml)")
    parser.add_argument("--out", type=Path, help=f"where to write the page (default RUN_DIR/{REPORT_NAME})")
    parser.add_argument(
        "--max-rounds", type=int, default=DEFAULT_MAX_ROUNDS, help="sample rounds shown as columns, evenly spaced"
    )
    args = parser.parse_args(argv)
    if args.max_rounds < 1:
        parser.error("--max-rounds must be at least 1")
    if not args.run_dir.is_dir():
        print(f"error: run directory {args.run_dir} does not exist", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.out, args.max_rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
