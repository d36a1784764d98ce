"""
The run detail screen: spec YAML, the plan's key numbers, the stage table, a live monitor of the running stage
(or of pretraining once the run is done), final metrics and CORE per task.

Pushed by the app on RunSelected; escape goes back to the runs table, `r` reloads, `c` opens the chat.
"""

import os

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from nanochat import rundir
from tui import data
from tui.live_monitor import LiveMonitor, MetricsUpdated


def monitored_stage(run):
    """The stage worth watching: a running one, else pretraining, else the last stage that has events."""
    stages = [s for s in run.get("stages") or [] if os.path.exists(os.path.join(s["path"], "events.jsonl"))]
    for rule in (lambda s: s.get("status") == "running", lambda s: s.get("stage") == "base_train", lambda s: True):
        matches = [s for s in stages if rule(s)]
        if matches:
            return matches[-1]
    return None


def flat_metrics(metrics, prefix=""):
    """{"a": 1, "b": {"c": 2}} -> [("a", 1), ("b.c", 2)]; lists are skipped (the tables show scalars)."""
    rows = []
    for name, value in sorted((metrics or {}).items()):
        if isinstance(value, dict):
            rows += flat_metrics(value, f"{prefix}{name}.")
        elif not isinstance(value, list):
            rows.append((f"{prefix}{name}", value))
    return rows


def read_events(path):
    return rundir.EventTail(path).poll()


class RunDetailScreen(Screen):
    BINDINGS = [("escape", "app.back", "Back")]

    def __init__(self, home, run_id, monitor_seconds=1.0):
        super().__init__()
        self.home = home
        self.run_id = run_id
        self.monitor_seconds = monitor_seconds
        self.run = rundir.load_run(run_id, home)

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="detail"):
            yield Static("", id="detail-title", markup=False)
            with Horizontal(id="detail-top"):
                with Vertical(id="spec-box"):
                    yield Static("spec", classes="section")
                    yield Static(self.run.get("spec_yaml") or "(no spec_yaml in run.json)", id="spec-yaml",
                                 markup=False)
                with Vertical(id="plan-box"):
                    yield Static("plan", classes="section")
                    yield DataTable(id="plan-table", show_cursor=False)
            yield Static("stages", classes="section")
            yield DataTable(id="stages-table", cursor_type="row")
            yield Static("live monitor", classes="section")
            stage = monitored_stage(self.run)
            if stage is None:
                yield Static("no stage has written events.jsonl yet", id="no-monitor")
            else:
                yield LiveMonitor(stage["path"], stage.get("stage", ""), interval=self.monitor_seconds,
                                  id="monitor")
            with Horizontal(id="detail-results"):
                with Vertical():
                    yield Static("final metrics", classes="section")
                    yield DataTable(id="metrics-table", show_cursor=False)
                with Vertical():
                    yield Static("CORE per task", classes="section")
                    yield DataTable(id="core-table", show_cursor=False)
        yield Footer()

    def on_mount(self):
        self.title = f"run {self.run_id}"
        self.query_one("#plan-table", DataTable).add_columns("quantity", "value")
        self.query_one("#stages-table", DataTable).add_columns("stage", "status", "wall time", "exit", "key",
                                                               "error")
        self.query_one("#metrics-table", DataTable).add_columns("metric", "value")
        self.query_one("#core-table", DataTable).add_columns("suite", "task", "metric", "value")
        self.fill()

    def reload(self):
        if self.load():
            self.fill()
        for monitor in self.query(LiveMonitor):
            monitor.poll()

    def on_metrics_updated(self, event: MetricsUpdated):
        # the stage is making progress: re-read run.json too, so stage statuses and results follow it
        if self.load():
            self.fill()

    def load(self):
        """Re-read the run; an unusable run.json (removed, torn by hand) keeps what is shown and says why."""
        try:
            self.run = rundir.load_run(self.run_id, self.home)
            return True
        except rundir.RunDirError as e:
            self.notify(str(e), severity="error")
            return False

    def fill(self):
        run = self.run
        summary = data.summarize(run)
        self.sub_title = summary["spec"]
        self.query_one("#detail-title", Static).update(
            f"{self.run_id}  status: {summary['status']}  spec: {summary['spec']}  "
            f"created: {data.fmt_time(summary['created_at'])}  train time: {data.fmt_duration(summary['train_seconds'])}")

        plan = self.query_one("#plan-table", DataTable)
        plan.clear()
        for label, value in data.plan_numbers(run.get("plan") or {}):
            plan.add_row(label, data.fmt(value))

        stages = self.query_one("#stages-table", DataTable)
        stages.clear()
        for s in run.get("stages") or []:
            stages.add_row(s.get("stage", "?"), s.get("status", "?"), data.fmt_duration(s.get("wall_seconds")),
                           data.fmt(s.get("exit_code")), str(s.get("key", ""))[:12], (s.get("error") or "")[:60])

        metrics = self.query_one("#metrics-table", DataTable)
        metrics.clear()
        for name, value in flat_metrics(data.run_metrics(run)):
            metrics.add_row(name, data.fmt(value))

        core = self.query_one("#core-table", DataTable)
        core.clear()
        events = []
        for s in run.get("stages") or []:
            events += read_events(os.path.join(s["path"], "events.jsonl"))
        for e in data.core_tasks(events):
            core.add_row(str(e.get("suite", "")), str(e.get("task", "")), str(e.get("metric", "")),
                         data.fmt(e.get("value")))
