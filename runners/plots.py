"""
PNG plots of a study's fit and of a comparison, drawn with matplotlib's Agg backend (no display needed). matplotlib
is the optional extra `pip install 'nanorun[plots]'`; without it the commands say so in one line and go on. This
module only reads: the reports of registry.studies.fit_report and runners.compare.compare, and the val bpb curves
of the compared runs' events.

    from registry.studies import fit_report
    from runners import plots
    plots.write_study_plots(fit_report("scaling_laws"))   # [.../studies/scaling_laws/plots/isoflop.png, fits.png]
    fig = plots.isoflop_figure(report)                     # a matplotlib Figure, for tests to inspect

Each budget's artists carry a gid ("cells 1e+18", "fit 1e+18", "vertex 1e+18" or "vertex-outside 1e+18"), and the
compare plot's "seed A <run_id>", "mean A", "multiplier", so a test can find what was drawn.
"""

import io
import os
import re

from nanochat import rundir
from registry.studies import isoflop_curves

HINT = "pip install 'nanorun[plots]'"
DPI = 120
METRIC_LABELS = {"val_bpb": "val bpb (lower is better)", "core_metric": "CORE (higher is better)"}
METRIC_NAMES = {"val_bpb": "val bpb", "core_metric": "CORE"}
SIDE_COLORS = {"a": "tab:blue", "b": "tab:orange"}
OUTSIDE = ("vertex_below_grid", "vertex_above_grid")


def available():
    """Whether matplotlib can be imported (the `plots` extra is installed)."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def skipped(no_plots):
    """None when plots can be written now; else the one line that says why they are not, and how to get them."""
    if not available():
        return f"plots: not written: they need matplotlib ({HINT})"
    if no_plots:
        return "plots: not written (--no-plots)"
    return None


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (optional extra, loaded on use)
    from matplotlib.figure import Figure  # noqa: PLC0415
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)   # Agg, whatever MPLBACKEND says: no pyplot, no global state, no display
    return fig


def save(fig, path):
    """The figure as a PNG at `path`, written atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    rundir.atomic_write_bytes(path, buffer.getvalue())
    return path


def _colors(n):
    from matplotlib import colormaps  # noqa: PLC0415
    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]


# --- a study ----------------------------------------------------------------------------------------------


def _budget_label(budget, flags):
    notes = {"vertex_below_grid": "vertex below the grid", "vertex_above_grid": "vertex above the grid",
             "opens_downward": "no minimum", "opens_upward": "no maximum", "too_few_points": "too few points"}
    extra = ", ".join(notes.get(f, f) for f in flags)
    return f"C = {budget:.3g} FLOPs" + (f" ({extra})" if extra else "")


def _vertex_style(outside, color):
    if outside:
        return {"marker": "X", "markersize": 10, "markerfacecolor": "white", "markeredgecolor": "red"}
    return {"marker": "*", "markersize": 13, "markerfacecolor": color, "markeredgecolor": "black"}


def _isoflop_axes(ax, report, metric):
    from matplotlib.lines import Line2D  # noqa: PLC0415
    curves = isoflop_curves(report, metric)
    kinds = set()
    for budget, color in zip(curves, _colors(len(curves))):
        b = budget["budget"]
        if budget["cells"]:
            n, v = zip(*budget["cells"])
            ax.plot(n, v, "o", color=color, markersize=5, label=_budget_label(b, budget["flags"]), gid=f"cells {b:.3g}")
        if budget["curve"]:
            n, v = zip(*budget["curve"])
            ax.plot(n, v, "-", color=color, linewidth=1.2, gid=f"fit {b:.3g}")
        if budget["vertex"] is not None:
            outside = any(f in OUTSIDE for f in budget["flags"])
            kind = "vertex-outside" if outside else "vertex"
            ax.plot(*budget["vertex"], linestyle="none", zorder=3, gid=f"{kind} {b:.3g}",
                    **_vertex_style(outside, color))
            kinds.add(outside)
    # one legend entry per kind of vertex (not one per budget), after the budgets
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], linestyle="none", label=label, **_vertex_style(outside, "white"))
                for outside, label in ((False, "N* (the vertex)"),
                                       (True, "N* outside the measured N (left out of the laws)")) if outside in kinds]
    ax.set_xscale("log")
    ax.set_xlabel(f"N (parameters, --params {report['params']})")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(f"{METRIC_NAMES[metric]} per FLOP budget: a quadratic in log N")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(handles=handles, fontsize="small")


def isoflop_figure(report):
    """The isoFLOP curves of a fit_report: per metric (val bpb, and CORE when it was fit) one panel with the cells of
    each budget against N (log x), the fitted quadratic and its vertex N* (a star; a red X when outside the grid)."""
    metrics = [m for m in ("val_bpb", "core_metric") if isoflop_curves(report, m)]
    fig = _figure(6.4 * len(metrics), 4.8)
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        _isoflop_axes(ax, report, metric)
    fig.suptitle(f"study {report['study']}: isoFLOP curves")
    return fig


def _law_label(quantity, metric, law, confidence):
    text = f"{METRIC_NAMES[metric]}: ${quantity} \\propto C^{{{law['value']:.3f}}}$"
    if law.get("low") is None:
        return text + " (no bootstrap interval)"
    return text + f", {confidence:.0%} CI [{law['low']:.3f}, {law['high']:.3f}]"


def _fits_axes(ax, report, key, law_name, quantity):
    drawn = False
    for metric, style, marker in (("val_bpb", "-", "o"), ("core_metric", "--", "s")):
        fit = report["fits"].get(metric)
        if not fit or "budgets" not in fit:
            continue
        rows = [r for r in fit["budgets"] if r.get(key) is not None]
        used = [r for r in rows if r["budget"] in fit["used"]]
        left = [r for r in rows if r["budget"] not in fit["used"]]
        color = "tab:blue" if metric == "val_bpb" else "tab:green"
        if used:
            ax.plot([r["budget"] for r in used], [r[key] for r in used], marker, color=color,
                    label=f"{METRIC_NAMES[metric]} optima", gid=f"optima {metric}")
            drawn = True
        if left:
            ax.plot([r["budget"] for r in left], [r[key] for r in left], marker, color=color, markerfacecolor="none",
                    label=f"{METRIC_NAMES[metric]} optima left out (outside the grid)", gid=f"left-out {metric}")
            drawn = True
        law = (fit["exponents"] or {}).get(law_name)
        if law:
            lo, hi = min(fit["used"]), max(fit["used"])
            xs = [lo / 1.5 * (hi * 1.5 / (lo / 1.5)) ** (i / 31) for i in range(32)]
            ax.plot(xs, [law["coefficient"] * x ** law["value"] for x in xs], style, color=color, linewidth=1.5,
                    label=_law_label(quantity, metric, law, fit["confidence"]), gid=f"law {metric}")
        elif metric == "val_bpb":
            ax.text(0.03, 0.03, f"no laws: {fit['reason']}", transform=ax.transAxes, fontsize="small", wrap=True)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("C (FLOPs)")
    ax.grid(True, which="both", alpha=0.25)
    if drawn:
        ax.legend(fontsize="small")


def fits_figure(report):
    """The laws across budgets of a fit_report, in log-log: the optima N* and D* against C, the fitted power laws
    (solid: val bpb's; dashed: CORE's), with the exponents and their bootstrap intervals in the legend."""
    fig = _figure(12.8, 4.8)
    ax_n, ax_d = fig.subplots(1, 2)
    _fits_axes(ax_n, report, "n_star", "a", "N^*")
    ax_n.set_ylabel(f"N* (parameters, --params {report['params']})")
    ax_n.set_title("compute-optimal model size")
    _fits_axes(ax_d, report, "d_star", "b", "D^*")
    ax_d.set_ylabel("D* (tokens)")
    ax_d.set_title("compute-optimal tokens")
    fig.suptitle(f"study {report['study']}: N* and D* against compute")
    return fig


def study_plot_paths(name, convention="scaling", home=None):
    """{"isoflop": path, "fits": path} under the study's plots directory; a convention other than the default
    gets its own files (isoflop-all.png), so `--params all` does not overwrite the reference's plots."""
    suffix = "" if convention == "scaling" else f"-{convention}"
    directory = rundir.study_plots_dir(name, home)
    return {kind: os.path.join(directory, f"{kind}{suffix}.png") for kind in ("isoflop", "fits")}


def write_study_plots(report, home=None):
    """Write (or refresh) the isoFLOP and fits PNGs of a fit_report; returns their paths."""
    paths = study_plot_paths(report["study"], report["params"], home)
    return [save(isoflop_figure(report), paths["isoflop"]), save(fits_figure(report), paths["fits"])]


# --- a comparison -------------------------------------------------------------------------------------------


def compare_curves(report, home=None):
    """{"a": [curve per run], "b": [...]}: the val bpb vs FLOPs points of every run on each side of a comparison."""
    from runners.compare import curve  # noqa: PLC0415
    return {side: [curve(rundir.load_run(run_id, home)) for run_id in report[side]["run_ids"]] for side in "ab"}


def mean_curve(curves):
    """The curves averaged at the FLOPs every one of them logged."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return []
    common = set(curves[0]).intersection(*curves[1:])
    return [(f, sum(c[f] for c in curves) / len(curves)) for f in sorted(common)]


def compare_figure(report, curves):
    """Val bpb against FLOPs (log x) for both sides of a comparison: each seed a thin line, the mean over seeds bold,
    and the point where the baseline reaches B's final val bpb (the compute multiplier) marked."""
    fig = _figure(8.0, 5.0)
    ax = fig.subplots()
    for side, name in (("a", "A"), ("b", "B")):
        s, color = report[side], SIDE_COLORS[side]
        if len(curves[side]) > 1:
            for i, (run_id, points) in enumerate(zip(s["run_ids"], curves[side])):
                if points:
                    f, v = zip(*points)
                    ax.plot(f, v, "-", color=color, linewidth=0.7, alpha=0.45, gid=f"seed {name} {run_id}",
                            label=f"{name}: each seed" if i == 0 else "_")
        mean = mean_curve(curves[side])
        if mean:
            f, v = zip(*mean)
            n = len(curves[side])
            ax.plot(f, v, "-", color=color, linewidth=2.4, gid=f"mean {name}",
                    label=f"{name}: {s['label']} (mean of {n} seed{'s' if n != 1 else ''}, final {s['mean']:.4f})")
    m = report.get("multiplier")
    if m:
        how = ", extrapolated" if m["extrapolated"] else ""
        ax.axhline(m["target_bpb"], color="grey", linestyle=":", linewidth=1, gid="target")
        ax.plot([m["baseline_flops"]], [m["target_bpb"]], "D", color="black", gid="multiplier",
                label=f"A reaches B's final bpb at {m['baseline_flops']:.3g} FLOPs ({m['value']:.3g}x{how})")
        end = mean_curve(curves["a"])
        if m["extrapolated"] and end:   # the stretch of A's curve that was extended, not measured
            start = end[-1] if m["baseline_flops"] > end[-1][0] else end[0]
            ax.plot([start[0], m["baseline_flops"]], [start[1], m["target_bpb"]], "--", color=SIDE_COLORS["a"],
                    linewidth=1, gid="extrapolation")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs")
    ax.set_ylabel("val bpb (lower is better)")
    ax.set_title(f"{report['a']['label']} (A) vs {report['b']['label']} (B)")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no val bpb points in the runs' events", transform=ax.transAxes, ha="center")
    return fig


def default_compare_path(report, home=None):
    """$NANORUN_HOME/compare/{A}_vs_{B}.png, with the sides' labels made safe for a file name."""
    def safe(label):
        return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"
    return os.path.join(rundir.compare_plots_dir(home), f"{safe(report['a']['label'])}_vs_"
                                                         f"{safe(report['b']['label'])}.png")


def write_compare_plot(report, path=None, home=None):
    """Write the comparison's PNG to `path` (default: default_compare_path); returns the path written."""
    path = path or default_compare_path(report, home)
    return save(compare_figure(report, compare_curves(report, home)), path)


def render_paths(paths):
    return "plots:\n" + "\n".join(f"  {p}" for p in paths)

