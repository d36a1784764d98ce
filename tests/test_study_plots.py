"""
Plots of studies and comparisons (issue 12 item 6): the matplotlib figures hold what they should (a fitted curve and
a vertex per budget, out-of-grid vertices flagged, the laws with their intervals in the legend, seeds thin and the
mean bold), `nanorun study show` / `nanorun compare` write valid PNGs and list them (or say in one line how to get
them), and the TUI's Studies screen lists studies and shows a study's optima and isoFLOP curves. Synthetic studies
with known optima come from test_study_fit.

    .venv/bin/python -m pytest -q tests/test_study_plots.py
"""

import json
import os
import sys

import pytest
from click.testing import CliRunner
from textual.widgets import DataTable, Static

from registry.studies import fit_report
from runners import plots
from runners.cli import main
from runners.compare import compare
from test_study_fit import DEPTHS, SMALL_A, SMALL_BUDGETS, SMALL_K, _seeds, write_run, write_study
from tui.app import NanorunApp
from tui.runs_screen import RunsScreen
from tui.studies_screen import StudiesScreen

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def by_gid(ax):
    return {line.get_gid(): line for line in ax.lines}


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def assert_png(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width >= 600 and height >= 400, (path, width, height)
    assert 10_000 < os.path.getsize(path) < 2_000_000, path


# --- the figures ---------------------------------------------------------------------------------------------

def test_isoflop_figure_draws_cells_fit_and_vertex_per_budget(nanorun_home):
    write_study(nanorun_home)
    report = fit_report("laws", resamples=50)
    fig = plots.isoflop_figure(report)
    val, core = fig.axes
    assert val.get_xscale() == "log" and val.get_ylabel().startswith("val bpb")
    assert core.get_ylabel().startswith("CORE")
    lines = by_gid(val)
    for c in SMALL_BUDGETS:
        cells, fit, vertex = lines[f"cells {c:.3g}"], lines[f"fit {c:.3g}"], lines[f"vertex {c:.3g}"]
        assert len(cells.get_xdata()) == len(DEPTHS) and len(fit.get_xdata()) == 64
        assert vertex.get_xdata()[0] == pytest.approx(SMALL_K * c ** SMALL_A, rel=1e-6)
        assert vertex.get_marker() == "*"
        # the vertex is the bottom of the drawn parabola
        assert vertex.get_ydata()[0] == pytest.approx(min(fit.get_ydata()), abs=1e-3)
    assert len(val.lines) == 3 * len(SMALL_BUDGETS)
    assert legend_texts(val) == [f"C = {c:.3g} FLOPs" for c in SMALL_BUDGETS] + ["N* (the vertex)"]
    core_vertex = by_gid(core)["vertex 1e+15"]   # CORE is maximised at the same N*
    assert core_vertex.get_ydata()[0] == pytest.approx(max(by_gid(core)["fit 1e+15"].get_ydata()), abs=1e-3)


def test_an_out_of_grid_vertex_is_flagged_in_the_plots(nanorun_home):
    write_study(nanorun_home, name="edge", depths=[2, 4, 6], with_core=False)   # N* above d6 from 1e16 on
    report = fit_report("edge", resamples=50)
    fig = plots.isoflop_figure(report)
    assert len(fig.axes) == 1   # no CORE, no CORE panel
    lines = by_gid(fig.axes[0])
    assert "vertex 1e+15" in lines and "vertex-outside 1e+16" in lines and "vertex-outside 1e+17" in lines
    assert lines["vertex-outside 1e+17"].get_marker() == "X"
    assert lines["vertex-outside 1e+17"].get_markeredgecolor() == "red"
    # the curve is widened to reach the vertex, which lies beyond the largest N measured
    n_star = lines["vertex-outside 1e+17"].get_xdata()[0]
    assert max(lines["fit 1e+17"].get_xdata()) > n_star > max(lines["cells 1e+17"].get_xdata())
    texts = legend_texts(fig.axes[0])
    assert "C = 1e+16 FLOPs (vertex above the grid)" in texts
    assert texts[-2:] == ["N* (the vertex)", "N* outside the measured N (left out of the laws)"]
    # one usable budget: the fits plot shows the optima, no law, and says why
    fits = plots.fits_figure(report)
    n_ax = fits.axes[0]
    assert set(by_gid(n_ax)) == {"optima val_bpb", "left-out val_bpb"}
    assert list(by_gid(n_ax)["left-out val_bpb"].get_xdata()) == [1e16, 1e17]
    assert any(t.get_text().startswith("no laws: 1 budget with an optimum inside the grid") for t in n_ax.texts)


def test_fits_figure_shows_the_power_laws_with_their_intervals(nanorun_home):
    write_study(nanorun_home)
    report = fit_report("laws", resamples=100)
    fig = plots.fits_figure(report)
    n_ax, d_ax = fig.axes
    assert (n_ax.get_xscale(), n_ax.get_yscale(), d_ax.get_yscale()) == ("log", "log", "log")
    fit = report["fits"]["val_bpb"]
    optima = by_gid(n_ax)["optima val_bpb"]
    assert list(optima.get_xdata()) == SMALL_BUDGETS
    assert list(optima.get_ydata()) == pytest.approx([SMALL_K * c ** SMALL_A for c in SMALL_BUDGETS], rel=1e-6)
    law = by_gid(n_ax)["law val_bpb"]
    x, y = law.get_xdata(), law.get_ydata()
    assert y[-1] / y[0] == pytest.approx((x[-1] / x[0]) ** SMALL_A, rel=1e-6)   # a straight line of slope a
    assert by_gid(n_ax)["law core_metric"].get_linestyle() == "--"
    texts = legend_texts(n_ax)
    assert "val bpb: $N^* \\propto C^{0.500}$, 95% CI [0.500, 0.500]" in texts
    b = fit["exponents"]["b"]
    assert f"val bpb: $D^* \\propto C^{{{b['value']:.3f}}}$, 95% CI [{b['low']:.3f}, {b['high']:.3f}]" \
        in legend_texts(d_ax)


def test_compare_figure_overlays_seeds_and_means(nanorun_home):
    _seeds(nanorun_home, "base", [1.300, 1.304, 1.298])
    _seeds(nanorun_home, "wd", [1.280, 1.283, 1.279], extra="optim: {weight_decay: 0.1}\n")
    report = compare("base", "wd")
    curves = plots.compare_curves(report)
    fig = plots.compare_figure(report, curves)
    ax = fig.axes[0]
    lines = by_gid(ax)
    for side in "AB":
        seeds = [line for gid, line in lines.items() if gid.startswith(f"seed {side} ")]
        mean = lines[f"mean {side}"]
        assert len(seeds) == 3 and all(line.get_linewidth() < mean.get_linewidth() for line in seeds)
        assert len(mean.get_xdata()) == 6 and len(seeds[0].get_xdata()) == 6
        # the mean is the average of the seeds, point by point
        assert mean.get_ydata()[-1] == pytest.approx(sum(s.get_ydata()[-1] for s in seeds) / 3)
    assert lines["mean A"].get_ydata()[-1] == pytest.approx(report["a"]["mean"], rel=1e-3)
    m = report["multiplier"]
    assert lines["multiplier"].get_xdata()[0] == pytest.approx(m["baseline_flops"])
    assert "extrapolation" in lines   # A's curve extended past its last point, drawn dashed
    texts = legend_texts(ax)
    assert texts[0] == "A: each seed" and texts[1].startswith(f"A: {report['a']['label']} (mean of 3 seeds")
    assert any(t.startswith("A reaches B's final bpb at") and "extrapolated" in t for t in texts)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "FLOPs"


# --- the commands --------------------------------------------------------------------------------------------

def test_study_show_writes_and_lists_the_pngs(nanorun_home):
    write_study(nanorun_home)
    code, out, err = cli(["study", "show", "laws"])
    assert code == 0, err
    directory = os.path.join(nanorun_home, "studies", "laws", "plots")
    paths = [os.path.join(directory, "isoflop.png"), os.path.join(directory, "fits.png")]
    assert out.rstrip().endswith("plots:\n" + "\n".join(f"  {p}" for p in paths))
    for path in paths:
        assert_png(path)
    before = os.path.getmtime(paths[0])
    os.utime(paths[0], (before - 100, before - 100))
    code, out, err = cli(["study", "show", "laws", "--json"])   # refreshed; JSON lists them, stdout stays JSON
    assert code == 0 and json.loads(out)["plots"] == paths and err == ""
    assert os.path.getmtime(paths[0]) > before - 100
    # another parameter convention gets its own files
    code, out, _ = cli(["study", "show", "laws", "--params", "all", "--json"])
    assert json.loads(out)["plots"] == [os.path.join(directory, "isoflop-all.png"),
                                        os.path.join(directory, "fits-all.png")]
    assert sorted(os.listdir(directory)) == ["fits-all.png", "fits.png", "isoflop-all.png", "isoflop.png"]


def test_no_plots_and_missing_matplotlib_say_how_to_get_them(nanorun_home, monkeypatch):
    write_study(nanorun_home)
    code, out, _ = cli(["study", "show", "laws", "--no-plots"])
    assert code == 0 and out.rstrip().splitlines()[-1] == "plots: not written (--no-plots)"
    assert not os.path.exists(os.path.join(nanorun_home, "studies", "laws", "plots"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if the plots extra were not installed
    assert not plots.available()
    code, out, err = cli(["study", "show", "laws"])
    assert code == 0 and "N* " in out
    assert out.rstrip().splitlines()[-1] == "plots: not written: they need matplotlib (pip install 'nanorun[plots]')"
    code, out, err = cli(["study", "show", "laws", "--json"])
    assert code == 0 and json.loads(out)["plots"] == []
    assert err.strip() == "plots: not written: they need matplotlib (pip install 'nanorun[plots]')"
    assert not os.path.exists(os.path.join(nanorun_home, "studies", "laws", "plots"))


def test_compare_writes_its_plot_where_asked_or_to_a_default(nanorun_home, tmp_path):
    _seeds(nanorun_home, "base", [1.300, 1.304, 1.298])
    _seeds(nanorun_home, "wd", [1.280, 1.283, 1.279], extra="optim: {weight_decay: 0.1}\n")
    out_png = tmp_path / "out" / "base_vs_wd.png"
    code, out, err = cli(["compare", "base", "wd", "--plot", str(out_png)])
    assert code == 0, err
    assert out.rstrip().endswith(f"plots:\n  {out_png}") and "compute multiplier" in out
    assert_png(out_png)
    code, out, err = cli(["compare", "base", "wd", "--json"])
    assert code == 0, err
    report = json.loads(out)
    [default] = report["plots"]
    assert default == os.path.join(nanorun_home, "compare",
                                   f"{report['a']['label']}_vs_{report['b']['label']}.png")
    assert_png(default)
    code, out, _ = cli(["compare", "base", "wd", "--no-plots"])
    assert code == 0 and out.rstrip().splitlines()[-1] == "plots: not written (--no-plots)"


# --- the TUI's Studies screen --------------------------------------------------------------------------------

def cell_texts(table):
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def studies_home(home):
    write_study(home, name="fresh", pending=[(d, c) for d in DEPTHS for c in SMALL_BUDGETS])
    write_study(home, name="laws")
    write_study(home, name="mixed", pending=[(12, 1e17), (10, 1e17)])
    with open(os.path.join(home, "studies", "mixed", "study.json")) as f:
        failed = json.load(f)["cells"][0]["run_id"]
    write_run(home, failed, "mixed.depth2", depth=2, budget=1e15, val_bpb=1.0, status="failed")


async def test_studies_screen_lists_studies_and_shows_a_fit(nanorun_home):
    studies_home(nanorun_home)
    app = NanorunApp(home=nanorun_home, refresh_seconds=None)
    async with app.run_test(size=(180, 50)) as pilot:
        await pilot.pause()
        footer = [k.description for k in app.screen.query("FooterKey")]
        assert "Studies" in footer
        await pilot.press("s")
        screen = app.screen
        assert isinstance(screen, StudiesScreen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        studies = cell_texts(screen.query_one("#studies-table", DataTable))
        assert studies == [["fresh", "18", "0", "0", "0", "18", "specs/fresh.yaml"],
                           ["laws", "18", "18", "0", "0", "0", "specs/laws.yaml"],
                           ["mixed", "18", "15", "0", "1", "2", "specs/mixed.yaml"]]
        # the first study has nothing to fit yet: the reason, no table, no curves
        laws = str(screen.query_one("#study-laws", Static).render())
        assert "no finished cells to fit yet" in laws
        assert screen.query_one("#optima-table", DataTable).row_count == 0 and screen.curves == []

        await pilot.press("down")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert screen.study == "laws"
        laws = str(screen.query_one("#study-laws", Static).render())
        assert "18 cells: done 18" in laws and "N* ~ C^0.500 [0.500, 0.500]" in laws
        optima = cell_texts(screen.query_one("#optima-table", DataTable))
        assert [r[0] for r in optima] == ["1e+15", "1e+16", "1e+17"]
        assert [r[3] for r in optima] == [f"{SMALL_K * c ** SMALL_A:.3g}" for c in SMALL_BUDGETS]
        assert all(r[-1] == "ok" for r in optima)
        assert len(screen.curves) == 3 and all(len(c["cells"]) == 6 and c["vertex"] for c in screen.curves)
        plot = screen.query_one("#isoflop-plot").render().plain
        assert "val bpb vs N (log) per FLOP budget" in plot and "C=1e+15" in plot

        await pilot.press("m")   # CORE: maximised, at the same N*
        assert screen.metric == "core_metric"
        header = [str(c.label) for c in screen.query_one("#optima-table", DataTable).columns.values()]
        assert "CORE*" in header and "CORE vs N" in screen.query_one("#isoflop-plot").render().plain
        assert [r[3] for r in cell_texts(screen.query_one("#optima-table", DataTable))] == [r[3] for r in optima]

        await pilot.press("down")   # mixed: a failed and two pending cells are left out of the fit
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert screen.study == "mixed" and screen.metric == "core_metric"   # the switch holds while there is CORE
        laws = str(screen.query_one("#study-laws", Static).render())
        assert all(s in laws for s in ("18 cells:", "done 15", "failed 1", "pending 2"))
        assert [r[1] for r in cell_texts(screen.query_one("#optima-table", DataTable))] == ["5", "6", "4"]
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_studies_screen_without_studies_says_how_to_make_one(nanorun_home):
    app = NanorunApp(home=nanorun_home, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("s")
        await pilot.pause()
        summary = str(app.screen.query_one("#studies-summary", Static).render())
        assert summary.startswith("no studies under") and "sweep" in summary
