"""``python -m hwoptim.bench.gpu OUTDIR [--quick] [--budget S] [--log2-n K]``: the GPU
benchmark's command. It writes the reports into OUTDIR and prints a short table."""
from __future__ import annotations

import argparse
import json
import sys
import time

import hwoptim

from .results import format_table
from .sections import run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwoptim.bench.gpu",
                                 description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder for <card>-<date>.json and .md")
    ap.add_argument("--quick", action="store_true", help="fewer cases, smaller sizes (< 1 min)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; later sections are skipped past it (default: 170, quick 50)")
    ap.add_argument("--log2-n", type=int, default=None,
                    help="log2 of the largest size (float32 Adam); default 28, quick 26")
    args = ap.parse_args(argv)
    why = hwoptim.backends.unavailable("cupy")
    if why is not None:
        print(f"gpubench: the cupy backend is unavailable: {why}", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (50.0 if args.quick else 170.0)
    result = run(quick=args.quick, out_dir=args.out_dir, budget_s=budget, log2_n=args.log2_n,
                 progress=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    print()
    print(format_table(result))
    print()
    print("summary: " + json.dumps(result["summary"], default=str))
    print("wrote " + ", ".join(result.get("files", [])))
    return 0
