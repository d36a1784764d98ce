"""
The registry database file: where it lives, how to open it safely, and its versioned schema.

    from registry.db import connect, registry_path
    con = connect(registry_path(), read_only=True)   # retries while another process holds the lock

DuckDB allows ONE read-write process XOR many read-only processes on a file. So every connection here is
short-lived (open late, close early) and opening retries with backoff for about `timeout` seconds when the file
is locked, then raises a RegistryError naming the PID that holds it. A writer waiting for the file is not starved
by readers whose connections keep overlapping: it holds a gate (a flock on the registry's directory) while it
waits, and readers that arrive meanwhile wait behind it (`_gate`).

Timestamps are DOUBLE unix seconds everywhere (as the run directories write them); the CLI formats them.
Migrations are an ordered list; migration i (1-based) brings the schema to version i, applied in one transaction.
"""

import fcntl
import os
import re
import time
from contextlib import contextmanager

import duckdb

from nanochat import rundir
from specs.errors import RegistryError

# -----------------------------------------------------------------------------
# Path (the home is the run-directory contract's, nanochat.rundir: torch-free)


def registry_path(home=None):
    return os.path.join(home or rundir.home(), "registry.duckdb")


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

# Views are derived, so a migration that changes them re-creates them all (CREATE OR REPLACE); files made before
# version 2 got their first views from migration 1. In run_summary: the last stage row of a given kind per run,
# per-key aggregates of what that stage produced, and live fallbacks from events.jsonl for a running/stopped stage.
# Stages log slash names (val/bpb, train/loss, core/metric); older trees used underscores: both are accepted.
_VIEWS = [
    # v5 added the column; earlier migrations re-create these views too, so they add it first where it is missing
    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS recipe_hash VARCHAR",
    f"""CREATE OR REPLACE VIEW run_summary AS
    WITH last_stage AS (  -- for base_eval: the newest one that produced CORE (a later bpb-only eval must not hide it)
        SELECT s.run_id, s.stage, coalesce(arg_max(s.key, s.idx) FILTER (WHERE c.key IS NOT NULL),
                                           arg_max(s.key, s.idx)) AS key
        FROM stages s LEFT JOIN (SELECT DISTINCT key FROM stage_results WHERE name = 'core_metric') c
            ON c.key = s.key AND s.stage = 'base_eval'
        GROUP BY s.run_id, s.stage),
    key_time AS (  -- per stage key, from whichever run really ran it (a cached stage row has no times)
        SELECT key, max(wall_seconds) AS wall_seconds, max(finished_at - started_at) AS span,
            max(started_at) AS started_at FROM stages GROUP BY key),
    res AS (
        SELECT key,
            max(value_double) FILTER (WHERE name = 'val_bpb') AS val_bpb,
            max(value_double) FILTER (WHERE name = 'min_val_bpb') AS min_val_bpb,
            max(value_double) FILTER (WHERE name = 'total_training_time') AS total_training_time,
            max(value_double) FILTER (WHERE name = 'total_flops') AS total_flops,
            max(value_double) FILTER (WHERE name = 'mfu') AS mfu,
            max(value_double) FILTER (WHERE name = 'core_metric') AS core_metric,
            max(value_double) FILTER (WHERE name = 'core_partial') AS core_partial,
            max(value_double) FILTER (WHERE name = 'core_tasks') AS core_tasks
        FROM stage_results GROUP BY key),
    live AS (  -- the latest logged points: a fallback while a stage has no result.json (running or interrupted)
        SELECT key, max(step) AS step, max(time) AS last_time,
            arg_max(value, step) FILTER (WHERE name IN ('val/bpb', 'val_bpb')) AS val_bpb,
            arg_max(value, step) FILTER (WHERE name IN ('train/total_training_time', 'total_training_time'))
                AS total_training_time
        FROM metrics GROUP BY key),
    core_tasks AS (  -- per-task events only: the aggregate event (task 'CORE', metric core_metric) is no task
        SELECT key, count(DISTINCT task) AS n FROM evals
        WHERE suite = 'core' AND metric IN ('accuracy', 'centered') GROUP BY key),
    stage_time AS (
        SELECT run_id, sum(wall_seconds) AS stage_seconds, count(*) AS n_stages,
            count(*) FILTER (WHERE status IN ('success', 'cached')) AS n_done FROM stages GROUP BY run_id),
    base AS (
        SELECT r.*,
            CAST(coalesce(r.nodes, 1) * coalesce(r.gpus_per_node, 1) AS VARCHAR) || 'x'
                || coalesce(nullif(r.gpu, ''), nullif(r.device_type, ''), '?') AS hardware,  -- 8xH100-SXM, 1xcpu
            coalesce(bt.val_bpb, lv.val_bpb, be.val_bpb, le.val_bpb) AS val_bpb,
            bt.min_val_bpb,
            coalesce(bt.total_training_time, lv.total_training_time) AS total_training_time,
            bt.total_flops, bt.mfu, lv.step AS train_step,
            -- real seconds of the base_train stage (total_training_time skips the first 10 steps)
            coalesce(kt.wall_seconds, kt.span, lv.last_time - kt.started_at) AS train_wall_seconds,
            be.core_metric,
            CAST(coalesce(be.core_tasks, ct.n, 0) AS INTEGER) AS core_tasks,
            -- the stage's own verdict first (core_partial, core_tasks), then the per-task events; unknown = partial
            be.core_metric IS NOT NULL AND coalesce(
                be.core_partial > 0 OR be.core_tasks < {CORE_NUM_TASKS}, be.core_partial > 0,
                be.core_tasks < {CORE_NUM_TASKS}, ct.n < {CORE_NUM_TASKS}, true) AS core_partial,
            st.stage_seconds, st.n_stages, st.n_done
        FROM runs r
        LEFT JOIN last_stage tr ON tr.run_id = r.run_id AND tr.stage = 'base_train'
        LEFT JOIN last_stage ev ON ev.run_id = r.run_id AND ev.stage = 'base_eval'
        LEFT JOIN res bt ON bt.key = tr.key
        LEFT JOIN res be ON be.key = ev.key
        LEFT JOIN live lv ON lv.key = tr.key
        LEFT JOIN live le ON le.key = ev.key
        LEFT JOIN key_time kt ON kt.key = tr.key
        LEFT JOIN core_tasks ct ON ct.key = ev.key
        LEFT JOIN stage_time st ON st.run_id = r.run_id)
    SELECT run_id, name, spec_hash, recipe_hash, status, depth, seed, tags, created_at, started_at, finished_at, git_commit, host, nodes,
        gpus_per_node, gpu, usd_per_gpu_hour, hardware, val_bpb, min_val_bpb, total_training_time, total_flops, mfu,
        train_step, train_wall_seconds, core_metric, core_tasks, core_partial,
        -- hours x GPUs x $/GPU-hour; unknown (NULL) when no price is set (0 means "not given", e.g. on a CPU)
        total_training_time / 3600.0 * coalesce(nodes, 1) * coalesce(gpus_per_node, 1)
            * nullif(usd_per_gpu_hour, 0) AS cost_usd,
        finished_at - started_at AS wall_seconds, stage_seconds, n_stages, n_done
    FROM base""",
    # one row per run with its leaderboard verdict; grouping (mean +- std over seeds) is in queries.leaderboard.
    # A partial CORE never qualifies, so it is never ranked next to full-CORE runs.
    f"""CREATE OR REPLACE VIEW leaderboard AS
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

# Studies (registry.studies): the study records under $NANORUN_HOME/studies, their cells with the numbers the fits
# use (N per parameter convention, tokens, FLOPs, val bpb, CORE), and the isoFLOP fits (registry.scaling_fit): one
# row per budget, one row of laws per study x convention x metric. Rewritten by `registry rebuild` and `study show`.
_V4_STUDIES = [
    """CREATE TABLE studies (
        study VARCHAR PRIMARY KEY, spec_path VARCHAR, spec_hash VARCHAR, status VARCHAR, grid_json VARCHAR,
        seeds INTEGER, n_cells INTEGER, n_retired INTEGER, created_at DOUBLE, updated_at DOUBLE, applies INTEGER,
        study_dir VARCHAR, ingested_at DOUBLE)""",
    """CREATE TABLE study_cells (
        study VARCHAR, cell INTEGER, run_id VARCHAR, name VARCHAR, overrides_json VARCHAR, budget DOUBLE,
        depth INTEGER, seed BIGINT, recorded_status VARCHAR, state VARCHAR, retired BOOLEAN, n_scaling DOUBLE,
        n_all DOUBLE, n_matrices DOUBLE, tokens DOUBLE, flops DOUBLE, val_bpb DOUBLE, core_metric DOUBLE,
        wall_seconds DOUBLE, error VARCHAR)""",
    """CREATE TABLE scaling_optima (
        study VARCHAR, params VARCHAR, metric VARCHAR, budget DOUBLE, n_points INTEGER, n_star DOUBLE,
        d_star DOUBLE, ratio DOUBLE, value_at_vertex DOUBLE, n_min DOUBLE, n_max DOUBLE, flags VARCHAR[],
        error VARCHAR, fitted_at DOUBLE)""",
    # N* = a_coefficient * C^a, D* = b_coefficient * C^b, metric at the optimum = value_coefficient * C^value_exponent
    """CREATE TABLE scaling_fits (
        study VARCHAR, params VARCHAR, metric VARCHAR, n_budgets INTEGER, used_budgets DOUBLE[],
        a DOUBLE, a_low DOUBLE, a_high DOUBLE, a_coefficient DOUBLE, b DOUBLE, b_low DOUBLE, b_high DOUBLE,
        b_coefficient DOUBLE, value_exponent DOUBLE, value_coefficient DOUBLE, ratio_mean DOUBLE, ratio_min DOUBLE,
        ratio_max DOUBLE, resamples INTEGER, valid_resamples INTEGER, seed BIGINT, confidence DOUBLE,
        reason VARCHAR, fitted_at DOUBLE)""",
]

MIGRATIONS = [
    _V1_TABLES,
    _VIEWS,   # v2: CORE task counts without the aggregate event, slash metric names, train wall time, cost NULL at $0
    _VIEWS,   # v3: run_summary takes CORE from the newest base_eval that computed it (ad-hoc `nanorun eval` runs)
    _V4_STUDIES,   # v4: studies, study_cells, scaling_optima, scaling_fits (issue 12)
    # v5: runs.recipe_hash (the spec hash without the seed; the leaderboard groups seeds by it). Runs ingested
    # before have none: forget their run.json times so the next sync re-reads them all and fills it in.
    _VIEWS + ["UPDATE runs SET run_json_mtime = NULL"],
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


@contextmanager
def _gate(path, deadline, timeout, writer):
    """Writer preference for DuckDB's lock, which has no queue: retrying alone, a writer may never find the file
    free while readers' connections overlap. The gate is an exclusive flock on the registry's directory (no extra
    file). A writer holds it while it waits for DuckDB's lock and opens; a reader only passes through it. So while
    a writer waits, new readers wait behind it and it waits only for the connections already open; readers never
    wait for each other. Where the directory cannot be flocked (some NFS mounts), DuckDB's lock is all there is."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        fd = None
    try:
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryLocked(f"{path}: registry is busy: another nanorun process is waiting to write it "
                                         f"(gave up after {timeout:.0f}s); retry when it finishes") from None
                time.sleep(0.01)
            except OSError:
                break
        if fd is not None and not writer:
            os.close(fd)   # passed: releases the flock
            fd = None
        yield
    finally:
        if fd is not None:
            os.close(fd)   # releases the flock


def connect(path=None, read_only=False, timeout=10.0):
    """Open the registry, retrying with backoff (bounded by `timeout` seconds, a writer's turn at the gate
    included) while another process holds a conflicting lock. A read-write open creates the file and migrates it
    to SCHEMA_VERSION; a read-only open checks the version. Close the connection as soon as you are done."""
    path = path or registry_path()
    if read_only and not os.path.exists(path):
        raise RegistryError(f"{path}: no registry yet (run `nanorun registry rebuild` or apply a spec)")
    if not read_only:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    deadline = time.monotonic() + timeout
    delay = 0.05
    with _gate(path, deadline, timeout, writer=not read_only):
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
                delay = min(delay * 2, 0.25)   # a writer holding the gate makes others wait: keep checking often
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
