"""
Read-side of the registry: run listing, run detail, the time-to-GPT-2 leaderboard and raw SQL.
Every function opens a short-lived read-only connection (retrying while a writer holds the file) and returns
plain Python data (dicts/lists), so the CLI, the TUI and tests share them.

    from registry.queries import list_runs, get_run, leaderboard, query
    leaderboard()                      # [{rank, qualified, name, recipe_hash, hardware, n, hours, hours_std, ...}, ...]
    query("select name, val_bpb from run_summary")   # (columns, rows)

These functions read what is in the database; call registry.ingest.sync() first to pick up new run directories.
"""

import json
import os
from contextlib import contextmanager

import duckdb

from nanochat import rundir
from registry.db import connect, registry_path
from specs.errors import RegistryError


class QueryError(RegistryError):
    """User SQL that DuckDB rejects (bad input: exit code 2)."""
    exit_code = 2


@contextmanager
def reader(home=None, timeout=10.0):
    """A read-only connection, closed on exit. Creates an empty registry first if there is none."""
    path = registry_path(home)
    if not os.path.exists(path):
        connect(path, timeout=timeout).close()
    con = connect(path, read_only=True, timeout=timeout)
    try:
        yield con
    finally:
        con.close()


def _dicts(cursor):
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


# -----------------------------------------------------------------------------
# Runs

RUN_COLUMNS = ["run_id", "name", "status", "depth", "seed", "hardware", "created_at", "finished_at", "n_done",
               "n_stages", "train_step", "val_bpb", "core_metric", "core_partial", "core_tasks",
               "total_training_time", "train_wall_seconds", "cost_usd", "wall_seconds", "tags"]


def list_runs(home=None, limit=None):
    """One dict per run (newest first) with its summary: status, depth, val_bpb, CORE, training time, cost."""
    sql = f"SELECT {', '.join(RUN_COLUMNS)} FROM run_summary ORDER BY created_at DESC NULLS LAST, run_id"
    with reader(home) as con:
        if limit:
            return _dicts(con.execute(sql + " LIMIT ?", [int(limit)]))
        return _dicts(con.execute(sql))


def resolve_run_id(con, ref, home=None):
    """The run `ref` names (an exact id, a spec name: its newest run, or a unique id prefix), by the one rule of
    nanochat.rundir.match_run; an unknown or ambiguous reference raises its RunDirError (bad input)."""
    runs = {run_id: {"name": name, "created_at": created_at} for run_id, name, created_at in
            con.execute("SELECT run_id, name, created_at FROM runs").fetchall()}
    return rundir.match_run(ref, runs, rundir.runs_dir(home))


def _result_value(value_double, value_text):
    if value_text is not None:
        try:
            return json.loads(value_text)
        except ValueError:
            return value_text
    return value_double


def get_run(ref, home=None, num_samples=5):
    """Everything about one run: the run row and summary, its stages (each with result metrics and the last
    logged value of every metric), the CORE per-task table and the last samples."""
    with reader(home) as con:
        run_id = resolve_run_id(con, ref, home)
        run = _dicts(con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]))[0]
        run["plan"] = json.loads(run.pop("plan_json")) if run.get("plan_json") else None
        summary = _dicts(con.execute("SELECT * FROM leaderboard WHERE run_id = ?", [run_id]))[0]
        stages = _dicts(con.execute("SELECT idx, stage, key, status, started_at, finished_at, wall_seconds, "
                                    "exit_code, error, dir FROM stages WHERE run_id = ? ORDER BY idx", [run_id]))
        keys = [s["key"] for s in stages]
        results, last = {}, {}
        for key, name, value_double, value_text in con.execute(
                "SELECT key, name, value_double, value_text FROM stage_results WHERE list_contains(?, key) "
                "ORDER BY name", [keys]).fetchall():
            results.setdefault(key, {})[name] = _result_value(value_double, value_text)
        for key, name, step, value in con.execute(
                "SELECT key, name, max(step), arg_max(value, step) FROM metrics WHERE list_contains(?, key) "
                "GROUP BY key, name ORDER BY name", [keys]).fetchall():
            last.setdefault(key, {})[name] = {"step": step, "value": value}
        for s in stages:
            s["result"] = results.get(s["key"], {})
            s["last_metrics"] = last.get(s["key"], {})
        # CORE per task from the last base_eval, else from base_train's in-training CORE evals (latest step);
        # the aggregate event (task 'CORE', metric core_metric) is the summary's core_metric, not a task
        core = []
        for kind in ("base_eval", "base_train"):
            core = _dicts(con.execute(
                """SELECT task, arg_max(value, step) FILTER (WHERE metric = 'accuracy') AS accuracy,
                       arg_max(value, step) FILTER (WHERE metric = 'centered') AS centered, max(n) AS n
                   FROM evals WHERE list_contains(?, key) AND suite = 'core'
                       AND metric IN ('accuracy', 'centered') GROUP BY task ORDER BY task""",
                [[s["key"] for s in stages if s["stage"] == kind][-1:]]))
            if core:
                break
        evals = _dicts(con.execute(
            """SELECT s.stage, e.suite, e.task, e.metric, arg_max(e.value, e.step) AS value, max(e.n) AS n
               FROM evals e JOIN (SELECT DISTINCT stage, key FROM stages WHERE run_id = ?) s ON s.key = e.key
               WHERE e.suite <> 'core' GROUP BY ALL ORDER BY ALL""", [run_id]))
        samples = _dicts(con.execute(
            """SELECT s.stage, m.step, m.prompt, m.text, m.time FROM samples m
               JOIN (SELECT DISTINCT stage, key FROM stages WHERE run_id = ?) s ON s.key = m.key
               ORDER BY m.time DESC NULLS LAST, m.step DESC, m.line DESC LIMIT ?""", [run_id, int(num_samples)]))
    return {"run": run, "summary": summary, "stages": stages, "core": core, "evals": evals,
            "samples": samples[::-1]}


# -----------------------------------------------------------------------------
# Leaderboard

LEADERBOARD_COLUMNS = ["rank", "qualified", "name", "recipe_hash", "hardware", "n", "hours", "hours_std", "val_bpb", "core_metric",
                       "core_std", "cost_usd", "total_flops", "finished_at", "git_commit", "run_ids", "reason"]


def leaderboard(home=None, qualified_only=False, timeout=10.0):
    """nanochat's time-to-GPT-2. Runs with a full CORE >= 0.256525 are grouped per recipe (the spec minus its seed:
    `recipe_hash`) and hardware with mean +- sample std over the seeds, ranked by mean training hours (training
    steps only); two different recipes saved under one name are two rows. Unless qualified_only, every other run
    follows, one row each, with rank None and the reason it does not qualify. RegistryLocked after `timeout`
    seconds of a writer holding the file."""
    with reader(home, timeout) as con:
        rows = _dicts(con.execute(
            """SELECT NULL AS rank, true AS qualified, min(name) AS name, min(recipe_hash) AS recipe_hash, hardware,
                   count(*) AS n, avg(hours) AS hours, stddev_samp(hours) AS hours_std, avg(val_bpb) AS val_bpb,
                   avg(core_metric) AS core_metric, stddev_samp(core_metric) AS core_std,
                   avg(cost_usd) AS cost_usd, avg(total_flops) AS total_flops, max(finished_at) AS finished_at,
                   arg_max(git_commit, coalesce(finished_at, created_at)) AS git_commit,
                   list(run_id ORDER BY hours) AS run_ids, NULL AS reason
               FROM leaderboard WHERE qualified
               -- a run without a recipe hash (its spec no longer loads) is a group of its own
               GROUP BY coalesce(recipe_hash, run_id), hardware ORDER BY hours, name"""))
        for rank, row in enumerate(rows, start=1):
            row["rank"] = rank
        if not qualified_only:
            rows += _dicts(con.execute(
                """SELECT NULL AS rank, false AS qualified, name, recipe_hash, hardware, 1 AS n, hours,
                       NULL AS hours_std, val_bpb, core_metric, NULL AS core_std, cost_usd, total_flops, finished_at,
                       git_commit, [run_id] AS run_ids, reason
                   FROM leaderboard WHERE NOT qualified ORDER BY created_at DESC NULLS LAST, run_id"""))
    return [{c: row[c] for c in LEADERBOARD_COLUMNS} for row in rows]


def recipe_labels(rows):
    """Display names of leaderboard rows: the spec name, plus `@` and the first 8 characters of the recipe hash when
    rows with that name hold more than one recipe (so two recipes saved under one name can be told apart)."""
    recipes = {}
    for row in rows:
        recipes.setdefault(row["name"], set()).add(row["recipe_hash"])
    return [row["name"] if len(recipes[row["name"]]) < 2 else f"{row['name']} @{(row['recipe_hash'] or '?')[:8]}"
            for row in rows]


# -----------------------------------------------------------------------------
# Raw SQL


def query(sql, home=None, params=None):
    """Run SQL on a read-only connection with DuckDB's file system access switched off and the settings locked
    (no COPY ... TO, read_csv, ATTACH or extension installs: the query sees the registry and nothing else).
    Returns (column names, rows as tuples); empty or rejected SQL raises QueryError with DuckDB's message."""
    if not sql.strip().strip(";").strip():
        raise QueryError("empty SQL: give a query, e.g. \"select name, val_bpb from run_summary\"")
    with reader(home) as con:
        try:
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            cursor = con.execute(sql, params or [])
            if cursor is None or cursor.description is None:
                return [], []
            return [d[0] for d in cursor.description], cursor.fetchall()
        except duckdb.Error as e:
            raise QueryError(str(e).strip().splitlines()[0]) from None

