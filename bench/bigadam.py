"""A 10^9-element float32 Adam (16 GB: param, grad, exp_avg, exp_avg_sq) stepping in
place: time per step, effective GB/s, and peak RSS, to show a step allocates nothing that
grows with n. Run by hand, not in CI:

    python bench/bigadam.py               # n = 1e9: needs ~16.1 GB free
    python bench/bigadam.py --n 5e8       # 8 GB
    python bench/bigadam.py --n 1e9 --steps 5 --threads 2

It refuses to start when MemAvailable is below the arrays' size plus --margin GB (default
2), unless --force. Peak RSS is ru_maxrss (getrusage), compared with the arrays' bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e9, help="elements (default 1e9)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads")
    ap.add_argument("--margin", type=float, default=2.0,
                    help="GB of MemAvailable to keep free (default 2)")
    ap.add_argument("--force", action="store_true", help="skip the free-memory check")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    n = int(args.n)
    need = 4 * 4 * n                                    # param, grad, exp_avg, exp_avg_sq

    from hwoptim.bench.machine import mem_available
    avail = mem_available()
    print(f"n = {n:.3g} float32: arrays {need / 1e9:.2f} GB; MemAvailable "
          f"{(avail or 0) / 1e9:.2f} GB", flush=True)
    if not args.force and avail is not None and avail < need + args.margin * 1e9:
        print(f"refusing: needs {need / 1e9:.1f} GB + {args.margin:g} GB margin; try "
              f"--n {max(1e6, (avail - args.margin * 1e9) / 16):.1e}", file=sys.stderr)
        return 2

    import hwoptim
    from hwoptim import threads
    if args.threads:
        threads.set_num_threads(args.threads)

    t0 = time.perf_counter()
    rss0 = rss_bytes()
    w = np.empty(n, np.float32)
    w.fill(0.5)
    g = np.empty(n, np.float32)
    g.fill(1e-3)
    opt = hwoptim.Adam(w, lr=1e-3)                      # allocates and fills exp_avg(_sq)
    t_alloc = time.perf_counter() - t0
    rss_arrays = rss_bytes()
    print(f"allocated and filled in {t_alloc:.1f} s; RSS {rss_arrays / 1e9:.2f} GB "
          f"(+{(rss_arrays - rss0) / 1e9:.2f} GB)", flush=True)

    t = time.perf_counter()
    opt.step(g)                                         # first: kernel load or compile
    first = time.perf_counter() - t
    rss_first = rss_bytes()
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        opt.step(g)
        times.append(time.perf_counter() - t)
        print(f"step {i + 2}: {times[-1]:.3f} s", flush=True)
    rss_end = rss_bytes()
    peak = peak_rss_bytes()
    med = statistics.median(times)
    moved = 7 * 4 * n                                   # 4 reads + 3 writes
    out = {
        "n": n, "dtype": "float32", "arrays_bytes": need,
        "threads": threads.get_num_threads(), "layer": threads.threading_layer()["layer"],
        "first_step_s": first, "step_s_median": med, "step_s": times,
        "effective_gbps": moved / med / 1e9,
        "rss_before_arrays_bytes": rss0, "rss_after_alloc_bytes": rss_arrays, "rss_after_first_step_bytes": rss_first,
        "rss_end_bytes": rss_end, "peak_rss_bytes": peak,
        "peak_rss_over_arrays_bytes": peak - need,
        "peak_rss_over_arrays_and_start_bytes": peak - need - rss0,
        "growth_during_steps_bytes": rss_end - rss_first,
        "value_check": float(w[0]),
    }
    print(f"\nmedian step {med:.3f} s = {moved / med / 1e9:.1f} GB/s effective; first step "
          f"{first:.2f} s; peak RSS {peak / 1e9:.2f} GB = arrays {need / 1e9:.2f} GB + "
          f"{(peak - need) / 1e6:.0f} MB (the process held {rss0 / 1e6:.0f} MB before the "
          f"arrays; Numba's kernels and runtime load at the first step); RSS change over the timed steps "
          f"{(rss_end - rss_first) / 1e6:+.1f} MB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
