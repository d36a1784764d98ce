"""
Registry commands of the nanorun CLI: runs, show, leaderboard, query, registry rebuild|sync|path.

    nanorun runs
    nanorun show cpu_demo-1a2b --json
    nanorun leaderboard --qualified
    nanorun query "select name, val_bpb, core_metric from run_summary" --csv
    nanorun registry rebuild

Read commands first ingest run directories that changed since the last ingest (a quick `sync`) when they can get
the write lock right away; when another process holds it they read what the database already has.
Each command is a thin shell over registry/*; nothing here imports torch.
"""

import csv
import datetime
import io
import json

import click

from runners.cli import main


def _sync():
    from registry import RegistryLocked, sync
    try:
        sync(timeout=0)
    except RegistryLocked:
        pass  # someone else is writing (or reading); show what the database has


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, default=str))


# -----------------------------------------------------------------------------
# Plain aligned text tables


def when(t):
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t is not None else "-"


def duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def num(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)


def cell(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, (list, dict)):
        return json.dumps(x, default=str)
    return str(x).replace("\n", "\\n")


def format_table(columns, rows):
    """Columns padded to their widest cell; numbers right-aligned."""
    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(str(c))] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    right = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                                for r in rows if r[i] is not None) for i in range(len(columns))]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out = [line([str(c) for c in columns]), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in text])


# -----------------------------------------------------------------------------
# Commands


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", "-n", type=int, default=None, help="Show only the newest N runs.")
def runs(as_json, limit):
    """List runs, newest first, with status, val_bpb, CORE, training time and cost.

    Example: nanorun runs -n 10
    """
    from registry import list_runs
    _sync()
    rows = list_runs(limit=limit)
    if as_json:
        return _echo_json(rows)
    columns = ["run", "status", "stages", "depth", "hardware", "created", "step", "val_bpb", "CORE", "train time",
               "cost $"]
    table = [[r["run_id"], r["status"], f"{r['n_done']}/{r['n_stages']}", r["depth"], r["hardware"],
              when(r["created_at"]), r["train_step"], num(r["val_bpb"]),
              num(r["core_metric"]) + (" (partial)" if r["core_partial"] else ""),
              duration(r["total_training_time"]), num(r["cost_usd"], ".2f")] for r in rows]
    click.echo(format_table(columns, table) if rows else "no runs yet (nanorun apply SPEC)")


@main.command()
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--samples", "num_samples", type=int, default=3, show_default=True, help="Last samples to show.")
def show(run, as_json, num_samples):
    """Show one run: summary, stages, final metrics, CORE per task and the last samples.
    RUN is a run id, a unique prefix of one, or a spec name (its newest run).

    Example: nanorun show cpu_demo
    """
    from registry import get_run
    _sync()
    detail = get_run(run, num_samples=num_samples)
    if as_json:
        return _echo_json(detail)
    r, s = detail["run"], detail["summary"]
    click.echo(f"run       {r['run_id']}  ({r['status']})")
    click.echo(f"spec      {r['name']}  {r['spec_path'] or ''}  hash {(r['spec_hash'] or '-')[:12]}")
    click.echo(f"hardware  {s['hardware']} on {r['host'] or '-'}, ${num(r['usd_per_gpu_hour'], '.2f')}/GPU-h; "
               f"depth {cell(r['depth'])}, seed {cell(r['seed'])}, commit {r['git_commit'] or '-'}")
    click.echo(f"times     created {when(r['created_at'])}, started {when(r['started_at'])}, "
               f"finished {when(r['finished_at'])}, wall {duration(s['wall_seconds'])}")
    click.echo(f"result    val_bpb {num(s['val_bpb'])}, CORE {num(s['core_metric'])}"
               f"{' (partial)' if s['core_partial'] else ''}, training {duration(s['total_training_time'])}, "
               f"cost ${num(s['cost_usd'], '.2f')}; leaderboard: {'qualifies' if s['qualified'] else s['reason']}")
    click.echo("")
    click.echo(format_table(["#", "stage", "key", "status", "started", "wall", "exit", "error"],
                            [[x["idx"], x["stage"], x["key"][:8] if x["key"] else "-", x["status"],
                              when(x["started_at"]), duration(x["wall_seconds"]), x["exit_code"], x["error"]]
                             for x in detail["stages"]]))
    metric_rows = []
    for x in detail["stages"]:
        for name, value in x["result"].items():
            metric_rows.append([x["stage"], name, value, "result"])
        for name, point in x["last_metrics"].items():
            if name not in x["result"]:
                metric_rows.append([x["stage"], name, point["value"], f"step {point['step']}"])
    if metric_rows:
        click.echo("")
        click.echo(format_table(["stage", "metric", "value", "from"], metric_rows))
    if detail["core"]:
        click.echo("")
        click.echo(format_table(["CORE task", "accuracy", "centered", "n"],
                                [[c["task"], c["accuracy"], c["centered"], c["n"]] for c in detail["core"]]))
    if detail["evals"]:
        click.echo("")
        click.echo(format_table(["stage", "suite", "task", "metric", "value", "n"],
                                [[e["stage"], e["suite"], e["task"], e["metric"], e["value"], e["n"]]
                                 for e in detail["evals"]]))
    for sample in detail["samples"]:
        click.echo(f"\n[{sample['stage']} step {sample['step']}] {sample['text']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all/--qualified", "show_all", default=True, show_default=True,
              help="Also list runs that do not qualify (marked x, with the reason).")
def leaderboard(as_json, show_all):
    """Time to GPT-2: runs whose full CORE beats GPT-2 (0.256525), ranked by training hours (mean +- std over
    seeds of the same spec and hardware), with val_bpb and $ cost. Non-qualifying runs follow, marked x.

    Example: nanorun leaderboard --qualified --json
    """
    from registry import leaderboard as board
    _sync()
    rows = board(qualified_only=not show_all)
    if as_json:
        return _echo_json(rows)

    def pm(mean, std, fmt):
        return num(mean, fmt) + (f" +- {std:{fmt}}" if std is not None else "")

    columns = ["#", "spec", "hardware", "n", "time (h)", "val_bpb", "CORE", "cost $", "date", "commit", "note"]
    table = [[r["rank"] if r["qualified"] else "x", r["name"], r["hardware"], r["n"],
              pm(r["hours"], r["hours_std"], ".2f"),
              num(r["val_bpb"]), pm(r["core_metric"], r["core_std"], ".4f"), num(r["cost_usd"], ".2f"),
              when(r["finished_at"])[:10], (r["git_commit"] or "-")[:7],
              r["reason"] or ", ".join(r["run_ids"][:3]) + (" ..." if len(r["run_ids"]) > 3 else "")] for r in rows]
    click.echo(format_table(columns, table) if rows else "no runs yet (nanorun apply SPEC)")


@main.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of row objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header row.")
def query(sql, as_json, as_csv):
    """Run read-only SQL over the registry (tables runs, stages, metrics, evals, samples, stage_results;
    views run_summary, leaderboard) and print an aligned table.

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
