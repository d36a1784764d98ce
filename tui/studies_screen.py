"""
The Studies screen: every study under $NANORUN_HOME/studies with its cells done / running / failed / pending, and
for the highlighted one the isoFLOP fit of `nanorun study show` (registry.studies.fit_report, computed in a worker
and not written to the registry): the laws across budgets, the per-budget optima table and the isoFLOP curves as a
terminal plot (textual-plotext; the PNGs are `nanorun study show`'s).

Opened with `s`; `m` switches between val bpb and CORE (when the study has CORE); `r` re-reads; escape goes back.
"""

import math

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from tui import data

STUDY_COLUMNS = [("study", "study"), ("cells", "cells"), ("done", "done"), ("running", "running"),
                 ("failed", "failed"), ("pending", "pending"), ("spec_path", "spec")]
METRIC_NAMES = {"val_bpb": "val bpb", "core_metric": "CORE"}
PLOT_COLORS = ["cyan", "magenta", "green", "yellow", "blue", "orange", "white"]   # plotext color names
OUTSIDE = ("vertex_below_grid", "vertex_above_grid")


def _g(x):
    return "-" if x is None else f"{x:.3g}"


def optima_rows(fit):
    """The per-budget rows of one metric's fit, as `nanorun study show` prints them."""
    rows = []
    for r in fit["budgets"]:
        lo, hi = r.get("n_range") or (None, None)
        rows.append((f"{r['budget']:.3g}", str(r["n_points"]), f"{_g(lo)}-{_g(hi)}" if lo else "-", _g(r["n_star"]),
                     _g(r["d_star"]), "-" if r["ratio"] is None else f"{r['ratio']:.1f}",
                     "-" if r["value_at_vertex"] is None else f"{r['value_at_vertex']:.4f}",
                     ", ".join(r["flags"]) or "ok"))
    return rows


class StudiesScreen(Screen):
    BINDINGS = [("escape", "app.back", "Back"), ("m", "switch_metric", "val bpb / CORE")]

    def __init__(self, home):
        super().__init__()
        self.home = home
        self.rows = []
        self.study = None      # the study shown below the table
        self.report = None     # its fit_report, None until fitted (or when it cannot be)
        self.metric = "val_bpb"
        self.curves = []       # what the plot shows: registry.studies.isoflop_curves of the report

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="studies-summary", markup=False)
        yield DataTable(id="studies-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="study-laws", markup=False)
        with Horizontal(id="study-body"):
            yield DataTable(id="optima-table", zebra_stripes=True)
            yield PlotextPlot(id="isoflop-plot")
        yield Footer()

    def on_mount(self):
        self.title, self.sub_title = "studies", self.home
        table = self.query_one("#studies-table", DataTable)
        for key, label in STUDY_COLUMNS:
            table.add_column(label, key=key)
        self.reload()
        table.focus()

    def reload(self):
        self.rows = data.load_studies(self.home)
        table = self.query_one("#studies-table", DataTable)
        keep = self.study
        table.clear()
        for row in self.rows:
            table.add_row(*("-" if row[key] is None else str(row[key]) for key, _ in STUDY_COLUMNS), key=row["study"])
        names = [row["study"] for row in self.rows]
        summary = self.query_one("#studies-summary", Static)
        if not names:
            summary.update(f"no studies under {self.home}/studies: `nanorun apply` a spec with a sweep: block")
            return
        summary.update(f"{len(names)} stud{'y' if len(names) == 1 else 'ies'}  -  enter: fit and isoFLOP curves  "
                       f"m: val bpb / CORE  r: refresh  escape: back")
        name = keep if keep in names else names[0]
        table.move_cursor(row=names.index(name))
        self.open_study(name)   # again on refresh: cells may have finished since

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted):
        if event.data_table.id == "studies-table" and event.row_key.value != self.study:
            self.open_study(event.row_key.value)

    def on_data_table_row_selected(self, event: DataTable.RowSelected):
        if event.data_table.id == "studies-table":
            self.open_study(event.row_key.value)

    def open_study(self, name):
        self.study, self.report = name, None
        self.query_one("#study-laws", Static).update(f"fitting {name}...")
        self.fit_study(name)

    @work(thread=True, exclusive=True, name="fit-study")
    def fit_study(self, name):
        try:
            report, error = data.study_fit(self.home, name)
            self.app.call_from_thread(self.show_fit, name, report, error)
        except Exception as e:  # noqa: BLE001 (shown to the user; the app keeps running)
            self.app.call_from_thread(self.notify, f"study {name}: {type(e).__name__}: {e}", severity="error",
                                      timeout=10)

    def show_fit(self, name, report, error):
        if name != self.study:   # the user moved on while this one was fitted
            return
        self.report = report
        if report is None:
            self.query_one("#study-laws", Static).update(f"study {name}: {error}")
            self.query_one("#optima-table", DataTable).clear(columns=True)
            self.curves = []
            self.draw()
            return
        if not (report["fits"].get(self.metric) or {}).get("budgets"):
            self.metric = "val_bpb"
        self.show_metric()

    def action_switch_metric(self):
        if self.report is None:
            return
        other = "core_metric" if self.metric == "val_bpb" else "val_bpb"
        if not (self.report["fits"].get(other) or {}).get("budgets"):
            self.notify(f"study {self.study} has no {METRIC_NAMES[other]} fit (CORE needs every task evaluated)",
                        severity="warning")
            return
        self.metric = other
        self.show_metric()

    def show_metric(self):
        from registry.studies import isoflop_curves  # noqa: PLC0415 (numpy loads with the fit, not the app)

        fit = self.report["fits"][self.metric]
        name = METRIC_NAMES[self.metric]
        states = ", ".join(f"{k} {v}" for k, v in self.report["states"].items())
        self.query_one("#study-laws", Static).update(
            f"study {self.study} ({self.report['cells']} cells: {states}; N: --params {self.report['params']})  "
            f"{name}: {data.laws_text(fit)}")
        table = self.query_one("#optima-table", DataTable)
        table.clear(columns=True)
        for label in ("budget", "cells", "N measured", "N*", "D*", "D*/N*", f"{name}*", "flags"):
            table.add_column(label, key=label)
        for row in optima_rows(fit):
            table.add_row(*row)
        self.curves = isoflop_curves(self.report, self.metric)
        self.draw()

    def draw(self):
        """The isoFLOP curves of self.curves: per budget its cells (dots), the fitted quadratic (a line) and the
        vertex N* (a star; an x in red when outside the grid), against log10 N. (The axis is log10 N on a linear
        scale, labelled in N: plotext's own log scale breaks when a plot is built twice, as every resize does.)"""
        widget = self.query_one("#isoflop-plot", PlotextPlot)
        plt = widget.plt
        plt.clear_figure()
        if not self.curves:
            plt.title("no isoFLOP fit")
            widget.refresh()
            return
        plt.title(f"{METRIC_NAMES[self.metric]} vs N (log) per FLOP budget: quadratic fit, vertex N*")

        def logs(points):
            return [math.log10(n) for n, _ in points], [v for _, v in points]
        for curve, color in zip(self.curves, PLOT_COLORS * len(self.curves)):
            if curve["curve"]:
                plt.plot(*logs(curve["curve"]), color=color)
            if curve["cells"]:
                plt.scatter(*logs(curve["cells"]), color=color, marker="o", label=f"C={curve['budget']:.3g}")
            if curve["vertex"] is not None:
                outside = any(f in OUTSIDE for f in curve["flags"])
                plt.scatter(*logs([curve["vertex"]]), color="red" if outside else color, marker="x" if outside else "*")
        xs = [x for c in self.curves for x in logs(c["cells"] + c["curve"])[0]]
        ticks = [min(xs) + (max(xs) - min(xs)) * i / 4 for i in range(5)]
        plt.xticks(ticks, [f"{10 ** t:.2g}" for t in ticks])
        plt.xlabel(f"N (--params {self.report['params']})")
        widget.refresh()
