"""
The registry database file: where it lives, how to open it safely, and its versioned schema.

    from registry.db import connect, registry_path
    con = connect(registry_path(), read_only=True)   # retries while another process holds the lock

DuckDB allows ONE read-write process XOR many read-only processes on a file. So every connection here is
short-lived (open late, close early) and opening retries with backoff for about `timeout` seconds when the file
is locked, then raises a RegistryError naming the PID that holds it.

Timestamps are DOUBLE unix seconds everywhere (as the run directories write them); the CLI formats them.
Migrations are an ordered list; migration i (1-based) brings the schema to version i, applied in one transaction.
"""

import os
import re
import time

import duckdb

from specs.errors import RegistryError

# -----------------------------------------------------------------------------
# Paths (re-implemented from nanochat.common.get_base_dir: registry must not import torch)


def get_home():
    """$NANORUN_HOME or ~/.cache/nanorun (not created here)."""
    return os.environ.get("NANORUN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "nanorun")


def registry_path(home=None):
    return os.path.join(home or get_home(), "registry.duckdb")


# -----------------------------------------------------------------------------
# Schema

CORE_THRESHOLD = 0.256525   # GPT-2 (1.5B) CORE score; the leaderboard's bar
CORE_NUM_TASKS = 22         # a CORE run with fewer tasks is "partial"

_V1_TABLES = [
    """CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, name VARCHAR, spec_path VARCHAR, spec_hash VARCHAR, spec_yaml VARCHAR,
        plan_json VARCHAR, status VARCHAR, created_at DOUBLE, started_at DOUBLE, finished_at DOUBLE,
        git_commit VARCHAR, host VARCHAR, nodes INTEGER, gpus_per_node INTEGER, gpu VARCHAR,
        usd_per_gpu_hour DOUBLE, device_type VARCHAR, tags VARCHAR[], seed BIGINT, depth INTEGER,
        run_dir VARCHAR, run_json_mtime DOUBLE, ingested_at DOUBLE)""",
    """CREATE TABLE stages (
        run_id VARCHAR, idx INTEGER, stage VARCHAR, key VARCHAR, status VARCHAR, started_at DOUBLE,
        finished_at DOUBLE, wall_seconds DOUBLE, exit_code INTEGER, error VARCHAR, dir VARCHAR)""",
    # one row per logged point, every point kept (long format); keyed by stage key since stage dirs are shared
    "CREATE TABLE metrics (key VARCHAR, step BIGINT, name VARCHAR, value DOUBLE, time DOUBLE)",
    """CREATE TABLE evals (key VARCHAR, step BIGINT, suite VARCHAR, task VARCHAR, metric VARCHAR,
        value DOUBLE, n BIGINT, time DOUBLE)""",
    # line: position in events.jsonl, to keep the order of samples logged at the same step
    "CREATE TABLE samples (key VARCHAR, step BIGINT, prompt VARCHAR, text VARCHAR, time DOUBLE, line BIGINT)",
    # result.json metrics; numbers and bools (1/0) in value_double, everything else as JSON text in value_text
    "CREATE TABLE stage_results (key VARCHAR, stage VARCHAR, name VARCHAR, value_double DOUBLE, value_text VARCHAR)",
]

# The last stage row of a given kind per run, and per-key aggregates of what that stage produced.
_V1_VIEWS = [
    f"""CREATE VIEW run_summary AS
    WITH last_stage AS (
        SELECT run_id, stage, arg_max(key, idx) AS key FROM stages GROUP BY run_id, stage),
    res AS (
        SELECT key,
            max(value_double) FILTER (WHERE name = 'val_bpb') AS val_bpb,
            max(value_double) FILTER (WHERE name = 'min_val_bpb') AS min_val_bpb,
            max(value_double) FILTER (WHERE name = 'total_training_time') AS total_training_time,
            max(value_double) FILTER (WHERE name = 'total_flops') AS total_flops,
            max(value_double) FILTER (WHERE name = 'mfu') AS mfu,
            max(value_double) FILTER (WHERE name = 'core_metric') AS core_metric,
            max(value_double) FILTER (WHERE name = 'core_partial') AS core_partial
        FROM stage_results GROUP BY key),
    live AS (  -- the latest logged points: a fallback while a stage has no result.json yet
        SELECT key, max(step) AS step,
            arg_max(value, step) FILTER (WHERE name = 'val_bpb') AS val_bpb,
            arg_max(value, step) FILTER (WHERE name = 'total_training_time') AS total_training_time
        FROM metrics GROUP BY key),
    core_tasks AS (
        SELECT key, count(DISTINCT task) AS n FROM evals WHERE suite = 'core' GROUP BY key),
    stage_time AS (
        SELECT run_id, sum(wall_seconds) AS stage_seconds, count(*) AS n_stages,
            count(*) FILTER (WHERE status IN ('success', 'cached')) AS n_done FROM stages GROUP BY run_id)
    SELECT r.run_id, r.name, r.status, r.depth, r.seed, r.tags, r.created_at, r.started_at, r.finished_at,
        r.git_commit, r.host, r.nodes, r.gpus_per_node, r.gpu, r.usd_per_gpu_hour,
        CAST(coalesce(r.nodes, 1) * coalesce(r.gpus_per_node, 1) AS VARCHAR) || 'x'
            || coalesce(nullif(r.gpu, ''), nullif(r.device_type, ''), '?') AS hardware,   -- e.g. 8xH100-SXM
        coalesce(bt.val_bpb, lv.val_bpb, be.val_bpb) AS val_bpb,
        bt.min_val_bpb,
        coalesce(bt.total_training_time, lv.total_training_time) AS total_training_time,
        bt.total_flops, bt.mfu,
        lv.step AS train_step,
        be.core_metric,
        coalesce(ct.n, 0) AS core_tasks,
        coalesce(be.core_partial > 0, ct.n < {CORE_NUM_TASKS}, false) AS core_partial,
        coalesce(bt.total_training_time, lv.total_training_time) / 3600.0   -- hours x GPUs x $/GPU-hour
            * coalesce(r.nodes, 1) * coalesce(r.gpus_per_node, 1) * r.usd_per_gpu_hour AS cost_usd,
        r.finished_at - r.started_at AS wall_seconds,
        st.stage_seconds, st.n_stages, st.n_done
    FROM runs r
    LEFT JOIN last_stage tr ON tr.run_id = r.run_id AND tr.stage = 'base_train'
    LEFT JOIN last_stage ev ON ev.run_id = r.run_id AND ev.stage = 'base_eval'
    LEFT JOIN res bt ON bt.key = tr.key
    LEFT JOIN res be ON be.key = ev.key
    LEFT JOIN live lv ON lv.key = tr.key
    LEFT JOIN core_tasks ct ON ct.key = ev.key
    LEFT JOIN stage_time st ON st.run_id = r.run_id""",
    # one row per run with its leaderboard verdict; grouping (mean +- std over seeds) is in queries.leaderboard
    f"""CREATE VIEW leaderboard AS
    SELECT *, total_training_time / 3600.0 AS hours,
        core_metric IS NOT NULL AND NOT core_partial AND core_metric >= {CORE_THRESHOLD}
            AND total_training_time IS NOT NULL AS qualified,
        CASE
            WHEN core_metric IS NULL THEN 'no CORE yet (' || status || ')'
            WHEN core_partial THEN 'partial CORE (' || core_tasks || '/{CORE_NUM_TASKS})'
            WHEN core_metric < {CORE_THRESHOLD} THEN 'CORE ' || printf('%.4f', core_metric) || ' < 0.2565'
            WHEN total_training_time IS NULL THEN 'no total_training_time'
        END AS reason
    FROM run_summary""",
]

MIGRATIONS = [
    _V1_TABLES + _V1_VIEWS,
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(con):
    """The schema version of an open database; 0 for a fresh file."""
    exists = con.execute("SELECT count(*) FROM information_schema.tables "
                         "WHERE table_name = 'schema_version'").fetchone()[0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def migrate(con, path="registry"):
    """Bring an open read-write database to SCHEMA_VERSION, one transaction per migration."""
    version = schema_version(con)
    if version > SCHEMA_VERSION:
        raise RegistryError(f"{path}: schema version {version} was written by a newer nanorun "
                            f"(this one knows up to {SCHEMA_VERSION}); upgrade nanorun or `nanorun registry rebuild`")
    for v in range(version + 1, SCHEMA_VERSION + 1):
        con.begin()
        try:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                        "(version INTEGER, applied_at DOUBLE, duckdb_version VARCHAR)")
            for sql in MIGRATIONS[v - 1]:
                con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [v, time.time(), duckdb.__version__])
            con.commit()
        except Exception:
            con.rollback()
            raise
    return SCHEMA_VERSION


def check_version(con, path="registry"):
    """For read-only connections, which cannot migrate."""
    version = schema_version(con)
    if version > SCHEMA_VERSION:
        raise RegistryError(f"{path}: schema version {version} was written by a newer nanorun "
                            f"(this one knows up to {SCHEMA_VERSION}); upgrade nanorun or `nanorun registry rebuild`")
    if version < SCHEMA_VERSION:
        raise RegistryError(f"{path}: schema version {version} is older than {SCHEMA_VERSION} and the file is "
                            f"locked by another process, so it cannot be migrated now; retry later")


# -----------------------------------------------------------------------------
# Connections


class RegistryLocked(RegistryError):
    """Another process holds the registry file (and did not let go within the timeout)."""


def _lock_holder(message):
    m = re.search(r"PID (\d+)", message)
    return f"process {m.group(1)}" if m else "another process"


def connect(path=None, read_only=False, timeout=10.0):
    """Open the registry, retrying with exponential backoff (bounded by `timeout` seconds) while another
    process holds a conflicting lock. A read-write open creates the file and migrates it to SCHEMA_VERSION;
    a read-only open checks the version. Close the connection as soon as you are done."""
    path = path or registry_path()
    if read_only and not os.path.exists(path):
        raise RegistryError(f"{path}: no registry yet (run `nanorun registry rebuild` or apply a spec)")
    if not read_only:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(path, read_only=read_only)
            break
        except duckdb.IOException as e:
            message = str(e)
            if "Could not set lock" not in message:
                raise RegistryError(f"{path}: cannot open registry: {message.splitlines()[0]}") from None
            if time.monotonic() + delay > deadline:
                raise RegistryLocked(f"{path}: registry is locked by {_lock_holder(message)} "
                                    f"(gave up after {timeout:.0f}s); retry when it finishes") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        except duckdb.Error as e:
            raise RegistryError(f"{path}: cannot open registry: {str(e).splitlines()[0]}") from None
    try:
        if read_only:
            check_version(con, path)
        else:
            migrate(con, path)
    except Exception:
        con.close()
        raise
    return con
