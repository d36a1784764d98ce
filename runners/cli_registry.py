"""
Registry commands of the nanorun CLI: runs, show, leaderboard, query, registry rebuild|sync|path.

    nanorun runs
    nanorun show cpu_demo-1a2b --json
    nanorun leaderboard --qualified
    nanorun query "select name, val_bpb, core_metric from run_summary" --csv
    nanorun registry rebuild

Read commands first ingest run directories that changed since the last ingest (a quick `sync`) when they can get
the write lock right away; when another process holds it they read what the database already has.
Each command is a thin shell over registry/*; nothing here imports torch. Text output fits $COLUMNS (or the
terminal, or 100 columns): long cells and samples are cut there, never in --json.
"""

import csv
import datetime
import decimal
import io
import json
import math
import os
import shutil
import textwrap

import click

from runners.cli import main


def _sync():
    from registry import RegistryLocked, sync
    try:
        sync(timeout=0)
    except RegistryLocked:
        pass  # someone else is writing (or reading); show what the database has


def _finite(obj):
    """NaN and +-Infinity (valid DOUBLEs in DuckDB, not valid JSON) become null; DECIMALs become numbers."""
    if isinstance(obj, decimal.Decimal):
        obj = float(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _echo_json(obj):
    click.echo(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False))


# -----------------------------------------------------------------------------
# Plain aligned text tables


def when(t, same_day_as=None):
    """Local date and time; only the time when it falls on the same day as `same_day_as`."""
    if t is None:
        return "-"
    day = datetime.datetime.fromtimestamp(t)
    if same_day_as is not None and datetime.datetime.fromtimestamp(same_day_as).date() == day.date():
        return day.strftime("%H:%M")
    return day.strftime("%Y-%m-%d %H:%M")


def duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def num(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)


def clean(text):
    """One line of printable text: whitespace becomes a space, other control characters (an ESC from a
    model's sample would drive the terminal) are shown escaped."""
    return "".join(ch if ch.isprintable() else " " if ch.isspace() else ascii(ch)[1:-1] for ch in text)


def clip(text, width):
    """`text` cut to `width` characters, marked with '...' when cut (None: no limit)."""
    return text if width is None or len(text) <= width else text[:max(width - 3, 0)] + "..."


def cell(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, (list, dict)):
        return clean(json.dumps(x, default=str))
    return clean(str(x))


def format_table(columns, rows, max_widths=None):
    """Columns padded to their widest cell; numbers right-aligned. max_widths: {column index: characters}
    cuts long cells (the --json output of a command stays complete)."""
    max_widths = max_widths or {}
    text = [[clip(cell(v), max_widths.get(i)) for i, v in enumerate(row)] for row in rows]
    widths = [max([len(str(c))] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    right = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                                for r in rows if r[i] is not None) for i in range(len(columns))]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out = [line([str(c) for c in columns]), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in text])


def term_width():
    """$COLUMNS, else the terminal's width, else 100; kept within 60..200."""
    try:
        width = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        width = 0
    return min(max(width or shutil.get_terminal_size((100, 24)).columns, 60), 200)


def wrap(text, width, indent="    ", max_lines=3):
    """Readable multi-line text: cleaned, wrapped to `width`, at most `max_lines` lines (the last marked '...')."""
    lines = textwrap.wrap(clean(text).strip(), width - len(indent)) or [""]
    if len(lines) > max_lines:
        lines, room = lines[:max_lines], width - len(indent) - 4
        last = lines[-1] if len(lines[-1]) <= room else lines[-1][:room].rsplit(" ", 1)[0]
        lines[-1] = last + " ..."
    return "\n".join(indent + line for line in lines)


def format_run(detail, width=100):
    """The text of `nanorun show` for a get_run() detail: summary lines, stage/metric/CORE tables and the last
    samples, each line at most `width` characters (long cells and samples are cut; --json keeps them whole)."""
    from registry import CORE_NUM_TASKS
    out = []
    r, s = detail["run"], detail["summary"]
    price = f"${r['usd_per_gpu_hour']:.2f}/GPU-h" if r["usd_per_gpu_hour"] else "no $/GPU-h set"
    out.append(f"run       {r['run_id']}  ({r['status']})")
    out.append(f"spec      {r['name']}  {r['spec_path'] or ''}  hash {(r['spec_hash'] or '-')[:12]}")
    out.append(f"hardware  {s['hardware']} on {r['host'] or '-'}, {price}; "
               f"depth {cell(r['depth'])}, seed {cell(r['seed'])}, commit {(r['git_commit'] or '-')[:12]}")
    out.append(f"times     created {when(r['created_at'])}, started {when(r['started_at'], r['created_at'])}, "
               f"finished {when(r['finished_at'], r['created_at'])}, wall {duration(s['wall_seconds'])}")
    out.append(f"result    val_bpb {num(s['val_bpb'])}, CORE {num(s['core_metric'])}"
               f"{' (partial)' if s['core_partial'] else ''}, training {duration(s['total_training_time'])} "
               f"(wall {duration(s['train_wall_seconds'])}), cost ${num(s['cost_usd'], '.2f')}")
    out.append(f"board     {'qualifies' if s['qualified'] else s['reason']}")
    out.append("")
    out.append(format_table(["#", "stage", "key", "status", "started", "wall", "exit", "error"],
                            [[x["idx"], x["stage"], x["key"][:8] if x["key"] else "-", x["status"],
                              when(x["started_at"]), duration(x["wall_seconds"]), x["exit_code"], x["error"]]
                             for x in detail["stages"]], {7: max(width - 70, 20)}))
    metric_rows = []
    for x in detail["stages"]:
        for name, value in x["result"].items():
            metric_rows.append([x["stage"], name, value, "result"])
        for name, point in x["last_metrics"].items():
            # the last logged point, unless result.json has the same figure (val/bpb -> val_bpb)
            if name not in x["result"] and name.replace("/", "_") not in x["result"]:
                metric_rows.append([x["stage"], name, point["value"], f"step {point['step']}"])
    if metric_rows:
        out.append("")
        out.append(format_table(["stage", "metric", "value", "from"], metric_rows,
                                {1: 28, 2: max(width - 60, 16)}))
    core = detail["core"]
    if core:
        out.append("")
        out.append(format_table(["CORE task", "accuracy", "centered", "n"],
                                [[c["task"], c["accuracy"], c["centered"], c["n"]] for c in core], {0: 40}))
        missing = next((x["result"].get("core_missing") for x in detail["stages"][::-1]
                        if x["stage"] == "base_eval" and x["result"].get("core_missing")), None)
        line = (f"CORE {num(s['core_metric'])} over {s['core_tasks'] or len(core)}/{CORE_NUM_TASKS} tasks"
                + (" (partial)" if s["core_partial"] else ""))
        if missing:
            line += f"; missing {len(missing)}: " + ", ".join(map(str, missing))
        out.append(clip(clean(line), width))
    if detail["evals"]:
        out.append("")
        out.append(format_table(["stage", "suite", "task", "metric", "value", "n"],
                                [[e["stage"], e["suite"], e["task"], e["metric"], e["value"], e["n"]]
                                 for e in detail["evals"]], {2: 32, 3: 20}))
    if detail["samples"]:
        out += ["", "last samples"]
    for sample in detail["samples"]:
        prompt, text = sample["prompt"] or "", sample["text"] or ""
        if prompt and text.startswith(prompt):
            text = text[len(prompt):]  # stages log prompt + continuation
        head = f"[{sample['stage']} step {cell(sample['step'])}] "
        head += f'"{clip(clean(prompt), width - len(head) - 2)}"' if prompt else "(unconditional)"
        out.append(head)
        out.append(wrap(text, width))
    return "\n".join(out)


# -----------------------------------------------------------------------------
# Commands


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=None, help="Show only the newest N runs.")
def runs(as_json, limit):
    """List runs, newest first, with status, val_bpb, CORE, training time (timed steps, as the reference counts
    them), the base_train stage's wall time and cost ("-" without a $/GPU-hour price).

    Example: nanorun runs -n 10
    """
    from registry import list_runs
    from runners.slurm import refresh_runs
    refresh_runs()   # runs on Slurm: their jobs' live state, and the final one written back to the run directory
    _sync()
    rows = list_runs(limit=limit)
    from nanochat.rundir import run_dir
    from runners.slurm import jobs_summary
    jobs = [jobs_summary(run_dir(r["run_id"]), live=True) for r in rows]   # runs launched on Slurm: job, requeues
    if as_json:
        return _echo_json([{**r, "jobs": j} if j else r for r, j in zip(rows, jobs)])
    # train time: timed steps only (the first 10 are skipped, as the reference does); wall: the whole base_train stage
    columns = ["run", "status", "stages", "depth", "hardware", "created", "step", "val_bpb", "CORE", "train time",
               "wall", "cost $"]
    table = [[r["run_id"], r["status"], f"{r['n_done']}/{r['n_stages']}", r["depth"], r["hardware"],
              when(r["created_at"]), r["train_step"], num(r["val_bpb"]),
              num(r["core_metric"]) + (" (partial)" if r["core_partial"] else ""),
              duration(r["total_training_time"]), duration(r["train_wall_seconds"]), num(r["cost_usd"], ".2f")]
             for r in rows]
    if any(jobs):
        columns.append("jobs")
        for line, summary in zip(table, jobs):
            line.append(summary or "-")
    click.echo(format_table(columns, table) if rows else "no runs yet (nanorun apply SPEC)")


@main.command()
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--samples", "num_samples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Last samples to show.")
def show(run, as_json, num_samples):
    """Show one run: summary, stages, final metrics, CORE per task and the last samples.
    RUN is a run id, a unique prefix of one, or a spec name (its newest run).

    Example: nanorun show cpu_demo
    """
    from registry import get_run
    from runners.slurm import refresh_runs
    refresh_runs()   # runs on Slurm: their jobs' live state, and the final one written back to the run directory
    _sync()
    detail = get_run(run, num_samples=num_samples)
    from nanochat.rundir import run_dir
    from runners.slurm import jobs_summary
    jobs = jobs_summary(run_dir(detail["run"]["run_id"]), live=True)
    if as_json:
        return _echo_json({**detail, "jobs": jobs} if jobs else detail)
    text = format_run(detail, term_width())
    click.echo(text if not jobs else text.replace("\ntimes ", f"\njobs      {jobs}\ntimes ", 1))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all/--qualified", "show_all", default=True, show_default=True,
              help="Also list runs that do not qualify (marked x, with the reason).")
def leaderboard(as_json, show_all):
    """Time to GPT-2: runs whose full CORE beats GPT-2 (0.256525), ranked by training hours (mean +- std over
    seeds of the same recipe and hardware), with val_bpb and $ cost. Non-qualifying runs follow, marked x. A name
    that holds more than one recipe is shown with @ and its recipe hash.

    Example: nanorun leaderboard --qualified --json
    """
    from registry import leaderboard as board
    from registry.queries import recipe_labels
    _sync()
    rows = board(qualified_only=not show_all)
    if as_json:
        return _echo_json(rows)

    def pm(mean, std, fmt):
        return num(mean, fmt) + (f" +- {std:{fmt}}" if std is not None else "")

    columns = ["#", "spec", "hardware", "n", "time (h)", "val_bpb", "CORE", "cost $", "date", "commit", "note"]
    table = [[r["rank"] if r["qualified"] else "x", label, r["hardware"], r["n"],
              pm(r["hours"], r["hours_std"], ".2f"),
              num(r["val_bpb"]), pm(r["core_metric"], r["core_std"], ".4f"), num(r["cost_usd"], ".2f"),
              when(r["finished_at"])[:10], (r["git_commit"] or "-")[:7],
              r["reason"] or ", ".join(r["run_ids"][:3]) + (" ..." if len(r["run_ids"]) > 3 else "")]
             for r, label in zip(rows, recipe_labels(rows))]
    click.echo(format_table(columns, table) if rows else "no runs yet (nanorun apply SPEC)")


@main.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of row objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header row.")
def query(sql, as_json, as_csv):
    """Run read-only SQL over the registry (tables runs, stages, metrics, evals, samples, stage_results, studies,
    study_cells, scaling_optima, scaling_fits; views run_summary, leaderboard) and print an aligned table.

    Example: nanorun query "select name, step, value from metrics join stages using (key) where name = 'val_bpb'"
    """
    from registry import query as run_query
    _sync()
    columns, rows = run_query(sql)
    if as_json:
        return _echo_json([dict(zip(columns, row)) for row in rows])
    if as_csv:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return click.echo(buf.getvalue(), nl=False)
    click.echo(format_table(columns, rows))


@main.group()
def registry():
    """The DuckDB registry at $NANORUN_HOME/registry.duckdb (rebuildable from the run directories)."""


@registry.command()
def rebuild():
    """Recreate the registry from $NANORUN_HOME/runs/* (builds a new file, then swaps it in atomically).

    Example: nanorun registry rebuild
    """
    from registry import rebuild as do_rebuild, registry_path
    run_ids = do_rebuild()
    click.echo(f"rebuilt {registry_path()} from {len(run_ids)} runs")


@registry.command()
def sync():
    """Ingest run directories that are new or changed since the last ingest.

    Example: nanorun registry sync
    """
    from registry import sync as do_sync
    click.echo(f"ingested {len(do_sync())} runs")


@registry.command()
def path():
    """Print the path of the registry file (it opens in any DuckDB 2.x client, read-only while idle).

    Example: duckdb -readonly "$(nanorun registry path)"
    """
    from registry import registry_path
    click.echo(registry_path())
