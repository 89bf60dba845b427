"""``python -m fedmoe_flwr.report RUN_DIR [RUN_DIR ...] [-o OUT] [--all]``: see the package doc."""

from __future__ import annotations

import argparse
import sys
import time

from fedmoe_flwr.report import write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedmoe_flwr.report", description=__doc__.split(":", 1)[0])
    ap.add_argument("paths", nargs="+", help="run directories, or directories holding runs (e.g. a Hydra multirun dir)")
    ap.add_argument("-o", "--out", help="output directory (default: <dir>/report, or report/ under the common parent)")
    ap.add_argument("--all", action="store_true", help="per-run figures for every run, not one per group")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = write_report(args.paths, args.out, all_runs=args.all)
    except FileNotFoundError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    print(f"report written to {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
