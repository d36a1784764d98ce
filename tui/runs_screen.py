"""
The runs screen: one sortable DataTable row per run directory under $NANORUN_HOME/runs, refreshed on a timer.
Enter posts RunSelected (the app opens the detail); clicking a column header sorts by it (again: reverse).

Opened by `python -m tui` / `nanorun tui` as the app's first screen.
"""

from textual.app import ComposeResult
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from tui import data

# (column key, header label, formatter of the raw value)
COLUMNS = [
    ("run_id", "run", str),
    ("spec", "spec", str),
    ("status", "status", str),
    ("depth", "depth", data.fmt),
    ("val_bpb", "val bpb", data.fmt),
    ("core", "CORE", data.fmt),
    ("train_seconds", "train time", data.fmt_duration),
    ("cost_usd", "cost $", lambda v: data.fmt(v, 2)),
    ("created_at", "created", data.fmt_time),
]


class RunSelected(Message):
    """The user picked a run (Enter on its row)."""

    def __init__(self, run_id):
        super().__init__()
        self.run_id = run_id


class RunsScreen(Screen):
    def __init__(self, home, refresh_seconds=None):
        super().__init__()
        self.home = home
        self.refresh_seconds = refresh_seconds  # None: no timer (tests refresh explicitly)
        self.rows = []
        self.sort_key = "created_at"
        self.sort_reverse = True

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="runs-summary")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self):
        self.title, self.sub_title = "nanorun", self.home
        table = self.query_one(DataTable)
        for key, label, _ in COLUMNS:
            table.add_column(label, key=key)
        self.reload()
        if self.refresh_seconds:
            self.set_interval(self.refresh_seconds, self.reload, name="refresh-runs")
        table.focus()

    @property
    def run_id(self):
        """The highlighted run, so `c` (chat) works straight from the table."""
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def reload(self):
        self.rows = data.load_runs(self.home)
        self.populate()

    def populate(self):
        table = self.query_one(DataTable)
        keep = self.run_id
        table.clear()
        # None sorts last whatever the direction; mixed types compare as strings
        present = [r for r in self.rows if r[self.sort_key] is not None]
        missing = [r for r in self.rows if r[self.sort_key] is None]
        numeric = all(isinstance(r[self.sort_key], (int, float)) for r in present)
        present.sort(key=lambda r: r[self.sort_key] if numeric else str(r[self.sort_key]), reverse=self.sort_reverse)
        for row in present + missing:
            table.add_row(*(fmt(row[key]) for key, _, fmt in COLUMNS), key=row["run_id"])
        if keep is not None and keep in {r["run_id"] for r in self.rows}:
            table.move_cursor(row=table.get_row_index(keep))
        running = sum(r["status"] == "running" for r in self.rows)
        self.query_one("#runs-summary", Static).update(
            f"{len(self.rows)} runs, {running} running  -  enter: details  l: leaderboard  s: studies  c: chat  "
            f"r: refresh")

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected):
        key = event.column_key.value
        self.sort_reverse = not self.sort_reverse if key == self.sort_key else False
        self.sort_key = key
        self.populate()

    def on_data_table_row_selected(self, event: DataTable.RowSelected):
        self.post_message(RunSelected(event.row_key.value))
