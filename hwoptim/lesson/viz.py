"""Draw the lesson's pictures: optimizer paths on 2-D landscapes, and BGD/SGD/MBGD training.

    hwoptim viz [LANDSCAPE | batching | all] [options]

LANDSCAPE (default: anisotropic-saddle, the lesson's animation) writes to --out:
  NAME.png       contour plot (log-spaced levels) with each method's path, start and
                 minimum (or saddle point) marked
  NAME.gif       the paths growing step by step (matplotlib + Pillow, no ffmpeg)
  NAME-loss.png  loss against step
Landscapes: anisotropic-saddle, saddle, valley, beale, rosenbrock, rastrigin, himmelblau,
styblinski-tang (see hwoptim.lesson.landscapes).

Methods (--opt, repeatable): [LABEL=]NAME[(key=value, ...)], NAME a lesson name (SGD,
Momentum, Nesterov, AdaGrad, Adadelta, RMSProp, Adam, AdamW) or an hwoptim class, e.g.
--opt "Adam(lr=0.05)" --opt "slow=SGD(lr=0.001)". A method without lr gets the learning
rate that makes its first step --first-step long, so all start equally fast. Default: the
landscape's own set (the saddles: the lesson's seven, first step 0.05).

batching trains linear regression (diabetes) and logistic regression (breast cancer),
scikit-learn's bundled data sets (pip install 'hwoptim[lesson]'), with BGD, SGD and MBGD
times each method (default SGD, Momentum, Adam), and writes batching.png: loss against
epoch and against wall time. all renders every picture of the README's "The lesson".

Examples:
  hwoptim viz --out docs/img
  hwoptim viz valley -p kappa=1000 --steps 600
  hwoptim viz rosenbrock --opt "Adam(lr=0.02)" --opt "Momentum(lr=5e-4)" --steps 500
  hwoptim viz batching --epochs 20 --batch-size 16
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time

import numpy as np

from . import landscapes as L
from . import trajectories as T

# fixed colours per lesson method, so every picture agrees
COLORS = {"SGD": "#d62728", "Momentum": "#2ca02c", "Nesterov": "#e377c2",
          "AdaGrad": "#9467bd", "Adadelta": "#bcbd22", "RMSProp": "#111111",
          "Adam": "#1f77b4", "AdamW": "#17becf", "GD": "#d62728"}
# the others' (rules added later: Adafactor, Lion, ...): none of the fixed colours, so a
# new method never looks like Adam
_CYCLE = ["#ff7f0e", "#8c564b", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
          "#c5b0d5", "#c49c94", "#f7b6d2"]


def _valley_methods(ls):
    kappa = ls.condition_number
    lr = 2.0 / (1.0 + 1.0 / kappa)   # plain gradient descent's best learning rate
    return [T.Method("GD", "SGD", {"lr": lr}),
            T.Method("Momentum", "SGD", {"lr": lr, "momentum": 0.9})]


# what each landscape draws by default: steps, first-step length, methods (a function of
# the landscape, or None for the lesson's seven)
DEFAULTS = {
    "anisotropic-saddle": dict(steps=250, first_step=0.05, methods=None),
    "saddle": dict(steps=200, first_step=0.05, methods=None),
    "valley": dict(steps=120, first_step=0.5, methods=_valley_methods,
                   note="both at lr = 2/(1 + 1/κ), plain gradient descent's best; μ = 0.9"),
    "beale": dict(steps=600, first_step=0.02, methods=None),
    "rosenbrock": dict(steps=600, first_step=0.02, methods=None),
    "rastrigin": dict(steps=300, first_step=0.05, methods=None),
    "himmelblau": dict(steps=300, first_step=0.01, methods=None),
    "styblinski-tang": dict(steps=300, first_step=0.05, methods=None),
}
# what "all" renders: the README's pictures (landscape, with its animation?)
ALL = [("anisotropic-saddle", True), ("valley", False)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("what", nargs="?", default="anisotropic-saddle",
                        choices=list(L.LANDSCAPES) + ["batching", "all"], metavar="WHAT",
                        help="a landscape (default anisotropic-saddle), batching, or all")
    parser.add_argument("--opt", action="append", default=None, metavar="METHOD",
                        help="a method, e.g. 'Adam(lr=0.05)' (repeat for several)")
    parser.add_argument("--first-step", type=float, default=None, metavar="LENGTH",
                        help="first-step length that sets lr for methods without one")
    parser.add_argument("--steps", type=int, default=None, help="steps per method")
    parser.add_argument("--start", default=None, metavar="X,Y",
                        help="start point (write --start=-1,2 when X is negative)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a landscape parameter, e.g. kappa=1000 (valley), b=0.01 "
                             "(anisotropic-saddle), offset=1e-6 (saddles)")
    parser.add_argument("--backend", default=None,
                        help="hwoptim backend for every update (default: fastest here)")
    parser.add_argument("--out", default="hwoptim-viz", metavar="DIR",
                        help="output folder (default ./hwoptim-viz)")
    parser.add_argument("--no-gif", action="store_true", help="skip the animation")
    parser.add_argument("--frames", type=int, default=80,
                        help="animation frames (default 80; the last is held 1.5 s)")
    parser.add_argument("--fps", type=int, default=12, help="animation frame rate")
    parser.add_argument("--dpi", type=int, default=100, help="resolution (PNG and GIF)")
    parser.add_argument("--grid", type=int, default=300,
                        help="contour grid points per axis (default 300)")
    parser.add_argument("--epochs", type=int, default=30, help="batching: epochs")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="batching: the mini-batch size for MBGD (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="batching: shuffling seed")
    parser.add_argument("--repeat", type=int, default=3,
                        help="batching: runs of each case; each epoch's time is the "
                             "shortest (default 3)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


# ----------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress indicator on stderr (rewritten in place on a terminal)."""

    def __init__(self, quiet=False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._last = 0.0

    def update(self, what: str, i: int, n: int):
        if self.quiet:
            return
        now = time.perf_counter()
        if self.tty:
            if i == n or now - self._last > 0.1:
                self.stream.write(f"\r{what}: {i}/{n}" + ("\n" if i == n else ""))
                self.stream.flush()
                self._last = now
        elif i == n:
            self.stream.write(f"{what}: {n}/{n} done\n")
            self.stream.flush()

    def note(self, text: str):
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- helpers

def _parse_params(items) -> dict:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE, e.g. kappa=1000")
        try:
            out[name.strip()] = float(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError):
            raise ValueError(f"--param {item!r}: the value must be a number") from None
    return out


def _parse_start(text):
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        vals = ()
    if len(vals) != 2:
        raise ValueError(f"--start {text!r}: expected X,Y, e.g. --start 1.2,0.001")
    return vals


def _color(label, i):
    base = label.split("(")[0]
    return COLORS.get(base, _CYCLE[i % len(_CYCLE)])


def contour_levels(Z, min_value=None, n=24):
    """Log-spaced levels for ``Z``: above ``min_value`` when the function has a minimum,
    else symmetric about 0 (the saddles)."""
    Z = np.asarray(Z, dtype=np.float64)
    Z = Z[np.isfinite(Z)]
    if min_value is not None:
        d = Z - min_value
        hi = float(d.max())
        lo = max(float(np.quantile(d, 0.002)), hi * 1e-6, 1e-12)
        return min_value + np.logspace(math.log10(lo), math.log10(hi), n)
    hi = float(np.abs(Z).max())
    pos = np.logspace(math.log10(hi) - 3, math.log10(hi), n // 2)
    return np.concatenate([-pos[::-1], [0.0], pos])


def _legend_label(t):
    return f"{t.method.label}, lr={t.method.lr:.3g}"


def _finite_prefix(path):
    """The points before the first non-finite one (a diverged run stops there)."""
    ok = np.all(np.isfinite(path), axis=1)
    k = len(path) if ok.all() else int(np.argmin(ok))
    return path[:k]


def compute(name, params, methods, steps, start, first_step, backend):
    ls = L.get(name, **params)
    d = DEFAULTS[name]
    steps = d["steps"] if steps is None else steps
    first_step = d["first_step"] if first_step is None else first_step
    note = ""
    if methods is None:
        methods = T.LESSON_METHODS if d["methods"] is None else d["methods"](ls)
        note = d.get("note", "")
    methods = [T.parse_method(m) if isinstance(m, str) else m for m in methods]
    matched = [m.label for m in methods if "lr" not in m.hypers]
    methods = T.match_first_step(ls, methods, first_step, start=start, backend=backend)
    if matched:
        who = ("every method's" if len(matched) == len(methods)
               else " and ".join(f"{m}'s" for m in matched))
        note = f"lr set so that {who} first step is {first_step:g} long"
    return ls, T.run_many(ls, methods, steps, start=start, backend=backend), note


def _save_png(fig, path, dpi):
    """Save as a 256-colour PNG (Pillow): a third of the size, the same to the eye."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    im = Image.open(buf).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def _figure(w, h, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


# drawn last is on top: SGD last, so the method that stays on the ridge stays visible
_ORDER = {"SGD": 100, "GD": 100}
_LINESTYLE = {"Momentum": (0, (5, 2)), "Nesterov": (0, (3, 1, 1, 1))}


def _style(label, i):
    base = label.split("(")[0]
    return dict(color=_color(label, i), ls=_LINESTYLE.get(base, "-"),
                lw={"SGD": 2.4, "GD": 1.1}.get(base, 1.7), zorder=3 + _ORDER.get(base, i) / 1000)


def _draw_landscape(ax, ls, grid):
    xs = np.linspace(*ls.xlim, grid)
    ys = np.linspace(*ls.ylim, grid)
    X, Y = np.meshgrid(xs, ys)
    Z = ls.f(X, Y)
    levels = contour_levels(Z, ls.min_value)
    if ls.min_value is None:      # saddles: up is red, down is blue, 0 white
        import matplotlib.colors as mcolors
        norm = mcolors.SymLogNorm(linthresh=levels[len(levels) // 2 + 1],
                                  vmin=levels[0], vmax=levels[-1])
        ax.contourf(X, Y, Z, levels=levels, cmap="RdBu_r", norm=norm, alpha=0.45)
        ax.contour(X, Y, Z, levels=levels, colors="#555555", linewidths=0.4, alpha=0.6)
    else:
        import matplotlib.colors as mcolors
        norm = mcolors.LogNorm(vmin=levels[0] - ls.min_value, vmax=levels[-1] - ls.min_value)
        ax.contourf(X, Y, Z - ls.min_value, levels=levels - ls.min_value, cmap="viridis_r",
                    norm=norm, alpha=0.35, extend="min")
        ax.contour(X, Y, Z - ls.min_value, levels=levels - ls.min_value, colors="#555555",
                   linewidths=0.4, alpha=0.6)
    ax.set_xlim(*ls.xlim)
    ax.set_ylim(*ls.ylim)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    for m in ls.minima[1:]:
        ax.plot(*m, marker="*", color="#bbbbbb", mec="black", ms=10, ls="none", zorder=2,
                label="other minima" if m is ls.minima[1] else None)
    if ls.minimum is not None:
        ax.plot(*ls.minimum, marker="*", color="gold", mec="black", ms=15, ls="none",
                zorder=2.5, label="minimum")
    elif ls.critical_point is not None:
        ax.plot(*ls.critical_point, marker="X", color="white", mec="black", ms=8,
                ls="none", zorder=2.5, label="saddle point")


def _title(ls, trajs, note=""):
    s = trajs[0].path[0]
    return (f"{ls.title}: {trajs[0].steps} steps from ({s[0]:.3g}, {s[1]:.3g})"
            + (f"\n{note}" if note else ""))


def _mark_start(ax, trajs, ms=7):
    s = trajs[0].path[0]
    ax.plot(s[0], s[1], marker="o", color="black", mfc="white", mew=2, ms=ms, ls="none",
            zorder=6, label="start")


def render_paths_png(ls, trajs, path, dpi=100, grid=300, note=""):
    fig = _figure(7.2, 6.0, dpi)
    ax = fig.add_subplot()
    _draw_landscape(ax, ls, grid)
    for i, t in enumerate(trajs):
        p = _finite_prefix(t.path)
        st = _style(t.method.label, i)
        ax.plot(p[:, 0], p[:, 1], label=_legend_label(t), **st)
        ax.plot(p[-1, 0], p[-1, 1], "o", color=st["color"], ms=7, mec="white",
                zorder=st["zorder"] + 1)
    _mark_start(ax, trajs)
    ax.set_title(_title(ls, trajs, note), fontsize=10)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    _save_png(fig, path, dpi)
    return path


def render_loss_png(ls, trajs, path, dpi=100):
    fig = _figure(7.2, 4.8, dpi)
    ax = fig.add_subplot()
    for i, t in enumerate(trajs):
        y = t.losses if ls.min_value is None else t.losses - ls.min_value
        st = _style(t.method.label, i)
        ax.plot(np.arange(len(y)), y, label=_legend_label(t), **st)
    if ls.min_value is None:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylabel("loss f(x, y) (symmetric log scale)")
        # unbounded below: show down to 100 times the lowest value inside the plotted range
        X, Y = np.meshgrid(np.linspace(*ls.xlim, 61), np.linspace(*ls.ylim, 61))
        low = 100 * min(float(ls.f(X, Y).min()), -1e-3)
        top = max(float(np.nanmax(t.losses[np.isfinite(t.losses)])) for t in trajs)
        ax.set_ylim(low, 2 * top)
    else:
        ax.set_yscale("log")
        ax.set_ylabel("loss − minimum" if ls.min_value else "loss")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.set_title(f"{ls.title}: loss", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              frameon=False)
    fig.tight_layout()
    _save_png(fig, path, dpi)
    return path


def _pillow_writer_class():
    from matplotlib.animation import PillowWriter
    from PIL import Image

    class BlitPillowWriter(PillowWriter):
        """matplotlib's Pillow writer, fed by blitting and with one palette for all frames.

        ``grab_frame`` takes the canvas as drawn (the static background is drawn once and
        restored each frame; only the growing paths are redrawn), and ``finish`` maps every
        frame to one palette, so frames differ only where paths grew and Pillow stores just
        those rectangles: a small file."""

        def grab_frame(self, **savefig_kwargs):
            canvas = self.fig.canvas
            w, h = canvas.get_width_height()
            self._frames.append(Image.frombuffer("RGBA", (w, h), bytes(canvas.buffer_rgba()),
                                                 "raw", "RGBA", 0, 1).convert("RGB"))

        def finish(self):
            pal = self._frames[-1].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
            frames = [f.quantize(palette=pal, dither=Image.Dither.NONE) for f in self._frames]
            frames[0].save(self.outfile, save_all=True, append_images=frames[1:],
                           duration=int(1000 / self.fps), loop=0)
    return BlitPillowWriter


def render_gif(ls, trajs, path, frames=80, fps=12, dpi=80, grid=300, progress=None):
    fig = _figure(6.4, 5.4, dpi)
    ax = fig.add_subplot()
    _draw_landscape(ax, ls, grid)
    _mark_start(ax, trajs, ms=6)
    lines, heads, paths = [], [], []
    for i, t in enumerate(trajs):
        st = _style(t.method.label, i)
        paths.append(_finite_prefix(t.path))
        lines.append(ax.plot([], [], label=t.method.label, animated=True, **st)[0])
        heads.append(ax.plot([], [], "o", color=st["color"], ms=7, mec="white",
                             zorder=st["zorder"] + 1, animated=True)[0])
    ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    ax.set_title(f"{ls.title}: step 0000", fontsize=10)
    fig.tight_layout()
    title = ax.title
    title.set_animated(True)
    canvas = fig.canvas
    canvas.draw()                                   # everything static, once
    background = canvas.copy_from_bbox(fig.bbox)

    n = trajs[0].steps
    ks = np.unique(np.round(np.linspace(0, n, max(2, min(frames, n + 1)))).astype(int))
    seq = list(ks) + [ks[-1]] * max(1, int(1.5 * fps))      # hold the end
    order = sorted(range(len(lines)), key=lambda j: lines[j].get_zorder())
    writer = _pillow_writer_class()(fps=fps)
    name = os.path.basename(path)
    with writer.saving(fig, path, dpi):
        for i, k in enumerate(seq):
            canvas.restore_region(background)
            for j in order:
                line, head, p = lines[j], heads[j], paths[j]
                q = p[:k + 1]
                line.set_data(q[:, 0], q[:, 1])
                head.set_data(q[-1:, 0], q[-1:, 1])
                ax.draw_artist(line)
                ax.draw_artist(head)
            title.set_text(f"{ls.title}: step {k}")
            ax.draw_artist(title)
            writer.grab_frame()
            if progress is not None:
                progress.update(f"rendering {name}", i + 1, len(seq))
    return path


def render_landscape(name, args, progress, gif=True):
    params = _parse_params(args.param)
    start = _parse_start(args.start)
    ls, trajs, note = compute(name, params, args.opt, args.steps, start, args.first_step,
                              args.backend)
    out = args.out
    files = [render_paths_png(ls, trajs, os.path.join(out, f"{name}.png"), args.dpi,
                              args.grid, note),
             render_loss_png(ls, trajs, os.path.join(out, f"{name}-loss.png"), args.dpi)]
    if gif and not args.no_gif:
        files.append(render_gif(ls, trajs, os.path.join(out, f"{name}.gif"), args.frames,
                                args.fps, int(args.dpi * 0.8), args.grid, progress))
    for t in trajs:
        progress.note(f"  {t.method.label:10s} lr={t.method.lr:<10.4g} backend={t.backend} "
                      f"final ({t.path[-1, 0]:.4g}, {t.path[-1, 1]:.4g}) "
                      f"loss {t.losses[-1]:.4g}")
    return files


# ----------------------------------------------------------------------------- batching

BATCH_METHODS = ("SGD(lr=0.05)", "Momentum(lr=0.005)", "Adam(lr=0.01)")
_STYLES = {"BGD": "-", "MBGD": "--", "SGD": ":"}


def compute_batching(methods, epochs, middle, seed, backend, progress, repeat=3):
    from . import batching as B
    results = []
    total = len(B.DATASETS) * len(methods) * 3
    done = 0
    for ds in B.DATASETS:
        model, doc = B.load_dataset(ds)
        _, best = model.optimum()
        hists = []
        for m in methods:
            for mode_name, b in B.batch_sizes(model.n, middle).items():
                h = B.train(model, m, b, epochs, seed=seed, backend=backend)
                # the same run again (same seed: the same losses), keeping each epoch's
                # shortest time, so a busy machine's pauses do not show as slow epochs
                per_epoch = np.diff(h.seconds)
                for _ in range(repeat - 1):
                    again = B.train(model, m, b, epochs, seed=seed, backend=backend)
                    per_epoch = np.minimum(per_epoch, np.diff(again.seconds))
                h.seconds = [0.0] + list(np.cumsum(per_epoch))
                hists.append((m, h))
                done += 1
                progress.update("training (BGD/MBGD/SGD × methods × data sets)", done,
                                total)
        results.append((ds, doc, model, best, hists))
    return results


def render_batching(args, progress):
    from matplotlib.lines import Line2D
    methods = [T.parse_method(m) for m in (args.opt or BATCH_METHODS)]
    results = compute_batching(methods, args.epochs, args.batch_size, args.seed,
                               args.backend, progress, args.repeat)
    fig = _figure(11, 8.4, args.dpi)
    axes = fig.subplots(len(results), 2, squeeze=False)
    for row, (ds, doc, model, best, hists) in enumerate(results):
        ax_e, ax_t = axes[row]
        for (m, h) in hists:
            c = _color(m.label, methods.index(m))
            excess = np.maximum(np.asarray(h.losses) - best, 1e-16)
            ax_e.plot(np.arange(len(excess)), excess, _STYLES[h.mode], color=c, lw=1.6)
            ax_t.plot(np.maximum(h.seconds[1:], 1e-6), excess[1:], _STYLES[h.mode],
                      color=c, lw=1.6)
        for ax in (ax_e, ax_t):
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_ylabel("loss − optimum (all data)")
        ax_t.set_xscale("log")
        ax_e.set_xlabel("epoch")
        ax_t.set_xlabel(f"training wall time (s) after each epoch, best of {args.repeat}")
        ax_e.set_title(f"{ds}: {model.name}, N = {model.n}, {model.dim} weights",
                       fontsize=10)
        ax_t.set_title(f"{ds}: the same runs against wall time", fontsize=10)
    handles = [Line2D([], [], color=_color(m.label, i), lw=2, label=f"{m.label} lr={m.lr:g}")
               for i, m in enumerate(methods)]
    handles += [Line2D([], [], color="black", ls=_STYLES[mode_name], lw=1.6,
                       label=f"{mode_name} (b = {'N' if mode_name == 'BGD' else b})")
                for mode_name, b in (("BGD", 0), ("MBGD", args.batch_size), ("SGD", 1))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.suptitle(f"BGD, MBGD, SGD × {len(methods)} optimizers, {args.epochs} epochs, "
                 f"shuffle seed {args.seed}: every update an hwoptim step", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = os.path.join(args.out, "batching.png")
    _save_png(fig, path, args.dpi)
    for ds, doc, model, best, hists in results:
        for m, h in hists:
            progress.note(f"  {ds:13s} {m.label:9s} {h.mode:4s} b={h.batch_size:<4d} "
                          f"steps={h.steps:<6d} {h.seconds[-1]:7.3f} s  final excess "
                          f"{h.losses[-1] - best:.3g}")
    return [path]


# ----------------------------------------------------------------------------- command

def run(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("hwoptim viz draws with matplotlib: pip install 'hwoptim[viz]'",
              file=sys.stderr)
        return 2
    progress = Progress(args.quiet)
    os.makedirs(args.out, exist_ok=True)
    try:
        if args.what == "all":
            files = []
            for name, gif in ALL:
                files += render_landscape(name, args, progress, gif=gif)
            files += render_batching(args, progress)
        elif args.what == "batching":
            files = render_batching(args, progress)
        else:
            files = render_landscape(args.what, args, progress)
    except (ValueError, TypeError, ImportError) as e:
        print(f"hwoptim viz: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0
