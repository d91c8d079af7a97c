"""The CPU report's plots: effective bandwidth against size, speedups over torch."""
from __future__ import annotations

from .report_text import best_hwoptim, groups, timed
from .tables import fmt_n

STYLE = {"floor": dict(color="black", ls="--", lw=1.5),
          "torch-fused": dict(color="#d62728", ls=":", marker="s"),
          "torch-foreach": dict(color="#ff7f0e", ls=":", marker="^"),
          "torch-forloop": dict(color="#8c564b", ls=":", marker="v"),
          "hwoptim-numba": dict(color="#1f77b4", ls="-", marker="o", lw=2),
          "hwoptim-numpy": dict(color="#2ca02c", ls="-", marker="o")}


def plots(report, stem: str, notes: list) -> list:
    """GB/s against size (one panel per rule and option set; one file per device kind and
    dtype) and speedups over torch's fastest variant. Returns the PNG paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        notes.append(f"plots skipped: matplotlib cannot be imported ({e}); "
                     f"pip install 'hwoptim[viz]'")
        return []
    recs = timed(report["records"])
    cpu = report["machine"]["cpu_model"]
    out = []
    kinds = {}
    for r in recs:
        kinds.setdefault(("cpu" if r["device"] == cpu else "gpu", r["dtype"]), []).append(r)
    for (kind, dtype), rs in kinds.items():
        panels = []
        for r in rs:
            if (r["rule"], r["options"]) not in panels:
                panels.append((r["rule"], r["options"]))
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
        for ax, (rule, opts) in zip(axes.flat, panels):
            by = {}
            for r in rs:
                if (r["rule"], r["options"]) == (rule, opts):
                    by.setdefault(r["impl"], []).append((r["n"], r["gbps"]))
            for impl, pts in by.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl,
                        **STYLE.get(impl, dict(marker=".")))
            ax.set_xscale("log")
            ax.set_title(rule if opts == "default" else f"{rule} [{opts}]", fontsize=9)
            ax.set_xlabel("elements")
            ax.set_ylabel("effective GB/s")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)),
                   fontsize=8, frameon=False)
        fig.suptitle(f"{cpu if kind == 'cpu' else rs[0]['device']}, {dtype}: effective "
                     f"bandwidth (bytes the rule must move / time)", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.95))
        path = f"{stem}-{kind}-gbps-{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)

    # speedup of hwoptim (its default backend) over torch's fastest variant
    bars = {}
    for (dev, rule, opts, dtype, n), by in groups(recs).items():
        hw = best_hwoptim(by)
        if hw is None or hw.get("vs_torch") is None:
            continue
        label = (rule if opts == "default" else f"{rule}[{opts}]") + f"\n{dtype}"
        if dev != cpu:
            label += "\nGPU"
        bars.setdefault(label, {})[n] = hw["vs_torch"]
    if bars:
        sizes = sorted({n for v in bars.values() for n in v})
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) * max(1, len(sizes)) / 3), 4))
        w = 0.8 / len(sizes)
        cmap = plt.get_cmap("viridis")
        for j, n in enumerate(sizes):
            xs = [i + (j - (len(sizes) - 1) / 2) * w for i in range(len(bars))]
            ys = [v.get(n, float("nan")) for v in bars.values()]
            ax.bar(xs, ys, width=w, label=f"n={fmt_n(n)}",
                   color=cmap(j / max(1, len(sizes) - 1)))
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(list(bars), fontsize=7)
        ax.set_ylabel("speedup over torch's fastest CPU variant")
        ax.legend(fontsize=7, ncol=min(6, len(sizes)))
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = f"{stem}-speedup.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)
    return out
