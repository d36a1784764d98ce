"""
Ingest run directories (the source of truth) into the registry database.

    from registry.ingest import ingest_run, ingest_all, sync, rebuild
    ingest_run("~/.cache/nanorun/runs/cpu_demo-1a2b3c4d")   # after a stage finishes
    sync()       # ingest every run whose run.json changed (or that is still running) since the last ingest
    rebuild()    # recreate registry.duckdb from $NANORUN_HOME/runs/* (crash-safe: temp file + rename)

Layout read here (written by runners and stages):
    runs/<run_id>/run.json                     run record with its ordered list of stages
    stages/<stage>-<key8>/events.jsonl         metric/eval/sample/status/log lines; the last may be partial
    stages/<stage>-<key8>/result.json          present only when the stage succeeded
Stage directories are shared between runs, so their rows are keyed by stage key, not by run.
Re-ingesting replaces a run's rows and its stages' rows in one transaction; rows go in as Arrow tables.
"""

import json
import math
import os
import sys
import time

import pyarrow as pa

from nanochat import rundir
from registry.db import RegistryLocked, connect, registry_path
from specs.errors import RegistryError

# Arrow schemas, one per table, in the column order of registry.db
RUNS = pa.schema([
    ("run_id", pa.string()), ("name", pa.string()), ("spec_path", pa.string()), ("spec_hash", pa.string()),
    ("spec_yaml", pa.string()), ("plan_json", pa.string()), ("status", pa.string()), ("created_at", pa.float64()),
    ("started_at", pa.float64()), ("finished_at", pa.float64()), ("git_commit", pa.string()), ("host", pa.string()),
    ("nodes", pa.int32()), ("gpus_per_node", pa.int32()), ("gpu", pa.string()), ("usd_per_gpu_hour", pa.float64()),
    ("device_type", pa.string()), ("tags", pa.list_(pa.string())), ("seed", pa.int64()), ("depth", pa.int32()),
    ("run_dir", pa.string()), ("run_json_mtime", pa.float64()), ("ingested_at", pa.float64()),
    ("recipe_hash", pa.string())])
STAGES = pa.schema([
    ("run_id", pa.string()), ("idx", pa.int32()), ("stage", pa.string()), ("key", pa.string()),
    ("status", pa.string()), ("started_at", pa.float64()), ("finished_at", pa.float64()),
    ("wall_seconds", pa.float64()), ("exit_code", pa.int32()), ("error", pa.string()), ("dir", pa.string())])
METRICS = pa.schema([("key", pa.string()), ("step", pa.int64()), ("name", pa.string()), ("value", pa.float64()),
                     ("time", pa.float64())])
EVALS = pa.schema([("key", pa.string()), ("step", pa.int64()), ("suite", pa.string()), ("task", pa.string()),
                   ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64()), ("time", pa.float64())])
SAMPLES = pa.schema([("key", pa.string()), ("step", pa.int64()), ("prompt", pa.string()), ("text", pa.string()),
                     ("time", pa.float64()), ("line", pa.int64())])
RESULTS = pa.schema([("key", pa.string()), ("stage", pa.string()), ("name", pa.string()),
                     ("value_double", pa.float64()), ("value_text", pa.string())])
TABLES = {"runs": RUNS, "stages": STAGES, "metrics": METRICS, "evals": EVALS, "samples": SAMPLES,
          "stage_results": RESULTS}


def _columns(schema):
    return {name: [] for name in schema.names}


def _float(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(x):
    try:
        x = int(x)
    except (TypeError, ValueError, OverflowError):  # None, "abc", inf
        return None
    return x if -2 ** 63 <= x < 2 ** 63 else None  # a BIGINT column


def _text(x):
    """A text column's value: strings as they are, anything else a hand edit put there as its JSON."""
    return x if x is None or isinstance(x, str) else json.dumps(x, default=str)


def _plan_depth(plan):
    """The model depth: runners.plan puts it at plan["derived"]["n_layer"]; older or hand-written plans are
    searched for a depth/n_layer key."""
    derived = plan.get("derived") if isinstance(plan, dict) else None
    if isinstance(derived, dict) and isinstance(derived.get("n_layer"), int):
        return derived["n_layer"]
    return _find_depth(plan)


def _find_depth(obj):
    """The model depth somewhere in a plan without "derived" (its exact shape belongs to runners)."""
    if isinstance(obj, dict):
        for k in ("depth", "n_layer"):
            if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool):
                return obj[k]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        depth = _find_depth(child)
        if depth is not None:
            return depth
    return None


# -----------------------------------------------------------------------------
# Reading files


def read_events(path, key, out):
    """Append the metric/eval/sample lines of one events.jsonl to the column dicts in `out`.
    A line that does not parse (the partial last line of a running stage) is skipped; an unreadable file is
    skipped with a warning."""
    metrics, evals, samples = out["metrics"], out["evals"], out["samples"]
    try:
        events = list(rundir.read_events(path))
    except rundir.RunDirError as e:   # the run and its other stages are still ingested
        print(f"warning: skipped the events of {e}", file=sys.stderr)
        events = []
    for lineno, event in events:
        kind, t, step = event.get("kind"), _float(event.get("time")), _int(event.get("step"))
        if kind == "metric":
            values = event.get("values")
            for name, value in (values if isinstance(values, dict) else {}).items():
                metrics["key"].append(key)
                metrics["step"].append(step)
                metrics["name"].append(name)
                metrics["value"].append(_float(value))
                metrics["time"].append(t)
        elif kind == "eval":
            evals["key"].append(key)
            evals["step"].append(step)
            for col in ("suite", "task", "metric"):
                evals[col].append(None if event.get(col) is None else str(event[col]))
            evals["value"].append(_float(event.get("value")))
            evals["n"].append(_int(event.get("n")))
            evals["time"].append(t)
        elif kind == "sample":
            samples["key"].append(key)
            samples["step"].append(step)
            samples["prompt"].append(None if event.get("prompt") is None else str(event["prompt"]))
            samples["text"].append(None if event.get("text") is None else str(event["text"]))
            samples["time"].append(t)
            samples["line"].append(lineno)


def read_result(directory, key, stage, out):
    results = out["stage_results"]
    for name, value in rundir.result_metrics(rundir.read_result(directory)).items():
        results["key"].append(key)
        results["stage"].append(stage)
        results["name"].append(name)
        if isinstance(value, (bool, int, float)):
            results["value_double"].append(_float(value))
            results["value_text"].append(json.dumps(value))
        else:
            results["value_double"].append(None)
            results["value_text"].append(value if isinstance(value, str) else json.dumps(value, default=str))


def _recipe_from_yaml(spec_yaml):
    """The recipe hash of a run recorded before run.json carried one; None when its spec no longer loads."""
    if not isinstance(spec_yaml, str):
        return None
    from specs.loader import load_text, recipe_hash   # pydantic: only for such older runs
    try:
        return recipe_hash(load_text(spec_yaml))
    except Exception:   # a spec of an older schema, or not a spec at all: the run then groups alone
        return None


def read_run(run_dir, home, out, seen_keys):
    """Append one run's rows to `out` (column dicts per table). Stage keys already in `seen_keys` are not
    re-read (shared stage directories). Returns (run_id, [stage keys])."""
    path = os.path.join(run_dir, "run.json")
    try:
        run = rundir.read_run(run_dir)
        mtime = os.stat(path).st_mtime
    except (rundir.RunDirError, FileNotFoundError) as e:  # gone between the listing and the read
        raise RegistryError(str(e) if isinstance(e, rundir.RunDirError) else f"{path}: no run.json") from None
    run_id = run.get("run_id") or os.path.basename(os.path.normpath(run_dir))
    if run_id in out["runs"]["run_id"]:
        raise RegistryError(f"{path}: run_id {run_id} is also used by another run directory (a copy?)")
    hardware = run.get("hardware") or {}
    plan = run.get("plan")
    row = {
        "run_id": run_id, "name": _text(run.get("name")), "spec_path": _text(run.get("spec_path")),
        "spec_hash": _text(run.get("spec_hash")), "spec_yaml": _text(run.get("spec_yaml")),
        "plan_json": None if plan is None else json.dumps(plan, sort_keys=True, default=str),
        "status": _text(run.get("status")), "created_at": _float(run.get("created_at")),
        "started_at": _float(run.get("started_at")), "finished_at": _float(run.get("finished_at")),
        "git_commit": _text(run.get("git_commit")), "host": _text(run.get("host")),
        "nodes": _int(hardware.get("nodes")), "gpus_per_node": _int(hardware.get("gpus_per_node")),
        "gpu": _text(hardware.get("gpu")), "usd_per_gpu_hour": _float(hardware.get("usd_per_gpu_hour")),
        "device_type": _text(hardware.get("device_type")), "tags": [str(t) for t in run.get("tags") or []],
        "seed": _int(run.get("seed")), "depth": _plan_depth(plan), "run_dir": os.path.abspath(run_dir),
        "run_json_mtime": mtime, "ingested_at": time.time(),
        "recipe_hash": _text(run.get("recipe_hash")) or _recipe_from_yaml(run.get("spec_yaml")),
    }
    for col, value in row.items():
        out["runs"][col].append(value)
    keys = []
    for idx, stage in enumerate(run.get("stages") or []):
        key, name = stage.get("key"), stage.get("stage")
        directory = rundir.locate_stage_dir(stage.get("dir"), home)
        srow = {"run_id": run_id, "idx": idx, "stage": name, "key": key, "status": stage.get("status"),
                "started_at": _float(stage.get("started_at")), "finished_at": _float(stage.get("finished_at")),
                "wall_seconds": _float(stage.get("wall_seconds")), "exit_code": _int(stage.get("exit_code")),
                "error": _text(stage.get("error")), "dir": directory}
        for col, value in srow.items():
            out["stages"][col].append(value)
        if key is None or key in seen_keys:
            continue
        seen_keys.add(key)
        keys.append(key)
        if directory:
            read_events(os.path.join(directory, "events.jsonl"), key, out)
            read_result(directory, key, name, out)
    return run_id, keys


# -----------------------------------------------------------------------------
# Writing


def _new_batch():
    return {table: _columns(schema) for table, schema in TABLES.items()}


def write_batch(con, out, run_ids, keys):
    """Replace the rows of `run_ids` and of stage `keys` by the rows in `out`, in one transaction."""
    ids = pa.table({"run_id": pa.array(list(run_ids), pa.string())})
    key_table = pa.table({"key": pa.array(list(keys), pa.string())})
    con.begin()
    try:
        con.register("_ids", ids)
        con.register("_keys", key_table)
        con.execute("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM _ids)")
        con.execute("DELETE FROM stages WHERE run_id IN (SELECT run_id FROM _ids)")
        for table in ("metrics", "evals", "samples", "stage_results"):
            con.execute(f"DELETE FROM {table} WHERE key IN (SELECT key FROM _keys)")
        for table, schema in TABLES.items():
            if not out[table][schema.names[0]]:
                continue
            arrow = pa.table(out[table], schema=schema)
            con.register("_rows", arrow)
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _rows")
            con.unregister("_rows")
        con.unregister("_ids")
        con.unregister("_keys")
        con.commit()
    except Exception:
        con.rollback()
        raise


def _run_dirs(home):
    return [rundir.run_dir(run_id, home) for run_id in rundir.run_ids(home)]


def read_runs(home, run_dirs, strict=True):
    """Parse run directories into one batch: (column dicts per table, run ids, stage keys). No database here,
    so the write lock is only held for the write. strict=False skips (with a warning on stderr) a run whose
    run.json cannot be read."""
    out, seen, run_ids, keys = _new_batch(), set(), [], []
    for run_dir in run_dirs:
        try:
            run_id, run_keys = read_run(run_dir, home, out, seen)
        except RegistryError as e:
            if strict:
                raise
            print(f"warning: skipped {e}", file=sys.stderr)
            continue
        run_ids.append(run_id)
        keys.extend(run_keys)
    return out, run_ids, keys


def _write(path, batch, timeout):
    out, run_ids, keys = batch
    if not run_ids:
        return run_ids
    con = connect(path, timeout=timeout)
    try:
        write_batch(con, out, run_ids, keys)
    finally:
        con.close()
    return run_ids


def ingest_run(run_dir, home=None, timeout=10.0):
    """Ingest (or re-ingest) one run directory; `home` defaults to the tree that holds it (<home>/runs/<id>)."""
    home = home or os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
    return _write(registry_path(home), read_runs(home, [run_dir]), timeout)[0]


def ingest_all(home=None, timeout=10.0):
    """Ingest every run directory under <home>/runs; returns the run ids."""
    home = home or rundir.home()
    return _write(registry_path(home), read_runs(home, _run_dirs(home), strict=False), timeout)


def sync(home=None, timeout=10.0):
    """Ingest runs that are new, whose run.json changed since their last ingest, or that are still
    pending/running (their events grow without run.json changing); drop runs whose directory is gone.
    Returns the ingested run ids."""
    home = home or rundir.home()
    path = registry_path(home)
    con = connect(path, timeout=timeout)
    try:
        known = {run_dir: (mtime, status) for run_dir, mtime, status in
                 con.execute("SELECT run_dir, run_json_mtime, status FROM runs").fetchall()}
        gone = [d for d in known if not os.path.isfile(os.path.join(d, "run.json"))]
        if gone:
            con.begin()
            con.execute("DELETE FROM stages WHERE run_id IN "
                        "(SELECT run_id FROM runs WHERE list_contains(?, run_dir))", [gone])
            con.execute("DELETE FROM runs WHERE list_contains(?, run_dir)", [gone])
            for table in ("metrics", "evals", "samples", "stage_results"):
                con.execute(f"DELETE FROM {table} WHERE key NOT IN (SELECT key FROM stages WHERE key IS NOT NULL)")
            con.commit()
    finally:
        con.close()
    todo = []
    for run_dir in _run_dirs(home):
        mtime, status = known.get(os.path.abspath(run_dir), (None, None))
        if mtime is None or os.stat(os.path.join(run_dir, "run.json")).st_mtime > mtime \
                or status in ("pending", "running"):
            todo.append(run_dir)
    return _write(path, read_runs(home, todo, strict=False), timeout)


def _remove_dead_temps(path):
    """Delete temp files of rebuilds whose process is gone (killed mid-rebuild), and our own."""
    directory, prefix = os.path.dirname(path), os.path.basename(path) + ".rebuild-"
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if not name.startswith(prefix):
            continue
        pid = _int(name[len(prefix):].removesuffix(".wal"))
        if pid is None:
            continue
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running: another rebuild in progress
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        os.remove(os.path.join(directory, name))


def rebuild(home=None, timeout=10.0):
    """Recreate registry.duckdb from the run directories (and the study tables from $NANORUN_HOME/studies). The
    new database is built in a temp file and renamed over the old one, so a crash mid-rebuild leaves the old
    database intact. Returns the run ids."""
    home = home or rundir.home()
    path = registry_path(home)
    tmp = f"{path}.rebuild-{os.getpid()}"
    _remove_dead_temps(path)
    batch = read_runs(home, _run_dirs(home), strict=False)
    con = connect(tmp, timeout=timeout)
    try:
        out, run_ids, keys = batch
        if run_ids:
            write_batch(con, out, run_ids, keys)
        from registry.studies import write_all   # numpy, only when rebuilding
        write_all(con, home, warn=lambda message: print(message, file=sys.stderr))
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        for leftover in (tmp, tmp + ".wal"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    con.close()
    if os.path.exists(path):
        # take the write lock on the old file (no one else is using it) and fold its WAL in, so no stale
        # registry.duckdb.wal is left to be replayed against the new file
        try:
            old = connect(path, timeout=timeout)
            old.execute("CHECKPOINT")
            old.close()
        except RegistryLocked:
            os.remove(tmp)
            raise
        except RegistryError:
            pass  # a corrupt or newer-version file: replacing it is the point of a rebuild
        if os.path.exists(path + ".wal"):
            os.remove(path + ".wal")
    os.replace(tmp, path)
    return run_ids
