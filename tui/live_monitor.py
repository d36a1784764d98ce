"""
The live monitor widget: tails one stage's events.jsonl every second and draws loss, val bpb, tok/s and MFU as
sparklines with their latest values, plus the step, ETA and the last generated samples.

It reads the file directly (never the registry), so it works while the training process is writing. Used by the
run detail screen; `poll()` may also be called directly (the `r` key does).
"""

import os

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Sparkline, Static

from nanochat import rundir
from tui import data

# (metric name in events.jsonl, label, digits); both the reference names and nanochat's log names are accepted
SERIES = [
    (("train/loss_smooth", "train/loss", "train_loss", "loss"), "loss", 4),
    (("val/bpb", "val_bpb"), "val bpb", 4),
    (("train/tok_per_sec", "train_tok_per_sec", "tok_per_sec"), "tok/s", 0),
    (("train/mfu", "train_mfu", "mfu"), "MFU %", 2),
]
MAX_POINTS = 400  # sparkline history kept per series


def sample_text(event):
    """The sampled text with its prompt; stages log text either with the prompt already in front or without."""
    prompt, text = str(event.get("prompt", "")), str(event.get("text", ""))
    return text if text.startswith(prompt) else prompt + text


class MetricsUpdated(Message):
    """New metric lines arrived; `step` is the latest step seen."""

    def __init__(self, step):
        super().__init__()
        self.step = step


class LiveMonitor(Vertical):
    def __init__(self, stage_dir, stage_name="", interval=1.0, **kwargs):
        super().__init__(**kwargs)
        self.stage_dir = stage_dir
        self.stage_name = stage_name
        self.interval = interval
        self.tail = rundir.EventTail(os.path.join(stage_dir, "events.jsonl"))
        self.series = {label: [] for _, label, _ in SERIES}
        self.metric_events = []
        self.samples = []
        self.status = None
        self.total_steps = data.stage_total_steps(stage_dir)

    def compose(self) -> ComposeResult:
        yield Static("", id="monitor-header", markup=False)
        for _, label, _ in SERIES:
            slug = label.replace(" ", "-").replace("/", "-").replace("%", "pct")
            with Horizontal(classes="series"):
                yield Static(label, classes="series-label", id=f"label-{slug}", markup=False)
                yield Sparkline([], id=f"spark-{slug}", classes="series-spark")
        yield Static("", id="monitor-samples", markup=False)

    def on_mount(self):
        self.poll()
        if self.interval:
            self.set_interval(self.interval, self.poll, name="poll-events")

    @property
    def last_step(self):
        steps = [e["step"] for e in self.metric_events if isinstance(e.get("step"), (int, float))]
        return max(steps) if steps else None  # eval lines may be logged after later train steps

    def poll(self):
        """Read lines appended since the last poll and redraw what changed."""
        new_metrics = 0
        for event in self.tail.poll():
            kind = event.get("kind")
            if kind == "metric":
                new_metrics += 1
                self.metric_events.append(event)
                values = event.get("values") or {}
                for names, label, _ in SERIES:
                    value = data.first_key(values, names)
                    if isinstance(value, (int, float)):
                        self.series[label] = (self.series[label] + [float(value)])[-MAX_POINTS:]
            elif kind == "sample":
                self.samples = (self.samples + [event])[-3:]
            elif kind == "status":
                self.status = event.get("status")
        self.metric_events = self.metric_events[-MAX_POINTS:]
        self.redraw()
        if new_metrics:
            self.post_message(MetricsUpdated(self.last_step))

    def redraw(self):
        for _, label, digits in SERIES:
            slug = label.replace(" ", "-").replace("/", "-").replace("%", "pct")
            points = self.series[label]
            last = data.fmt(points[-1], digits) if points else "-"
            self.query_one(f"#label-{slug}", Static).update(f"{label:<8} {last:>12}")
            self.query_one(f"#spark-{slug}", Sparkline).data = points
        step = self.last_step
        total = f"/{self.total_steps}" if self.total_steps else ""
        eta = data.eta_seconds(self.metric_events, self.total_steps)
        header = (f"{self.stage_name or 'stage'} [{self.status or 'no status yet'}]  "
                  f"step {'-' if step is None else step}{total}  ETA {data.fmt_duration(eta)}")
        self.query_one("#monitor-header", Static).update(header)
        lines = [f"step {s.get('step', '?')}: {sample_text(s)}" for s in self.samples]
        self.query_one("#monitor-samples", Static).update("\n".join(lines) or "no samples yet")
