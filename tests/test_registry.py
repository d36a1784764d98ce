"""Registry tests on real DuckDB files: migrations, ingest, sync, rebuild, locking, queries, leaderboard.
Run: .venv/bin/pytest tests/test_registry.py -q"""

import json
import os
import shutil
import subprocess
import sys
import time

import duckdb
import pytest

from conftest import make_run_tree
from nanochat.rundir import RunDirError
from registry import db, get_run, ingest, ingest_all, ingest_run, leaderboard, list_runs, query, rebuild, sync
from registry.db import SCHEMA_VERSION, RegistryLocked, connect, registry_path
from registry.queries import QueryError, recipe_labels
from specs.errors import RegistryError

TABLES = ["runs", "stages", "metrics", "evals", "samples", "stage_results"]
TRAIN_POINTS = 20 + 20 + 4   # make_run_tree: train_loss and tok_per_sec every step, val_bpb every 5 of 20 steps


def counts(home):
    con = connect(registry_path(home), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        con.close()


def dump(home):
    """Every row of every table, order-independent, without the ingest timestamp."""
    con = connect(registry_path(home), read_only=True)
    try:
        out = {}
        for t in TABLES:
            cols = [c for c in (d[0] for d in con.execute(f"SELECT * FROM {t} LIMIT 0").description)
                    if c != "ingested_at"]
            out[t] = sorted(map(repr, con.execute(f"SELECT {', '.join(cols)} FROM {t}").fetchall()))
        return out
    finally:
        con.close()


# -----------------------------------------------------------------------------
# Schema and migrations


def test_migrations_from_empty(nanorun_home):
    path = registry_path(nanorun_home)
    con = connect(path)
    assert db.schema_version(con) == SCHEMA_VERSION
    names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert set(TABLES) | {"schema_version", "run_summary", "leaderboard"} <= names
    con.close()
    connect(path).close()  # reopening applies nothing twice
    con = connect(path, read_only=True)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    con.close()


def test_new_migration_applies_and_failure_rolls_back(nanorun_home, monkeypatch):
    path = registry_path(nanorun_home)
    connect(path).close()
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + [["CREATE TABLE extra (x INTEGER)", "SELEC broken"]])
    monkeypatch.setattr(db, "SCHEMA_VERSION", len(db.MIGRATIONS))
    with pytest.raises(duckdb.ParserException):
        connect(path)
    raw = duckdb.connect(path)
    assert db.schema_version(raw) == SCHEMA_VERSION  # the failed step left no half-applied migration
    assert not raw.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'extra'").fetchone()[0]
    raw.close()
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:-1] + [["CREATE TABLE extra (x INTEGER)"]])
    con = connect(path)
    assert db.schema_version(con) == SCHEMA_VERSION + 1
    con.execute("SELECT * FROM extra").fetchall()
    con.close()


def test_newer_schema_is_a_clear_error(nanorun_home):
    path = registry_path(nanorun_home)
    connect(path).close()
    raw = duckdb.connect(path)
    raw.execute("INSERT INTO schema_version VALUES (?, 0, 'future')", [SCHEMA_VERSION + 1])
    raw.close()
    for read_only in (False, True):
        with pytest.raises(RegistryError, match="newer nanorun"):
            connect(path, read_only=read_only)


# -----------------------------------------------------------------------------
# Ingest


def test_ingest_run_is_idempotent(nanorun_home):
    run_dir = make_run_tree(nanorun_home, "d12")
    assert ingest_run(run_dir) == os.path.basename(run_dir)
    first = dump(nanorun_home)
    ingest_run(run_dir)
    assert dump(nanorun_home) == first
    c = counts(nanorun_home)
    assert c == {"runs": 1, "stages": 3, "metrics": TRAIN_POINTS, "evals": 44, "samples": 2,
                 "stage_results": 2 + 7 + 3}


def test_reingest_replaces_run_and_stage_rows(nanorun_home):
    run_dir = make_run_tree(nanorun_home, "d12", status="running")
    ingest_run(run_dir)
    # the partial last line of a running stage is skipped; 10 of 20 steps are logged
    assert counts(nanorun_home)["metrics"] == 10 + 10 + 2
    assert list_runs()[0]["status"] == "running"
    make_run_tree(nanorun_home, "d12", status="success", run_id=os.path.basename(run_dir))
    run = json.load(open(os.path.join(run_dir, "run.json")))
    ingest_run(run_dir)
    c = counts(nanorun_home)
    assert c["runs"] == 1 and c["metrics"] == TRAIN_POINTS and c["stages"] == len(run["stages"])
    summary = list_runs()[0]
    assert summary["status"] == "success" and summary["core_metric"] == pytest.approx(0.3)


def test_shared_stage_rows_are_kept_once(nanorun_home):
    a = make_run_tree(nanorun_home, "d12", seed=0)
    b = make_run_tree(nanorun_home, "d12", seed=1)
    assert sorted(sync()) == sorted([os.path.basename(a), os.path.basename(b)])
    _, rows = query("SELECT count(*) FROM stage_results WHERE stage = 'tok_train'")
    assert rows == [(2,)]  # one tokenizer directory, two result metrics, although two runs use it
    _, rows = query("SELECT count(DISTINCT run_id) FROM stages WHERE stage = 'tok_train'")
    assert rows == [(2,)]


def test_sync_ingests_only_what_changed(nanorun_home):
    done = make_run_tree(nanorun_home, "done")
    live = make_run_tree(nanorun_home, "live", status="running")
    assert len(sync()) == 2
    assert sync() == [os.path.basename(live)]  # a running run is always re-read (its events grow)
    future = time.time() + 10
    os.utime(os.path.join(done, "run.json"), (future, future))
    assert sorted(sync()) == sorted([os.path.basename(done), os.path.basename(live)])
    shutil.rmtree(done)
    sync()
    assert [r["run_id"] for r in list_runs()] == [os.path.basename(live)]
    _, rows = query("SELECT count(*) FROM stage_results WHERE stage <> 'tok_train'")
    assert rows == [(0,)]  # the deleted run's own stage rows went with it; the shared tokenizer stays


def test_ingest_skips_unreadable_run_json(nanorun_home, capsys):
    good = make_run_tree(nanorun_home, "good")
    bad = os.path.join(nanorun_home, "runs", "bad-00000000")
    os.makedirs(bad)
    with open(os.path.join(bad, "run.json"), "w") as f:
        f.write("{not json")
    assert len(ingest_all()) == 1
    assert "bad-00000000" in capsys.readouterr().err
    shutil.copytree(good, os.path.join(nanorun_home, "runs", "zz-copy"))  # same run_id in two directories
    assert len(rebuild()) == 1
    assert "also used by another run directory" in capsys.readouterr().err
    with pytest.raises(RegistryError, match="not valid JSON"):
        ingest_run(bad)


def test_many_metric_rows(nanorun_home):
    run_dir = make_run_tree(nanorun_home, "big", num_steps=50_000)
    ingest_run(run_dir)
    _, rows = query("SELECT count(*), count(DISTINCT step), max(step) FROM metrics WHERE name = 'train_loss'")
    assert rows == [(50_000, 50_000, 49_999)]
    assert counts(nanorun_home)["metrics"] == 2 * 50_000 + 10_000


# -----------------------------------------------------------------------------
# Rebuild


def test_rebuild_equals_incremental_ingest(nanorun_home):
    dirs = [make_run_tree(nanorun_home, "d12", seed=s) for s in range(3)]
    dirs.append(make_run_tree(nanorun_home, "live", status="running"))
    for run_dir in reversed(dirs):
        ingest_run(run_dir)
    incremental = dump(nanorun_home)
    assert sorted(rebuild()) == sorted(os.path.basename(d) for d in dirs)
    assert dump(nanorun_home) == incremental
    assert sorted(os.listdir(nanorun_home)) == ["registry.duckdb", "runs", "stages"]  # no temp files left


def test_rebuild_crash_keeps_old_database(nanorun_home, monkeypatch, capsys):
    make_run_tree(nanorun_home, "d12")
    rebuild()
    before = dump(nanorun_home)
    broken = make_run_tree(nanorun_home, "broken")
    run = json.load(open(os.path.join(broken, "run.json")))
    stage_dir = run["stages"][1]["dir"]
    real_read_events = ingest.read_events

    def crash(path, key, out):   # a crash mid-rebuild (killed, out of memory), after some rows were read
        if path.startswith(stage_dir):
            raise MemoryError("simulated")
        return real_read_events(path, key, out)
    monkeypatch.setattr(ingest, "read_events", crash)
    with pytest.raises(MemoryError):
        rebuild()
    assert dump(nanorun_home) == before
    assert not [f for f in os.listdir(nanorun_home) if "rebuild" in f]
    monkeypatch.setattr(ingest, "read_events", real_read_events)

    # an events.jsonl that cannot be read (here a directory) loses only its own rows, with a warning naming it
    os.remove(os.path.join(stage_dir, "events.jsonl"))
    os.makedirs(os.path.join(stage_dir, "events.jsonl"))
    assert sorted(rebuild()) == sorted(os.listdir(os.path.join(nanorun_home, "runs")))
    assert f"warning: skipped the events of {os.path.join(stage_dir, 'events.jsonl')}: cannot be read" \
        in capsys.readouterr().err


def test_rebuild_killed_midway_keeps_old_database(nanorun_home):
    make_run_tree(nanorun_home, "d12")
    rebuild()
    before = dump(nanorun_home)
    make_run_tree(nanorun_home, "big", num_steps=100_000)
    code = "import os, registry; registry.rebuild(os.environ['NANORUN_HOME'])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not [f for f in os.listdir(nanorun_home) if ".rebuild-" in f] and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()  # SIGKILL while the new database is being written
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the rebuild finished before it could be killed")
    assert dump(nanorun_home) == before
    assert len(rebuild()) == 2
    assert sorted(os.listdir(nanorun_home)) == ["registry.duckdb", "runs", "stages"]  # dead temp file removed


# -----------------------------------------------------------------------------
# Locking: one read-write process XOR many readers

HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
print("released", flush=True)
time.sleep(30)
"""


def hold_lock(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_reader_retries_then_names_the_lock_holder(nanorun_home):
    path = registry_path(nanorun_home)
    connect(path).close()
    proc = hold_lock(path, 60)
    try:
        t0 = time.monotonic()
        with pytest.raises(RegistryLocked, match=f"locked by process {proc.pid}"):
            connect(path, read_only=True, timeout=1.0)
        assert 0.5 < time.monotonic() - t0 < 5
        with pytest.raises(RegistryLocked):
            sync(timeout=0)  # the CLI's "sync if you can" path gives up at once
    finally:
        proc.kill()
        proc.wait()


def test_reader_waits_for_a_short_writer(nanorun_home):
    make_run_tree(nanorun_home, "d12")
    sync()
    proc = hold_lock(registry_path(nanorun_home), 1.0)
    try:
        t0 = time.monotonic()
        assert len(list_runs()) == 1  # retried until the writer closed
        assert time.monotonic() - t0 > 0.5
    finally:
        proc.kill()
        proc.wait()


# -----------------------------------------------------------------------------
# Queries


def test_get_run_detail_and_id_matching(nanorun_home):
    old = make_run_tree(nanorun_home, "d12", seed=0, created_at=1000.0, run_id="d12-aaaa1111")
    make_run_tree(nanorun_home, "d12", seed=1, created_at=2000.0, run_id="d12-aaab2222")
    make_run_tree(nanorun_home, "other", core_tasks=14)
    sync()
    detail = get_run("d12-aaaa")
    assert detail["run"]["run_id"] == os.path.basename(old)
    assert detail["run"]["plan"]["stages"][0]["params"]["depth"] == 4 and detail["run"]["depth"] == 4
    assert [s["stage"] for s in detail["stages"]] == ["tok_train", "base_train", "base_eval"]
    train = detail["stages"][1]
    assert train["result"]["total_training_time"] == 3600.0
    assert train["last_metrics"]["train_loss"] == {"step": 19, "value": pytest.approx(5.0 - 19 * 0.01)}
    assert detail["stages"][2]["result"]["core_partial"] is False
    assert len(detail["core"]) == 22 and detail["core"][0] == {"task": "task00", "accuracy": 0.5, "centered": 0.3,
                                                               "n": 100}
    assert [s["prompt"] for s in detail["samples"]] == ["The capital of France is", "If yesterday was Friday, then"]
    assert get_run("d12")["run"]["run_id"] == "d12-aaab2222"  # a spec name means its newest run
    assert len(get_run("other")["core"]) == 14
    with pytest.raises(RunDirError, match="ambiguous run 'd12-aaa' matches 2 runs"):  # the rule of nanochat.rundir
        get_run("d12-aaa")
    with pytest.raises(RunDirError, match="unknown run 'nope'"):
        get_run("nope")


def test_query_is_read_only_and_reports_bad_sql(nanorun_home):
    make_run_tree(nanorun_home, "d12")
    sync()
    columns, rows = query("SELECT name, round(val_bpb, 3) AS bpb FROM run_summary")
    assert columns == ["name", "bpb"] and rows == [("d12", 0.8)]
    with pytest.raises(QueryError, match="syntax error") as e:
        query("SELEC 1")
    assert e.value.exit_code == 2
    with pytest.raises(QueryError, match="read-only"):
        query("DELETE FROM runs")
    assert counts(nanorun_home)["runs"] == 1


def test_leaderboard_ranks_groups_and_explains(nanorun_home):
    h100 = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100-SXM", "usd_per_gpu_hour": 3.0}
    a100 = {"nodes": 2, "gpus_per_node": 8, "gpu": "A100", "usd_per_gpu_hour": 2.0}
    for seed, (hours, core) in enumerate([(2.0, 0.26), (2.2, 0.27), (2.4, 0.28)]):
        make_run_tree(nanorun_home, "slow", seed=seed, total_training_time=hours * 3600, core_metric=core,
                      hardware=h100)
    for seed, hours in enumerate([1.5, 1.7]):
        make_run_tree(nanorun_home, "fast", seed=seed, total_training_time=hours * 3600, core_metric=0.3,
                      hardware=h100)
    make_run_tree(nanorun_home, "fast", seed=9, total_training_time=1.0 * 3600, core_metric=0.3, hardware=a100)
    make_run_tree(nanorun_home, "weak", core_metric=0.08)
    make_run_tree(nanorun_home, "partial", core_tasks=14, core_metric=0.4)
    make_run_tree(nanorun_home, "live", status="running")
    make_run_tree(nanorun_home, "failed", core_metric=None)
    sync()
    rows = leaderboard()
    ranked = [(r["rank"], r["name"], r["hardware"], r["n"]) for r in rows if r["qualified"]]
    assert ranked == [(1, "fast", "16xA100", 1), (2, "fast", "8xH100-SXM", 2), (3, "slow", "8xH100-SXM", 3)]
    slow = rows[2]
    assert slow["hours"] == pytest.approx(2.2) and slow["hours_std"] == pytest.approx(0.2)
    assert slow["core_metric"] == pytest.approx(0.27) and slow["core_std"] == pytest.approx(0.01)
    assert slow["cost_usd"] == pytest.approx(2.2 * 8 * 3.0)
    assert rows[0]["cost_usd"] == pytest.approx(1.0 * 16 * 2.0) and rows[0]["hours_std"] is None
    reasons = {r["name"]: r["reason"] for r in rows if not r["qualified"]}
    assert reasons == {"weak": "CORE 0.0800 < 0.2565", "partial": "partial CORE (14/22)",
                       "live": "no CORE yet (running)", "failed": "no CORE yet (success)"}
    assert all(r["rank"] is None for r in rows[3:])
    assert [r["name"] for r in leaderboard(qualified_only=True)] == ["fast", "fast", "slow"]


def test_leaderboard_groups_seeds_by_recipe_not_by_name(nanorun_home):
    # two recipes saved under one name are two entries; the seeds of each average together
    for seed, hours in enumerate([1.0, 1.2]):
        make_run_tree(nanorun_home, "d12", seed=seed, total_training_time=hours * 3600, recipe="lr0.02")
    for seed, hours in enumerate([3.0, 3.4, 3.2]):
        make_run_tree(nanorun_home, "d12", seed=seed, total_training_time=hours * 3600, recipe="lr0.04")
    make_run_tree(nanorun_home, "solo", total_training_time=2 * 3600)
    sync()
    rows = leaderboard(qualified_only=True)
    assert [(r["name"], r["n"]) for r in rows] == [("d12", 2), ("solo", 1), ("d12", 3)]
    assert rows[0]["hours"] == pytest.approx(1.1) and rows[2]["hours"] == pytest.approx(3.2)
    assert rows[0]["recipe_hash"] != rows[2]["recipe_hash"]
    labels = recipe_labels(rows)
    assert labels[1] == "solo" and labels[0] == f"d12 @{rows[0]['recipe_hash'][:8]}" != labels[2]
    out = subprocess.run([sys.executable, "-m", "runners", "leaderboard", "--qualified"], capture_output=True,
                         text=True, env={**os.environ, "NANORUN_HOME": str(nanorun_home)})
    assert out.returncode == 0 and labels[0] in out.stdout and labels[2] in out.stdout, out.stdout + out.stderr


def test_runs_recorded_before_recipe_hashes_get_one_from_their_spec(nanorun_home):
    # an older run.json has no recipe_hash: ingest derives it from the recorded spec, so its seeds still group,
    # and a spec that no longer loads leaves the run a group of its own
    base = open(os.path.join(os.path.dirname(__file__), "..", "specs", "cpu_demo.yaml")).read()
    for seed, hours in enumerate([1.0, 2.0]):
        run_dir = make_run_tree(nanorun_home, "cpu_demo", seed=seed, total_training_time=hours * 3600, recipe=None)
        run = json.load(open(os.path.join(run_dir, "run.json")))
        run["spec_yaml"] = base + f"\nseed: {seed}\n"
        json.dump(run, open(os.path.join(run_dir, "run.json"), "w"))
    make_run_tree(nanorun_home, "cpu_demo", seed=7, recipe=None)   # spec_yaml "name: cpu_demo": does not load
    sync()
    rows = leaderboard(qualified_only=True)
    assert sorted(r["n"] for r in rows) == [1, 2]
    import specs
    grouped = next(r for r in rows if r["n"] == 2)
    assert grouped["recipe_hash"] == specs.recipe_hash(specs.load_text(base + "\nseed: 3\n"))
    assert next(r for r in rows if r["n"] == 1)["recipe_hash"] is None


def test_migration_to_recipe_hashes_re_reads_every_run(nanorun_home):
    # a registry written before v5 has runs but no recipe_hash column: migrating adds it and makes the next sync
    # re-read every run (their run.json did not change), so old seeds group at once
    ids = sorted(os.path.basename(make_run_tree(nanorun_home, "d12", seed=seed)) for seed in (0, 1))
    assert sorted(sync()) == ids and sync() == []   # ingested once; unchanged runs are not re-read
    path = registry_path(nanorun_home)
    raw = duckdb.connect(path)   # back to version 4, as that nanorun left it
    for view in ("leaderboard", "run_summary"):
        raw.execute(f"DROP VIEW {view}")
    raw.execute("ALTER TABLE runs DROP COLUMN recipe_hash")
    raw.execute("DELETE FROM schema_version WHERE version = 5")
    raw.close()
    assert sorted(sync()) == ids   # the sync migrates, then re-reads every run
    rows = leaderboard(qualified_only=True)
    assert [r["n"] for r in rows] == [2] and rows[0]["recipe_hash"]


def test_core_exactly_at_threshold_qualifies(nanorun_home):
    make_run_tree(nanorun_home, "edge", core_metric=0.256525)
    make_run_tree(nanorun_home, "below", core_metric=0.2565)
    sync()
    assert [r["name"] for r in leaderboard(qualified_only=True)] == ["edge"]


# -----------------------------------------------------------------------------
# Real stage output (slash metric names, the aggregate CORE event, CPU runs, cached and stopped stages)

CPU = {"nodes": 1, "gpus_per_node": 1, "gpu": "cpu", "usd_per_gpu_hour": 0.0, "device_type": "cpu"}


def summary(run_id):
    return next(r for r in list_runs() if r["run_id"] == run_id)


def edit_result(run_dir, stage, drop=(), **update):
    """Remove (result files of older stages lack them) or set metrics in a stage's result.json."""
    run = json.load(open(os.path.join(run_dir, "run.json")))
    path = os.path.join(next(s["dir"] for s in run["stages"] if s["stage"] == stage), "result.json")
    result = json.load(open(path))
    for name in drop:
        del result["metrics"][name]
    result["metrics"].update(update)
    with open(path, "w") as f:
        json.dump(result, f)


def test_core_task_count_is_the_stages_own(nanorun_home):
    # base_eval logs one eval event per task plus an aggregate (task CORE): 14 tasks, not 15
    make_run_tree(nanorun_home, "tiny", core_tasks=14, core_metric=0.054, real_names=True, run_id="tiny-1")
    counted = make_run_tree(nanorun_home, "tiny", seed=1, core_tasks=14, core_metric=0.054, real_names=True,
                            run_id="tiny-2")
    edit_result(counted, "base_eval", ["core_tasks", "core_partial", "core_missing"])  # counted from events
    sync()
    for run_id in ("tiny-1", "tiny-2"):
        row = summary(run_id)
        assert (row["core_tasks"], row["core_partial"]) == (14, True)
    assert {r["reason"] for r in leaderboard()} == {"partial CORE (14/22)"}
    detail = get_run("tiny-1")
    assert [c["task"] for c in detail["core"]] == [f"task{i:02d}" for i in range(14)]  # no 'CORE' row
    assert detail["stages"][2]["result"]["core_missing"] == [f"task{i:02d}" for i in range(14, 22)]


def test_partial_core_is_never_ranked_with_full_core(nanorun_home):
    make_run_tree(nanorun_home, "full", core_metric=0.26, total_training_time=7200, real_names=True)
    # 21 tasks + the aggregate event look like 22 distinct names; the result has no verdict of its own
    sneaky = make_run_tree(nanorun_home, "sneaky", core_tasks=21, core_metric=0.5, total_training_time=60,
                           real_names=True)
    edit_result(sneaky, "base_eval", ["core_tasks", "core_partial", "core_missing"])
    # a CORE figure with no task count and no verdict at all is not trusted as full either
    unknown = make_run_tree(nanorun_home, "unknown", core_tasks=0, core_metric=0.5, total_training_time=60)
    edit_result(unknown, "base_eval", ["core_partial"])
    # the stage's own count wins over the events it logged
    says = make_run_tree(nanorun_home, "says14", core_metric=0.5, total_training_time=60, real_names=True)
    edit_result(says, "base_eval", core_tasks=14, core_partial=False)
    sync()
    rows = leaderboard()
    assert [(r["rank"], r["name"]) for r in rows if r["qualified"]] == [(1, "full")]
    reasons = {r["name"]: r["reason"] for r in rows if not r["qualified"]}
    assert reasons == {"sneaky": "partial CORE (21/22)", "unknown": "partial CORE (0/22)",
                       "says14": "partial CORE (14/22)"}
    assert all(r["rank"] is None for r in rows if not r["qualified"])


def test_live_val_bpb_and_wall_from_real_metric_names(nanorun_home):
    live = os.path.basename(make_run_tree(nanorun_home, "live", status="running", real_names=True))
    stopped = os.path.basename(make_run_tree(nanorun_home, "stopped", status="interrupted", real_names=True,
                                             val_bpb=1.0))
    done = os.path.basename(make_run_tree(nanorun_home, "done", real_names=True, total_training_time=0.0))
    sync()
    # 10 of 20 steps logged; val/bpb at steps 0 and 5: 0.8 + 0.5 - 5 * 0.5 / 20
    row = summary(live)
    assert row["val_bpb"] == pytest.approx(1.175) and row["train_step"] == 9
    assert row["train_wall_seconds"] == pytest.approx(9.0)  # last logged point - stage start, while running
    row = summary(stopped)
    assert row["status"] == "interrupted" and row["val_bpb"] == pytest.approx(1.375)
    assert row["train_wall_seconds"] == pytest.approx(90.0)  # stopped: finished_at - started_at
    assert row["core_metric"] is None and row["core_partial"] is False
    row = summary(done)
    assert row["total_training_time"] == 0.0 and row["train_wall_seconds"] == 90.0  # a 10-step run: 0 timed seconds
    assert row["val_bpb"] == pytest.approx(0.8)


def test_cached_train_stage_keeps_its_wall_time(nanorun_home):
    first = make_run_tree(nanorun_home, "d4", run_id="d4-first", created_at=1000.0)
    run = json.load(open(os.path.join(first, "run.json")))
    run.update(run_id="d4-again", created_at=2000.0)
    for stage in run["stages"]:  # the runner found every stage done: no times of its own
        stage.update(status="cached", started_at=None, finished_at=None, wall_seconds=None, exit_code=None)
    os.makedirs(os.path.join(nanorun_home, "runs", "d4-again"))
    with open(os.path.join(nanorun_home, "runs", "d4-again", "run.json"), "w") as f:
        json.dump(run, f)
    sync()
    assert summary("d4-again")["train_wall_seconds"] == 90.0
    assert summary("d4-again")["core_metric"] == pytest.approx(0.3)


def test_cpu_hardware_and_unpriced_cost(nanorun_home):
    make_run_tree(nanorun_home, "cpu", hardware=CPU, run_id="cpu-1")
    make_run_tree(nanorun_home, "cpu", seed=1, run_id="cpu-2",
                  hardware={"nodes": 1, "gpus_per_node": None, "gpu": None, "device_type": "cpu"})
    make_run_tree(nanorun_home, "gpu", run_id="gpu-1")
    sync()
    assert [(summary(r)["hardware"], summary(r)["cost_usd"]) for r in ("cpu-1", "cpu-2")] == \
        [("1xcpu", None), ("1xcpu", None)]
    assert summary("gpu-1")["cost_usd"] == pytest.approx(1.0 * 8 * 3.0)
    rows = leaderboard()
    assert [(r["name"], r["hardware"], r["n"]) for r in rows] == [("cpu", "1xcpu", 2), ("gpu", "8xH100-SXM", 1)]
    assert rows[0]["cost_usd"] is None


def test_v1_file_gets_the_new_views(nanorun_home, monkeypatch):
    path = registry_path(nanorun_home)
    with monkeypatch.context() as m:  # a file written by schema version 1 (its own, older views)
        m.setattr(db, "MIGRATIONS", [db.MIGRATIONS[0] + ["CREATE VIEW run_summary AS SELECT run_id FROM runs",
                                                         "CREATE VIEW leaderboard AS SELECT * FROM run_summary"]])
        m.setattr(db, "SCHEMA_VERSION", 1)
        connect(path).close()
    make_run_tree(nanorun_home, "tiny", core_tasks=14, core_metric=0.05, real_names=True)
    sync()  # migrates to the current version
    _, rows = query("SELECT max(version) FROM schema_version")
    assert rows == [(SCHEMA_VERSION,)] and SCHEMA_VERSION >= 2
    assert leaderboard()[0]["reason"] == "partial CORE (14/22)"
    assert list_runs()[0]["train_wall_seconds"] == 90.0
