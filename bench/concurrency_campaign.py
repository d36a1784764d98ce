"""
Concurrency campaign (issue 14 item 3): N concurrent `nanorun apply` of different tiny CPU specs in one fresh
$NANORUN_HOME, while readers poll the same home as fast as they can: `runs --json`, `leaderboard --json`,
`query --json`, `show RUN --json` (real CLI processes) and a real TUI driven headless (Textual's run_test + Pilot:
refresh the runs table, open a run's detail, open the leaderboard, over and over). Then the registry is checked
against the run directories, after `registry sync` and again after `registry rebuild`.

    .venv/bin/python bench/concurrency_campaign.py                    # 4 applies, one loop of each reader
    .venv/bin/python bench/concurrency_campaign.py --applies 2 --steps 4 --pause 0.5   # the test suite's sample
    .venv/bin/python bench/concurrency_campaign.py --duration 300     # keep the readers polling for 5 minutes

Applies and readers run the real CLI (`python -m runners`) with a pinned capability record (NANORUN_CAPS, as in the
test suite), so no apply measures this machine's matmul peaks first.

The specs differ in seed and step count (so each has its own run and base_train stage) and share one data and one
tokenizer stage (same content key). All applies start at once, so they race for those two stages: the first takes
the stage's lock and runs it; another apply that reaches a stage while it is being run is refused with the
documented one-line "is being run by another nanorun apply" (exit 1) and is applied again, as a user would, until
it finishes (a refusal is counted, not a failure). Prints one table of figures and exits 1 if anything failed.

What counts as a failure:
- an apply that exits non-zero for any other reason, prints a traceback, or warns that the registry was not updated
  (its ingest gave up on the lock); a shared stage started more than once;
- a CLI reader call that exits non-zero (a RegistryLocked "gave up after 10s" too: readers must not wait that
  long) or writes anything to stderr, or whose --json output is not what the command promises; `show` of a run the
  registry had already listed that it no longer finds;
- over time: the run count going down, a listed run disappearing, a finished run listed as anything else later;
- the TUI raising anything (a worker that fails crashes run_test), or its leaderboard saying "registry unavailable".
  "registry busy" is the TUI's documented answer while a writer holds the file past its 2 s wait: counted, not a
  failure;
- after all applies: any row that differs between the registry and the run directories (runs and their stages with
  their status; metrics, samples and evals rows equal to the events in each stage's events.jsonl; result.json's
  metric names), checked right after the applies (the registry as the applies and readers left it), after
  `registry sync`, and after `registry rebuild`, whose rows must also equal sync's.
"""

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanochat import rundir  # noqa: E402 (the events.jsonl reading rule every reader shares)

SPEC = """\
name: concurrency{index}
seed: {index}
hardware: {{gpu: cpu, device_type: cpu}}
data:
  train:
    - {{source: text, path: {text_dir}}}
tokenizer: {{vocab_size: 512, max_chars: 1000000}}
model: {{depth: 1, head_dim: 64, max_seq_len: 128, window_pattern: L}}
train:
  num_iterations: {steps}
  device_batch_size: 4
  total_batch_size: 512
  warmup_steps: 1
  save_every: -1
  eval_every: {eval_every}
  eval_tokens: 1024
  sample_every: {steps}
  core_metric_every: -1
  compile: false
stages: [data, tok_train, base_train]
"""
SHARED = ("data", "tok_train")
REFUSED = re.compile(r"^error: stage \w+ \(.*\) is being run by another nanorun apply")


def write_corpus(directory, docs=150, seed=0):
    """`docs` .txt files of ~1.3 KB of generated sentences (common words plus made-up ones, so BPE has merges)."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    words = ("the of and to in is was that for on with as by at from his her they have which this be river king ship "
             "whale island people nation sea night morning letter garden walked spoke quickly because question").split()
    syllables = "ka lo mi ra sen tor vel an qu ix bre dol fa gin hu".split()
    for d in range(docs):
        sentences = []
        while sum(map(len, sentences)) < 1300:
            n = rng.randint(4, 14)
            sentence = " ".join(rng.choice(words) if rng.random() < 0.7 else
                                "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n))
            sentences.append(sentence.capitalize() + ".")
        with open(os.path.join(directory, f"doc_{d:04d}.txt"), "w") as f:
            f.write(" ".join(sentences))


def write_specs(root, n, steps, text_dir):
    paths = []
    for i in range(n):
        path = os.path.join(root, f"concurrency{i}.yaml")
        with open(path, "w") as f:   # seed and steps differ: own run id and base_train key, same data + tokenizer
            f.write(SPEC.format(index=i, steps=steps + i % 2, eval_every=max(steps // 2, 1), text_dir=text_dir))
        paths.append(path)
    return paths


# A fixed capability record (as the test suite pins one), so no apply measures this machine's matmul peaks first
CAPS = {"cpu": {"device_type": "cpu", "name": "campaign CPU (AVX2 only)", "arch": "x86_64", "flags": ["avx2", "fma"],
                "cores": os.cpu_count() or 1, "memory_bytes": 8 * 2 ** 30, "compute_capability": None,
                "matmul_flops": {"float32": 1.0e11, "bfloat16": 1.0e9}}}


def cli(args, home, timeout):
    """One real `nanorun` process (python -m runners is the console script's entry point); killed after `timeout`
    seconds, which it reports as exit 124."""
    cmd = [sys.executable, "-m", "runners", *args]
    env = dict(os.environ, NANORUN_HOME=home, PYTHONPATH=ROOT)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"(killed: still running after {timeout} s)")


class Tally:
    """Counters and failures shared by the worker threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = collections.Counter()
        self.seconds = collections.defaultdict(list)   # wall seconds of each call, per kind
        self.failures = []        # (what, one line)
        self.observations = []    # (t0, t1, run count, {run_id: status} or None) of each registry read
        self.listed = []          # run ids the registry has listed (show picks from these)

    def fail(self, what, line):
        with self.lock:
            self.failures.append((what, line[:300]))

    def count(self, what):
        with self.lock:
            self.calls[what] += 1


# -----------------------------------------------------------------------------
# Writers: the applies


def apply_until_done(spec_path, home, log_path, tally, max_tries=60):
    """Apply a spec until it succeeds; a refusal because another apply runs a shared stage is retried."""
    for attempt in range(max_tries):
        proc = cli(["apply", spec_path, "--yes"], home, timeout=3600)
        with open(log_path, "a") as f:
            f.write(f"=== attempt {attempt + 1}: exit {proc.returncode}\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
            return tally.fail(f"apply {os.path.basename(spec_path)}", "traceback: " + lines[-1])
        for line in lines:
            if line.startswith("warning: registry not updated"):   # its ingest gave up on the lock
                tally.fail(f"apply {os.path.basename(spec_path)}", line)
        errors = [line for line in lines if not line.startswith("warning: registry not updated")]
        if proc.returncode == 0:
            return tally.count("apply ok")
        if proc.returncode == 1 and len(errors) == 1 and REFUSED.match(errors[0]):
            tally.count("apply refused")
            time.sleep(1 + 2 * random.random())
            continue
        return tally.fail(f"apply {os.path.basename(spec_path)}", f"exit {proc.returncode}: " +
                          (errors[-1] if errors else "(no stderr)"))
    tally.fail(f"apply {os.path.basename(spec_path)}", f"still refused after {max_tries} tries")


def shared_stage_starts(log_dir):
    """{stage: how many times an apply started or resumed it}, from the applies' output."""
    starts = collections.Counter()
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                m = re.match(r"^\[(\w+)\] (starting|resuming) in ", line)
                if m:
                    starts[m.group(1)] += 1
    return starts


# -----------------------------------------------------------------------------
# Readers: CLI loops


def read_once(kind, home, tally, rng):
    """One reader call; returns False when there was nothing to do yet."""
    if kind == "show":
        with tally.lock:
            if not tally.listed:
                return False
            run_id = rng.choice(tally.listed)
        args = ["show", run_id, "--json"]
    else:
        args = {"runs": ["runs", "--json"], "leaderboard": ["leaderboard", "--json"],
                "query": ["query", "select count(*) AS n from runs", "--json"]}[kind]
    t0 = time.time()
    proc = cli(args, home, timeout=120)
    t1 = time.time()
    tally.count(kind)
    with tally.lock:
        tally.seconds[kind].append(t1 - t0)
    if proc.returncode != 0 or proc.stderr.strip():
        lines = proc.stderr.strip().splitlines() or ["(no stderr)"]
        return tally.fail(kind, f"exit {proc.returncode}: {lines[-1]}")
    try:
        out = json.loads(proc.stdout)
        if kind == "runs":
            statuses = {r["run_id"]: r["status"] for r in out}
            with tally.lock:
                tally.observations.append((t0, t1, len(out), statuses))
                tally.listed = sorted(set(tally.listed) | set(statuses))
        elif kind == "query":
            with tally.lock:
                tally.observations.append((t0, t1, int(out[0]["n"]), None))
        elif kind == "show":
            assert out["run"]["run_id"] == run_id and isinstance(out["stages"], list)
        else:
            assert isinstance(out, list) and all("reason" in r for r in out)
    except (ValueError, KeyError, IndexError, TypeError, AssertionError) as e:
        tally.fail(kind, f"unexpected output ({type(e).__name__}): {proc.stdout[:200]!r}")
    return True


def reader_loop(kind, home, tally, stop, seed, pause):
    rng = random.Random(seed)
    while not stop.is_set():
        if not read_once(kind, home, tally, rng):
            time.sleep(0.2)
        stop.wait(pause)


def ordering_problems(observations):
    """Reads that finished before another began must not see more than it: the run count never goes down, a listed
    run never disappears, a finished (success) run is never listed with another status later."""
    problems = []
    by_end = sorted(observations, key=lambda o: o[1])
    most, seen, done, j = 0, set(), set(), 0
    for t0, _, count, statuses in sorted(observations, key=lambda o: o[0]):
        while j < len(by_end) and by_end[j][1] < t0:
            most = max(most, by_end[j][2])
            if by_end[j][3] is not None:
                seen |= set(by_end[j][3])
                done |= {r for r, s in by_end[j][3].items() if s == "success"}
            j += 1
        if count < most:
            problems.append(f"run count went down: {most} -> {count}")
        if statuses is not None:
            problems += [f"run {r} vanished from `runs`" for r in sorted(seen - set(statuses))]
            problems += [f"run {r}: success, then {statuses[r]}" for r in sorted(done & set(statuses))
                         if statuses[r] != "success"]
    return problems


# -----------------------------------------------------------------------------
# The TUI, in its own process (a real app instance polling the home like a user's terminal)


def tui_driver(home, stop_file, out_path, pause):
    import asyncio

    from textual.widgets import DataTable, Static

    from tui.app import NanorunApp
    from tui.leaderboard_screen import LeaderboardScreen
    from tui.run_detail import RunDetailScreen

    counts = collections.Counter()
    failures = []
    parent = os.getppid()

    async def drive():
        app = NanorunApp(home=home, refresh_seconds=None, monitor_seconds=0.2)
        async with app.run_test(size=(140, 40)) as pilot:
            while not os.path.exists(stop_file) and os.getppid() == parent:   # stop, or the campaign is gone
                await pilot.press("r")               # reload the runs table from the run directories
                await pilot.pause()
                counts["refreshes"] += 1
                table = app.screen.query_one("#runs-table", DataTable)
                if table.row_count:
                    await pilot.press("enter")       # a run's detail and live monitor
                    await pilot.pause(0.1)
                    if isinstance(app.screen, RunDetailScreen):
                        counts["details"] += 1
                        await pilot.press("escape")
                        await pilot.pause()
                await pilot.press("l")
                if not isinstance(app.screen, LeaderboardScreen):
                    failures.append(f"leaderboard screen did not open ({type(app.screen).__name__})")
                    break
                await app.workers.wait_for_complete()
                await pilot.pause()
                status = str(app.screen.query_one("#leaderboard-status", Static).render())
                counts["leaderboards"] += 1
                if status.startswith("registry busy"):
                    counts["busy"] += 1
                elif "ranked" not in status:
                    failures.append(f"leaderboard: {status[:200]}")
                await pilot.press("escape")
                await pilot.pause(float(pause) or None)

    try:
        asyncio.run(drive())
    except Exception as e:   # a worker that raised ends run_test with its exception
        failures.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    with open(out_path, "w") as f:
        json.dump({"counts": counts, "failures": failures}, f)


def start_tui(home, stop_file, out_path, log_path, pause):
    env = dict(os.environ, NANORUN_HOME=home, PYTHONPATH=ROOT)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tui-driver", home, stop_file, out_path,
                             str(pause)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log.close()
    return proc


def stop_tui(proc, stop_file, out_path, log_path):
    """(counts, failures) of the TUI driver, once it has stopped."""
    open(stop_file, "w").close()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if os.path.exists(out_path):
        with open(out_path) as f:
            result = json.load(f)
        return collections.Counter(result["counts"]), result["failures"]
    with open(log_path) as f:
        last = (f.read().strip().splitlines() or [""])[-1]
    return collections.Counter(), [f"TUI driver exit {proc.returncode}: {last}"]


# -----------------------------------------------------------------------------
# The registry against the run directories


def _float(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def expected_rows(home):
    """The rows the run directories say the registry should hold, per table, as multisets."""
    rows = {t: collections.Counter() for t in ("runs", "stages", "metrics", "samples", "evals", "results")}
    keys = {}
    runs_dir = os.path.join(home, "runs")
    for run_id in sorted(os.listdir(runs_dir)):
        with open(os.path.join(runs_dir, run_id, "run.json")) as f:
            run = json.load(f)
        rows["runs"][(run["run_id"], run["name"], run["status"])] += 1
        for idx, s in enumerate(run["stages"]):
            rows["stages"][(run["run_id"], idx, s["stage"], s["key"], s["status"], s.get("exit_code"))] += 1
            keys[s["key"]] = s["dir"]
    for key, directory in keys.items():
        for _, e in rundir.read_events(os.path.join(directory, "events.jsonl")):
            step = e.get("step") if isinstance(e.get("step"), int) else None
            if e.get("kind") == "metric":
                for name, value in (e.get("values") or {}).items():
                    rows["metrics"][(key, step, name, _float(value))] += 1
            elif e.get("kind") == "sample":
                rows["samples"][(key, step, e.get("prompt"), e.get("text"))] += 1
            elif e.get("kind") == "eval":
                rows["evals"][(key, step, e.get("task"), e.get("metric"), _float(e.get("value")))] += 1
        result = os.path.join(directory, "result.json")
        if os.path.exists(result):
            with open(result) as f:
                for name in json.load(f).get("metrics") or {}:
                    rows["results"][(key, name)] += 1
    return rows


REGISTRY_SQL = {
    "runs": "SELECT run_id, name, status FROM runs",
    "stages": "SELECT run_id, idx, stage, key, status, exit_code FROM stages",
    "metrics": "SELECT key, step, name, value FROM metrics",
    "samples": "SELECT key, step, prompt, text FROM samples",
    "evals": "SELECT key, step, task, metric, value FROM evals",
    "results": "SELECT key, name FROM stage_results",
}


def registry_rows(home):
    import duckdb
    con = duckdb.connect(os.path.join(home, "registry.duckdb"), read_only=True)
    try:
        return {table: collections.Counter(map(tuple, con.execute(sql).fetchall()))
                for table, sql in REGISTRY_SQL.items()}
    finally:
        con.close()


def all_rows(home):
    """Every row of every table (ingested_at left out: when, not what), to compare sync with rebuild."""
    import duckdb
    con = duckdb.connect(os.path.join(home, "registry.duckdb"), read_only=True)
    try:
        out = {}
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
                                    "AND table_name <> 'schema_version' ORDER BY 1").fetchall():
            cols = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                              "ORDER BY ordinal_position", [table]).fetchall() if c != "ingested_at"]
            rows = con.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
            out[table] = sorted(json.dumps(r, default=str) for r in rows)
        return out
    finally:
        con.close()


def compare(home):
    """(differences as lines, rows compared per table)."""
    want, have = expected_rows(home), registry_rows(home)
    problems = []
    for table in want:
        missing, extra = want[table] - have[table], have[table] - want[table]
        if missing or extra:
            problems.append(f"{table}: {sum(missing.values())} rows missing from the registry, {sum(extra.values())} "
                            f"extra; e.g. {(list(missing) or list(extra))[0]}")
    return problems, {t: sum(c.values()) for t, c in want.items()}


def check_registry(home, tally):
    """The registry against the run directories as the applies and readers left it, after `registry sync` and after
    `registry rebuild` (whose rows must also equal sync's). Returns (rows compared per table, rebuilt rows)."""
    def check(what):
        problems, compared = compare(home)
        for line in problems:
            tally.fail(f"registry {what}", line)
        return compared

    def command(args):
        proc = cli(args, home, timeout=600)
        if proc.returncode != 0 or proc.stderr.strip():
            tally.fail(" ".join(args), f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")

    check("after the applies")
    command(["registry", "sync"])
    check("after sync")
    synced = all_rows(home)
    command(["registry", "rebuild"])
    compared = check("after rebuild")
    rebuilt = all_rows(home)
    for table in sorted(set(synced) | set(rebuilt)):
        if synced.get(table) != rebuilt.get(table):
            tally.fail("rebuild", f"{table}: rows differ from the synced registry")
    return compared, rebuilt


# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--applies", type=int, default=4, help="concurrent applies of different specs (default 4)")
    p.add_argument("--steps", type=int, default=12, help="base_train steps of each spec (odd-numbered specs: +1)")
    p.add_argument("--readers", type=int, default=1, help="concurrent loops of each CLI reader kind (default 1)")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds each reader waits between calls (default 0: as fast as it can)")
    p.add_argument("--no-tui", action="store_true", help="leave the TUI out")
    p.add_argument("--duration", type=float, default=0.0,
                   help="keep the readers polling at least this many seconds (default: until the applies finish)")
    p.add_argument("--keep", action="store_true", help="keep the temporary home and logs")
    p.add_argument("--tui-driver", nargs=4, metavar=("HOME", "STOP_FILE", "OUT", "PAUSE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tui_driver:
        return tui_driver(*args.tui_driver)

    root = tempfile.mkdtemp(prefix="nanorun-concurrency-")
    home, logs = os.path.join(root, "home"), os.path.join(root, "logs")
    os.makedirs(logs)
    if not os.environ.get("NANORUN_CAPS"):
        os.environ["NANORUN_CAPS"] = os.path.join(root, "caps.json")
        with open(os.environ["NANORUN_CAPS"], "w") as f:
            json.dump(CAPS, f)
    write_corpus(os.path.join(root, "text"))
    spec_paths = write_specs(root, args.applies, args.steps, os.path.join(root, "text"))
    tally, stop = Tally(), threading.Event()
    kinds = ["runs", "leaderboard", "query", "show"]
    print(f"concurrency campaign: {args.applies} applies of different specs; readers: {', '.join(kinds)} "
          f"x{args.readers}{'' if args.no_tui else ' + the TUI'}; home {home}", flush=True)

    # --- everything at once: the readers and the TUI, then the applies; the readers stop after the applies
    t0 = time.time()
    readers = [threading.Thread(target=reader_loop, args=(kind, home, tally, stop, 1000 * n + i, args.pause),
                                daemon=True) for n, kind in enumerate(kinds) for i in range(args.readers)]
    tui_files = [os.path.join(root, name) for name in ("tui.stop", "tui.json", "tui.log")]
    tui = None if args.no_tui else start_tui(home, *tui_files, args.pause)
    appliers = [threading.Thread(target=apply_until_done, args=(path, home, os.path.join(logs, f"apply{i}.log"), tally))
                for i, path in enumerate(spec_paths)]
    for t in readers + appliers:
        t.start()
    for t in appliers:
        t.join()
    applies_seconds = time.time() - t0
    while time.time() - t0 < args.duration:
        time.sleep(0.5)
    stop.set()
    for t in readers:
        t.join()
    tui_counts, tui_failures = stop_tui(tui, *tui_files) if tui else (collections.Counter(), [])
    duration = time.time() - t0

    # --- what it left behind
    for line in tui_failures:
        tally.fail("tui", line)
    for line in ordering_problems(tally.observations):
        tally.fail("ordering", line)
    starts = shared_stage_starts(logs)
    for stage in SHARED:
        if starts[stage] != 1:
            tally.fail("shared stage", f"{stage} started {starts[stage]} times (want 1)")
    compared, rebuilt = check_registry(home, tally)

    c = tally.calls
    reads = sum(c[k] for k in kinds)
    print(f"applies     {c['apply ok']} of {args.applies} succeeded; {c['apply refused']} refusals (a shared stage "
          f"another apply was running: documented, applied again)")
    print("            stages started: " + ", ".join(f"{s} {n}" for s, n in sorted(starts.items())))
    print(f"readers     {reads} CLI calls: " + ", ".join(f"{k} {c[k]}" for k in kinds) + f" ({reads / duration:.1f}/s)")
    every = sorted(x for k in kinds for x in tally.seconds[k])
    if every:   # a call's own time: a machine short of CPU shows here first
        print(f"            seconds per call: median {every[len(every) // 2]:.2f}, "
              f"p95 {every[int(len(every) * 0.95)]:.2f}, max {every[-1]:.2f}")
    if tui is not None:
        print(f"tui         {tui_counts['refreshes']} runs-table refreshes, {tui_counts['details']} run details, "
              f"{tui_counts['leaderboards']} leaderboards ({tui_counts['busy']} said \"registry busy\")")
    print(f"ordering    {len(tally.observations)} registry reads checked in time order")
    print("registry    compared with the run directories after the applies, after sync and after rebuild: "
          + ", ".join(f"{t} {n}" for t, n in compared.items()) + f" rows; rebuild against sync: "
          f"{sum(map(len, rebuilt.values()))} rows in {len(rebuilt)} tables")
    print(f"duration    {duration:.0f} s (applies {applies_seconds:.0f} s)")
    for what, line in tally.failures:
        print(f"FAIL {what}: {line}")
    print(f"failures: {len(tally.failures)}")
    print(f"result: {'PASS' if not tally.failures else 'FAIL'}")
    if args.keep or tally.failures:
        print(f"home and logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
