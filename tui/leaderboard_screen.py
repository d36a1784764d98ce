"""
The leaderboard screen: nanochat's "time to GPT-2" ranking (CORE >= 0.256525, fastest pretraining first).

Rows come from the registry's leaderboard query in a background worker (the registry may be locked by a writer
and is retried there for a moment); while it stays locked the status line says "registry busy" and `r` retries.
Opened with `l`; escape goes back.
"""

from textual import work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from tui import data


LABELS = {"hours": "train time", "hours_std": "+-", "val_bpb": "val bpb", "core_metric": "CORE", "core_std": "+-",
          "cost_usd": "cost $"}


def fmt_cell(column, value):
    if value is None:
        return "-"
    if column in ("hours", "hours_std"):
        return data.fmt_duration(value * 3600)
    if column == "cost_usd":
        return data.fmt(value, 2)
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return data.fmt(value)


class LeaderboardScreen(Screen):
    BINDINGS = [("escape", "app.back", "Back")]

    def __init__(self, home):
        super().__init__()
        self.home = home

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading leaderboard...", id="leaderboard-status", markup=False)
        yield DataTable(id="leaderboard-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self):
        from registry.db import CORE_THRESHOLD  # noqa: PLC0415 (duckdb loads with this screen, not with the app)
        self.title, self.sub_title = "leaderboard", f"time to GPT-2 (CORE >= {CORE_THRESHOLD})"
        self.reload()

    def reload(self):
        self.load_leaderboard()

    @work(thread=True, exclusive=True, name="load-leaderboard")
    def load_leaderboard(self):
        columns, rows, source = data.leaderboard(self.home)
        self.app.call_from_thread(self.show, columns, rows, source)

    def show(self, columns, rows, source):
        status = self.query_one("#leaderboard-status", Static)
        if rows is None:  # the registry is busy or unusable: keep what is shown, say why it is not fresh
            status.update(source)
            return
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for column in columns:
            table.add_column(LABELS.get(column, column), key=column)
        for row in rows:
            table.add_row(*(fmt_cell(c, v) for c, v in zip(columns, row)))
        ranked = sum(row[0] is not None for row in rows)
        status.update(f"{ranked} ranked, {len(rows) - ranked} not qualifying (from the {source})")
