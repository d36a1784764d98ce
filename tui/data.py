"""
What the TUI shows: run and stage directories read through the run-directory contract (nanochat.rundir), and the
registry's leaderboard.

The run directories are the source of truth, so the runs table and run detail read them directly and never
hold the DuckDB file open (a training process or `nanorun apply` may be writing it). Only the leaderboard goes
through the registry, with a short-lived read-only connection; while a writer holds the registry the screen says
"registry busy" (there is one leaderboard, the registry's). No torch here: this module must import in milliseconds.

    from tui import data
    for run in data.load_runs(home): print(run["run_id"], run["val_bpb"])
"""

import os
import time

from nanochat import rundir

# result.json metric names differ a little between stages; the first present one wins
VAL_BPB_KEYS = ("val_bpb", "val/bpb", "bpb", "min_val_bpb")
CORE_KEYS = ("core", "core_metric", "core_score", "CORE", "eval/core")
TRAIN_TIME_KEYS = ("train_time_sec", "training_time_sec", "total_training_time", "train_seconds")
TRAINING_STAGES = ("base_train",)


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


def run_metrics(run):
    """Final metrics of a run merged over its stages in order (later stages win, e.g. base_eval's CORE)."""
    merged = {}
    for stage in run.get("stages") or []:
        merged.update(rundir.result_metrics(stage.get("result")))
    return merged


def training_seconds(run):
    """Pretraining wall time as nanochat counts it: the training loop's own clock, else the stage's wall time."""
    for stage in run.get("stages") or []:
        if stage.get("stage") in TRAINING_STAGES:
            seconds = first_key(rundir.result_metrics(stage.get("result")), TRAIN_TIME_KEYS)
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
    rows = []
    for run_id in rundir.run_ids(home):
        try:
            rows.append(summarize(rundir.load_run(run_id, home)))
        except rundir.RunDirError:
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
# events.jsonl (tailed with nanochat.rundir.EventTail)


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
    try:
        config = rundir.read_json(os.path.join(stage_dir, "config.json"), {})
    except rundir.RunDirError:
        return None
    return find_key(config, ("num_iterations", "iterations"))


# -----------------------------------------------------------------------------
# Leaderboard: the registry's (registry.queries.leaderboard), never recomputed here

LEADERBOARD_COLUMNS = ["rank", "name", "hardware", "n", "hours", "hours_std", "val_bpb", "core_metric", "core_std",
                       "cost_usd", "reason"]


def leaderboard(home, timeout=2.0):
    """(columns, rows, status) of the time-to-GPT-2 ranking, qualified entries first, then every other run with
    the reason it does not qualify. Ingests new run directories into the registry (a short write, as the CLI
    does), then reads it with a short-lived read-only connection. While a writer holds the registry, rows is None
    and status says "registry busy"; any other registry problem is a one-line status too."""
    from registry import RegistryLocked, ingest, queries  # noqa: PLC0415 (duckdb is only needed here)
    from specs.errors import NanorunError  # noqa: PLC0415

    try:
        ingest.sync(home=home, timeout=timeout)
        table = queries.leaderboard(home=home, timeout=timeout)
    except RegistryLocked:
        return LEADERBOARD_COLUMNS, None, "registry busy: another nanorun process is writing it; press r to retry"
    except NanorunError as e:
        return LEADERBOARD_COLUMNS, None, f"registry unavailable: {str(e).splitlines()[0][:120]}"
    for row, label in zip(table, queries.recipe_labels(table)):
        row["name"] = label
    return LEADERBOARD_COLUMNS, [[row.get(c) for c in LEADERBOARD_COLUMNS] for row in table], "registry"


# -----------------------------------------------------------------------------
# Studies: their records and the cells' run directories (registry.studies); fitted here, never written


def load_studies(home):
    """One row per study under $NANORUN_HOME/studies: {"study", "spec_path", "cells", "done", "running", "failed",
    "pending" (every other current cell: not started, interrupted, deleted from disk), "error"}."""
    from registry.studies import read_cells, read_study  # noqa: PLC0415 (numpy loads with the Studies screen)

    rows = []
    for name in rundir.study_names(home):
        row = {"study": name, "spec_path": None, "cells": 0, "done": 0, "running": 0, "failed": 0, "pending": 0,
               "error": None}
        try:
            record = read_study(name, home)
        except rundir.RunDirError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        cells = [c for c in read_cells(record, home) if not c["retired"]]
        row["spec_path"], row["cells"] = record.get("spec_path"), len(cells)
        for cell in cells:
            state = cell["state"] if cell["state"] in ("done", "running", "failed") else "pending"
            row[state] += 1
        rows.append(row)
    return rows


def study_fit(home, name, convention="scaling"):
    """(report, None) with registry.studies.fit_report's isoFLOP fit of a study, or (None, the one-line reason there
    is none: no finished cells, too few points, a broken record)."""
    from registry.studies import fit_report  # noqa: PLC0415
    from specs.errors import NanorunError  # noqa: PLC0415

    try:
        return fit_report(name, convention, home), None
    except (NanorunError, rundir.RunDirError) as e:
        return None, str(e).splitlines()[0]


def laws_text(fit):
    """The laws across budgets of one metric's fit, on one line: exponents with their bootstrap intervals."""
    if fit is None:
        return "no fit"
    if "budgets" not in fit:
        return f"no fit: {fit['error']}"
    if not fit["exponents"]:
        return f"no laws across budgets: {fit['reason']}"

    def law(name, e):
        ci = f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None else ""
        return f"{name} ~ C^{e['value']:.3f}{ci}"
    ratio = fit["ratio"]
    return (f"{law('N*', fit['exponents']['a'])}   {law('D*', fit['exponents']['b'])}   ({fit['confidence']:.0%} "
            f"bootstrap intervals over {len(fit['used'])} budgets)   tokens:params {ratio['min']:.1f}-"
            f"{ratio['max']:.1f}")


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


def find_checkpoints(run):
    """Chat-able checkpoints of a loaded run (nanochat.rundir.load_run), preferred first (chat stages, then the
    latest other one): [{label, stage, checkpoint_dir, tokenizer_dir, chat}]."""
    tokenizer_dir = rundir.run_tokenizer(run)
    return [{"label": f"{stage}  {directory}", "stage": stage, "checkpoint_dir": directory,
             "tokenizer_dir": tokenizer_dir, "chat": stage in rundir.CHAT_STAGES}
            for stage, directory in rundir.run_checkpoints(run)]
