"""
What the TUI shows, read from disk: run directories ($NANORUN_HOME/runs/<run_id>/run.json), stage
directories (result.json, events.jsonl, config.json) and the registry's leaderboard.

The run directories are the source of truth, so the runs table and run detail read them directly and never
hold the DuckDB file open (a training process or `nanorun apply` may be writing it). Only the leaderboard goes
through the registry, with a short-lived read-only connection, and falls back to the run directories when the
registry is missing or locked. No torch here: this module must import in milliseconds.

    from tui import data
    for run in data.load_runs(home): print(run["run_id"], run["val_bpb"])
"""

import json
import os
import time

# nanochat's "time to GPT-2" bar: GPT-2 XL's CORE score (reference/nanochat.md section 9)
GPT2_CORE = 0.256525

# result.json metric names differ a little between stages; the first present one wins
VAL_BPB_KEYS = ("val_bpb", "val/bpb", "bpb", "min_val_bpb")
CORE_KEYS = ("core", "core_metric", "core_score", "CORE", "eval/core")
TRAIN_TIME_KEYS = ("train_time_sec", "training_time_sec", "total_training_time", "train_seconds")
TRAINING_STAGES = ("base_train",)


def read_json(path, default=None):
    """A JSON file, or `default` when it is missing or torn (a writer uses atomic renames, but be forgiving)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return default


def first_key(mapping, names):
    for name in names:
        value = (mapping or {}).get(name)
        if value is not None:
            return value
    return None


def find_key(obj, names):
    """Depth-first search of nested dicts/lists for the first of `names`; plans nest per stage."""
    if isinstance(obj, dict):
        found = first_key(obj, names)
        if found is not None:
            return found
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = find_key(child, names)
        if found is not None:
            return found
    return None


# -----------------------------------------------------------------------------
# Runs and stages


def stage_path(home, stage):
    """Absolute directory of a stage entry of run.json ("dir" may be relative to $NANORUN_HOME)."""
    directory = stage.get("dir") or os.path.join("stages", f"{stage.get('stage')}-{stage.get('key')}")
    return directory if os.path.isabs(directory) else os.path.join(home, directory)


def load_run(home, run_id):
    """run.json of one run with each stage's directory resolved and its result.json attached (or None)."""
    run = read_json(os.path.join(home, "runs", run_id, "run.json"))
    if run is None:
        raise FileNotFoundError(f"no run.json for run {run_id!r} under {os.path.join(home, 'runs')}")
    run.setdefault("run_id", run_id)
    for stage in run.get("stages") or []:
        stage["path"] = stage_path(home, stage)
        stage["result"] = read_json(os.path.join(stage["path"], "result.json"))
    return run


def run_metrics(run):
    """Final metrics of a run merged over its stages in order (later stages win, e.g. base_eval's CORE)."""
    merged = {}
    for stage in run.get("stages") or []:
        merged.update(((stage.get("result") or {}).get("metrics")) or {})
    return merged


def training_seconds(run):
    """Pretraining wall time as nanochat counts it: the training loop's own clock, else the stage's wall time."""
    for stage in run.get("stages") or []:
        if stage.get("stage") in TRAINING_STAGES:
            seconds = first_key(((stage.get("result") or {}).get("metrics")), TRAIN_TIME_KEYS)
            return seconds if seconds is not None else stage.get("wall_seconds")
    return None


def cost_usd(run, seconds):
    hardware = run.get("hardware") or {}
    price = hardware.get("usd_per_gpu_hour")
    if seconds is None or not price:
        return None
    gpus = (hardware.get("nodes") or 1) * (hardware.get("gpus_per_node") or 1)
    return seconds / 3600 * gpus * price


def summarize(run):
    """One row of the runs table."""
    metrics = run_metrics(run)
    plan = run.get("plan") or {}
    spec_name = run.get("name") or find_key(plan, ("name", "spec_name")) or ""
    seconds = training_seconds(run)
    return {
        "run_id": run.get("run_id"),
        "spec": spec_name,
        "status": run.get("status") or "unknown",
        "depth": plan_value(plan, ("n_layer", "depth")),
        "val_bpb": first_key(metrics, VAL_BPB_KEYS),
        "core": first_key(metrics, CORE_KEYS),
        "train_seconds": seconds,
        "cost_usd": cost_usd(run, seconds),
        "created_at": run.get("created_at"),
    }


def load_runs(home):
    """Summaries of every run under $NANORUN_HOME/runs, newest first; unreadable run dirs are skipped."""
    root = os.path.join(home, "runs")
    rows = []
    for run_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            rows.append(summarize(load_run(home, run_id)))
        except (FileNotFoundError, AttributeError, TypeError):
            continue
    rows.sort(key=lambda r: str(r["created_at"] or ""), reverse=True)
    return rows


def plan_value(plan, names):
    """A resolved number: runners.plan keeps them in plan["derived"]; other plans are searched."""
    derived = plan.get("derived") if isinstance(plan, dict) else None
    if isinstance(derived, dict):
        found = first_key(derived, names)
        if found is not None:
            return found
    return find_key(plan, names)


def plan_numbers(plan):
    """(label, value) pairs of the plan's key numbers for the detail view."""
    params = find_key(plan, ("params", "num_params", "params_total"))
    if isinstance(params, dict):
        params = params.get("total")
    rows = [
        ("n_layer", plan_value(plan, ("n_layer", "depth"))),
        ("n_embd", plan_value(plan, ("n_embd",))),
        ("params", params),
        ("total_batch_size", plan_value(plan, ("total_batch_size",))),
        ("iterations", plan_value(plan, ("num_iterations", "iterations"))),
        ("FLOPs", plan_value(plan, ("total_flops", "flops"))),
    ]
    return [(label, value) for label, value in rows if value is not None]


# -----------------------------------------------------------------------------
# events.jsonl


class EventTail:
    """Reads an events.jsonl incrementally: each poll() returns the complete lines appended since the last one.
    A writer flushes whole lines, but a reader can still catch half a line; it is kept until its newline lands."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # truncated or replaced: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def core_tasks(events):
    """Latest value per (suite, task, metric) from "eval" events, sorted by suite and task."""
    latest = {}
    for e in events:
        if e.get("kind") == "eval":
            latest[(str(e.get("suite", "")), str(e.get("task", "")), str(e.get("metric", "")))] = e
    return [latest[k] for k in sorted(latest)]


def eta_seconds(metric_events, total_steps):
    """Remaining seconds from the recent step rate; None until two metric lines with distinct steps exist."""
    points = sorted({(e["step"], e["time"]) for e in metric_events if "step" in e and "time" in e})
    if not total_steps or len(points) < 2:
        return None
    (s0, t0), (s1, t1) = points[max(0, len(points) - 20)], points[-1]
    if s1 <= s0 or t1 <= t0:
        return None
    return max(0.0, (total_steps - s1) * (t1 - t0) / (s1 - s0))


def stage_total_steps(stage_dir):
    """Planned iterations of a stage from its config.json, when it says."""
    return find_key(read_json(os.path.join(stage_dir, "config.json"), {}), ("num_iterations", "iterations"))


# -----------------------------------------------------------------------------
# Leaderboard

LEADERBOARD_COLUMNS = ["rank", "name", "hardware", "n", "hours", "hours_std", "val_bpb", "core_metric", "core_std",
                       "cost_usd", "reason"]


def leaderboard(home, timeout=2.0):
    """(columns, rows, source) of the time-to-GPT-2 ranking, qualified entries first, then every other run with
    the reason it does not qualify. Ingests new run directories into the registry (a short write, as the CLI
    does), then reads it with a short-lived read-only connection. When the registry is locked by a writer or
    unusable, the same ranking is computed from the run directories and `source` says so."""
    try:
        from registry import ingest, queries  # noqa: PLC0415 (duckdb is only needed here)
        from registry.db import RegistryLocked  # noqa: PLC0415

        try:
            ingest.sync(home=home, timeout=timeout)
        except RegistryLocked:  # a writer holds it: reading would wait on the same lock
            return _leaderboard_from_files(home, "run directories; the registry is locked by a writer")
        except Exception:  # noqa: BLE001 (a broken run dir: read what the registry has)
            pass
        table = queries.leaderboard(home=home)
        if table or not os.path.isdir(os.path.join(home, "runs")):
            return LEADERBOARD_COLUMNS, [[row.get(c) for c in LEADERBOARD_COLUMNS] for row in table], "registry"
    except Exception as e:  # noqa: BLE001 (any registry problem -> the run directories)
        return _leaderboard_from_files(home, f"run directories; registry: {str(e).splitlines()[0][:80]}")
    return _leaderboard_from_files(home, "run directories")


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return mean, std


def _leaderboard_from_files(home, source):
    qualified, others = {}, []
    root = os.path.join(home, "runs")
    for run_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            run = load_run(home, run_id)
        except FileNotFoundError:
            continue
        row = summarize(run)
        hw = run.get("hardware") or {}
        row["hardware"] = f"{hw.get('nodes', 1)}x{hw.get('gpus_per_node', 1)} {hw.get('gpu', '')}".strip()
        row["hours"] = row["train_seconds"] / 3600 if row["train_seconds"] is not None else None
        if row["core"] is None:
            row["reason"] = f"no CORE yet ({row['status']})"
        elif row["core"] < GPT2_CORE:
            row["reason"] = f"CORE {row['core']:.4f} < {GPT2_CORE:.4f}"
        elif row["hours"] is None:
            row["reason"] = "no training time"
        else:
            qualified.setdefault((row["spec"], row["hardware"]), []).append(row)
            continue
        others.append(row)
    rows = []
    for (name, hardware), runs in qualified.items():
        hours, hours_std = _mean_std([r["hours"] for r in runs])
        core, core_std = _mean_std([r["core"] for r in runs])
        bpbs = [r["val_bpb"] for r in runs if r["val_bpb"] is not None]
        costs = [r["cost_usd"] for r in runs if r["cost_usd"] is not None]
        rows.append([None, name, hardware, len(runs), hours, hours_std, sum(bpbs) / len(bpbs) if bpbs else None,
                     core, core_std, sum(costs) / len(costs) if costs else None, None])
    rows.sort(key=lambda r: (r[4], r[1]))
    for i, r in enumerate(rows):
        r[0] = i + 1
    rows += [[None, r["spec"], r["hardware"], 1, r["hours"], None, r["val_bpb"], r["core"], None, r["cost_usd"],
              r["reason"]] for r in others]
    return LEADERBOARD_COLUMNS, rows, source


# -----------------------------------------------------------------------------
# Formatting


def fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) < 1e12 else f"{value:.3e}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e9 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def fmt_time(value):
    """created_at may be unix seconds or an ISO string; show minutes, no seconds or zone."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value).replace("T", " ")[:16]


# -----------------------------------------------------------------------------
# Checkpoints for the chat pane

CHAT_STAGES = ("sft", "rl")  # stages whose checkpoints were trained on rendered conversations


def find_checkpoints(run):
    """Chat-able checkpoints of a loaded run, latest stage first: [{label, stage, checkpoint_dir,
    tokenizer_dir, chat}]. The tokenizer comes from the run's tok_train stage."""
    stages = run.get("stages") or []
    tokenizer_dir = None
    for s in stages:
        tokenizer_dir = ((s.get("result") or {}).get("outputs") or {}).get("tokenizer_dir") or tokenizer_dir
    found = []
    for s in stages:
        checkpoint_dir = ((s.get("result") or {}).get("outputs") or {}).get("checkpoint_dir")
        if checkpoint_dir:
            name = s.get("stage", "?")
            found.append({"label": f"{name}  {checkpoint_dir}", "stage": name, "checkpoint_dir": checkpoint_dir,
                          "tokenizer_dir": tokenizer_dir, "chat": name in CHAT_STAGES})
    return found[::-1]
