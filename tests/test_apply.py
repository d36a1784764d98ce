"""
`nanorun apply` end to end, as a user runs it: real subprocesses, real torchrun (gloo, CPU), a tiny spec
trained on ~200 KB of real English (the docstrings of the Python standard library). Covers a full apply and
the registry commands, a second apply that skips everything, SIGINT / SIGKILL mid-training and the resume
that reproduces the uninterrupted loss curve, bad input (one line, no traceback), and two applies at once.

    .venv/bin/python -m pytest -q tests/test_apply.py
"""

import ast
import fcntl
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import pytest

import specs
from nanochat.rundir import checkpoint_steps
from runners.plan import make_plan

# the console script, without depending on where pip put it
NANORUN = [sys.executable, "-c", "import sys; sys.argv[0] = 'nanorun'; from runners.cli import main; main()"]

SPEC = """\
name: tiny_apply
hardware: {{gpu: cpu, device_type: cpu}}
data:
  train:
    - {{source: text, path: {text_dir}}}
tokenizer: {{vocab_size: 512, max_chars: 1000000}}
model: {{depth: 2, head_dim: 64, max_seq_len: 128, window_pattern: L}}
train:
  num_iterations: 12
  device_batch_size: 4
  total_batch_size: 512
  warmup_steps: 2
  warmdown_ratio: 0.5
  final_lr_frac: 0.2
  save_every: 4
  eval_every: 6
  eval_tokens: 1024
  sample_every: 12
  core_metric_every: -1
  compile: false
stages: {stages}
"""
FULL_STAGES = '[data, tok_train, base_train, {base_eval: {eval: "bpb,sample", split_tokens: 2048}}]'
TRAIN_STAGES = "[data, tok_train, base_train]"  # same base_train key as the full spec, no 20 s eval


def write_corpus(directory, target_chars=200_000):
    """One .txt file per ~1 KB of standard-library docstrings (parsed, never imported): real English
    with some code in it, many documents so the val split and the packer have something to work with."""
    os.makedirs(directory, exist_ok=True)
    stdlib = sysconfig.get_paths()["stdlib"]
    total, n, chunk = 0, 0, []
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, kinds) else None
            if not doc or len(doc) < 80:
                continue
            chunk.append(doc.encode("ascii", "ignore").decode())
            if sum(len(c) for c in chunk) >= 1000:
                text = "\n\n".join(chunk)
                with open(os.path.join(directory, f"doc_{n:04d}.txt"), "w") as f:
                    f.write(text)
                total, n, chunk = total + len(text), n + 1, []
                if total >= target_chars:
                    return n
    return n


def write_spec(path, text_dir, stages=FULL_STAGES):
    with open(path, "w") as f:
        f.write(SPEC.format(text_dir=text_dir, stages=stages))
    return str(path)


def nanorun(args, home, timeout=300, **kwargs):
    env = dict(os.environ, NANORUN_HOME=home)
    return subprocess.run(NANORUN + list(args), env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def start_apply(spec_path, home, log_path):
    """`nanorun apply --yes` in the background, in its own process group (like a shell job); output to a file."""
    env = dict(os.environ, NANORUN_HOME=home)
    log = open(log_path, "w")
    proc = subprocess.Popen(NANORUN + ["apply", spec_path, "--yes"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc


def wait_for(condition, proc, log_path, timeout=180, what="condition"):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"apply exited ({proc.returncode}) before {what}:\n{open(log_path).read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.05)


def stage_dirs(spec_path, home):
    plan = make_plan(specs.load(spec_path))
    return plan.run_id, {s.name: s.stage_dir(home) for s in plan.stages}


def read_run(home, run_id):
    with open(os.path.join(home, "runs", run_id, "run.json")) as f:
        return json.load(f)  # also proves the file is complete JSON


def loss_curve(stage_dir):
    """step -> train/loss from events.jsonl; a step logged twice (before a kill and after the resume) keeps
    its last value, and both must agree."""
    curve, repeats = {}, []
    with open(os.path.join(stage_dir, "events.jsonl")) as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a killed writer
                continue
            if event.get("kind") == "metric" and "train/loss" in event.get("values", {}):
                step, loss = event["step"], event["values"]["train/loss"]
                if step in curve:
                    repeats.append((step, curve[step], loss))
                curve[step] = loss
    return curve, repeats


def processes_with_arg(text):
    """Live (non-zombie) pids whose command line mentions `text`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def assert_unlocked(lock_path):
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while an apply holds it
        fcntl.flock(f, fcntl.LOCK_UN)


def snapshot(directory):
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_mtime_ns,
                                       os.path.getsize(os.path.join(root, name)))
            for root, _, files in os.walk(directory) for name in files}


# -----------------------------------------------------------------------------
# one full apply, shared by the tests below (it is also the uninterrupted reference loss curve)

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("corpus") / "text")
    assert write_corpus(directory) >= 100
    return directory


@pytest.fixture(scope="module")
def applied(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("applied")
    home = str(root / "home")
    spec_path = write_spec(root / "tiny.yaml", corpus)
    t0 = time.time()
    proc = nanorun(["apply", spec_path, "--yes"], home)
    return {"home": home, "spec": spec_path, "proc": proc, "seconds": time.time() - t0}


@pytest.mark.slow
def test_apply_runs_every_stage_and_records_the_run(applied):
    proc, home = applied["proc"], applied["home"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_id, dirs = stage_dirs(applied["spec"], home)
    run = read_run(home, run_id)
    assert run["status"] == "success" and run["applies"] == 1
    assert [s["stage"] for s in run["stages"]] == ["data", "tok_train", "base_train", "base_eval"]
    assert all(s["status"] == "success" and s["exit_code"] == 0 for s in run["stages"])
    for name, sdir in dirs.items():
        with open(os.path.join(sdir, "result.json")) as f:
            result = json.load(f)
        assert result["stage"] == name and result["status"] == "success"
    with open(os.path.join(dirs["base_train"], "result.json")) as f:
        train = json.load(f)["metrics"]
    assert train["num_iterations"] == 12 and train["depth"] == 2 and 0 < train["val_bpb"] < 20
    with open(os.path.join(dirs["base_eval"], "result.json")) as f:
        evals = json.load(f)["metrics"]
    assert evals["num_samples"] > 0 and 0 < evals["val_bpb"] < 20
    curve, _ = loss_curve(dirs["base_train"])
    assert sorted(curve) == list(range(12))
    # the spec's schedule reached the stage: warmup 2, warmdown over the last 6 steps down to 0.2
    from nanochat.stages.base_train import lr_multiplier
    with open(os.path.join(dirs["base_train"], "events.jsonl")) as f:
        lrm = {e["step"]: e["values"]["train/lrm"] for e in map(json.loads, f)
               if e["kind"] == "metric" and "train/lrm" in e["values"]}
    assert lrm == {step: lr_multiplier(step, 12, 2, 0.5, 0.2) for step in range(12)}
    assert lrm[0] == 0.5 and lrm[3] == 1.0 and lrm[11] == pytest.approx(0.2 + 0.8 / 6)

    runs = nanorun(["runs", "--json"], home)
    assert runs.returncode == 0, runs.stderr
    assert run_id in [r.get("run_id", r.get("id")) for r in json.loads(runs.stdout)]
    show = nanorun(["show", run_id, "--json"], home)
    assert show.returncode == 0, show.stderr
    assert run_id in show.stdout and "base_train" in show.stdout
    board = nanorun(["leaderboard", "--json"], home)
    assert board.returncode == 0, board.stderr
    assert run_id in board.stdout or "tiny_apply" in board.stdout


@pytest.mark.slow
def test_second_apply_skips_every_stage_and_changes_nothing(applied):
    assert applied["proc"].returncode == 0
    home = applied["home"]
    run_id, dirs = stage_dirs(applied["spec"], home)
    before = snapshot(os.path.join(home, "stages"))
    t0 = time.time()
    proc = nanorun(["apply", applied["spec"], "--yes"], home)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    for name in dirs:
        assert f"[{name}] done" in proc.stdout and "skipping" in proc.stdout
    assert "starting" not in proc.stdout and "resuming" not in proc.stdout
    assert seconds < 20, f"a no-op apply took {seconds:.1f}s"
    assert snapshot(os.path.join(home, "stages")) == before  # result.json, checkpoints, logs: untouched
    run = read_run(home, run_id)
    assert run["status"] == "success" and run["applies"] == 2
    assert all(s["status"] == "success" for s in run["stages"])


# -----------------------------------------------------------------------------
# a killed apply loses nothing; applying again continues where it stopped

@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_killed_apply_resumes_base_train_exactly(how, applied, corpus, tmp_path):
    assert applied["proc"].returncode == 0
    home = str(tmp_path / "home")
    # SIGINT: the full spec, so the resumed apply also runs base_eval; SIGKILL: up to base_train (same key)
    spec_path = write_spec(tmp_path / "tiny.yaml", corpus, FULL_STAGES if how == "sigint" else TRAIN_STAGES)
    run_id, dirs = stage_dirs(spec_path, home)
    _, ref_dirs = stage_dirs(applied["spec"], applied["home"])
    assert os.path.basename(dirs["base_train"]) == os.path.basename(ref_dirs["base_train"])  # same content key
    ckpt_dir = os.path.join(dirs["base_train"], "checkpoints")
    log_path = str(tmp_path / "apply1.log")

    proc = start_apply(spec_path, home, log_path)
    # complete: its meta, written last, renamed into place (a meta_*.tmp.PID is a save still under way)
    wait_for(lambda: bool(checkpoint_steps(ckpt_dir)),
             proc, log_path, what="base_train's first checkpoint")
    if how == "sigint":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does to the shell's foreground job
        assert proc.wait(timeout=60) == 130, open(log_path).read()[-3000:]
        out = open(log_path).read()
        assert "Traceback" not in out and "continues where it stopped" in out
        run = read_run(home, run_id)
        assert run["status"] == "interrupted"
        assert {s["stage"]: s["status"] for s in run["stages"]}["base_train"] == "interrupted"
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: the apply gets no chance to clean up
        proc.wait(timeout=30)
        stale = read_run(home, run_id)  # complete JSON; "running", with the pid a reader can check is gone
        assert stale["status"] == "running" and stale["apply_pid"] == proc.pid
    # the stage's processes (torchrun and its worker) do not outlive the apply
    config_path = os.path.join(dirs["base_train"], "config.json")
    deadline = time.time() + 60
    while processes_with_arg(config_path) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_with_arg(config_path) == []
    assert_unlocked(os.path.join(dirs["base_train"], ".lock"))
    assert_unlocked(os.path.join(home, "runs", run_id, ".lock"))
    assert not os.path.exists(os.path.join(dirs["base_train"], "result.json"))

    again = nanorun(["apply", spec_path, "--yes"], home)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[base_train] resuming" in again.stdout
    resumed = [line for line in again.stdout.splitlines() if "resuming from step" in line]
    assert len(resumed) == 1, again.stdout[-3000:]
    step = int(resumed[0].split("resuming from step")[1].split()[0])
    assert 0 < step < 12
    assert f"resuming from step {step}" in open(os.path.join(dirs["base_train"], "stdout.log")).read()
    run = read_run(home, run_id)
    assert run["status"] == "success" and run["applies"] == 2
    assert all(s["status"] == "success" for s in run["stages"])

    # the resumed run is the uninterrupted run: bit-identical loss at every step (same machine, same threads;
    # model, optimizer, data position and RNG all come back from the checkpoint)
    curve, repeats = loss_curve(dirs["base_train"])
    reference, _ = loss_curve(ref_dirs["base_train"])
    assert sorted(curve) == sorted(reference) == list(range(12))
    assert curve == reference
    assert all(a == b for _, a, b in repeats)  # steps redone after the checkpoint reproduce the lost ones


# -----------------------------------------------------------------------------
# bad input gets one clear line and a non-zero exit

def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_malformed_spec_is_one_line_with_its_position(tmp_path):
    home = str(tmp_path / "home")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel:\n  depth: [4\ntrain: {}\n")
    proc = nanorun(["apply", str(bad), "--yes"], home, timeout=60)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {bad}:") and lines[0].split(":")[2].isdigit() and "YAML" in lines[0]
    assert not os.path.exists(home)

    typo = tmp_path / "typo.yaml"
    typo.write_text("name: typo\nmodel:\n  depht: 4\n")
    proc = nanorun(["apply", str(typo), "--yes"], home, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{typo}:3:3: model.depht" in proc.stderr and "depth" in proc.stderr


def test_missing_text_folder_fails_before_anything_runs(corpus, tmp_path):
    home = str(tmp_path / "home")
    missing = str(tmp_path / "no_such_folder")
    spec_path = write_spec(tmp_path / "missing.yaml", missing)
    proc = nanorun(["apply", spec_path, "--yes"], home, timeout=60)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert lines == [f"error: {spec_path}:5:28: data.train[0].path: {missing} does not exist"], proc.stderr
    assert proc.stdout == ""  # caught before the plan is even shown
    assert not os.path.exists(home)  # nothing ran, nothing was written

    plan = nanorun(["plan", spec_path], home, timeout=60)  # plan still shows the plan, with a warning
    assert plan.returncode == 0 and "data.train[0].path" in plan.stderr and "tiny_apply" in plan.stdout

    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    spec_path = write_spec(tmp_path / "file.yaml", str(a_file))
    proc = nanorun(["apply", spec_path, "--yes"], home, timeout=60)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "is not a directory" in proc.stderr


def test_missing_spec_and_unknown_run_are_one_line(tmp_path):
    home = str(tmp_path / "home")
    for args in (["plan", str(tmp_path / "nope.yaml")], ["apply", str(tmp_path / "nope.yaml"), "--yes"]):
        proc = nanorun(args, home, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert error_lines(proc) == [f"error: {tmp_path / 'nope.yaml'}: spec file not found"]
    proc = nanorun(["show", "nonexistent"], home, timeout=60)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "nonexistent" in lines[0] and "Traceback" not in proc.stderr


def test_node_rank_must_be_one_of_the_spec_s_nodes(corpus, tmp_path):
    """A rank the spec has no node for is bad input (exit 2, one line), refused before anything runs: on a
    single-node spec a rank-1 apply would take its own lock files and so not be stopped by a running apply."""
    home = str(tmp_path / "home")
    spec_path = write_spec(tmp_path / "tiny.yaml", corpus, TRAIN_STAGES)
    for rank in ("1", "-1"):
        proc = nanorun(["apply", spec_path, "--yes", "--node-rank", rank], home, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert error_lines(proc) == [f"error: --node-rank {rank}: must be in 0..0 (spec tiny_apply has "
                                     f"hardware.nodes: 1)"]
    assert not os.path.exists(os.path.join(home, "runs"))  # refused before the run directory exists


def test_a_second_apply_with_the_same_node_rank_is_blocked(corpus, tmp_path):
    """On a two-node spec each node's apply holds its own lock file (they share $NANORUN_HOME); a second apply
    of the same run with a rank that is already running is refused by that rank's lock."""
    from runners.execute import apply_plan
    from specs.errors import InputError, LaunchError

    home = str(tmp_path / "home")
    text = SPEC.format(text_dir=corpus, stages=TRAIN_STAGES).replace(
        "device_type: cpu}", "device_type: cpu, nodes: 2}").replace("total_batch_size: 512", "total_batch_size: 1024")
    spec_path = tmp_path / "two_nodes.yaml"
    spec_path.write_text(text)
    plan = make_plan(specs.load(str(spec_path)))
    run_dir = os.path.join(home, "runs", plan.run_id)
    with pytest.raises(InputError, match=r"--node-rank 2: must be in 0\.\.1"):
        apply_plan(plan, home=home, node_rank=2, echo=lambda line: None)
    os.makedirs(run_dir)
    for rank, name in ((0, ".lock"), (1, ".lock-node1")):
        with open(os.path.join(run_dir, name), "a+") as held:  # what that rank's running apply holds
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(LaunchError, match=f"run {plan.run_id} is being run by another nanorun apply"):
                apply_plan(plan, home=home, node_rank=rank, echo=lambda line: None)
    assert not os.path.exists(os.path.join(run_dir, "run.json"))  # neither got past the lock


def test_nodes_sharing_a_home_keep_their_own_records_and_run_single_process_stages_once(corpus, tmp_path):
    """Two nodes' applies on one $NANORUN_HOME: node 1 writes run-node1.json (never run.json, which is node 0's and
    the registry's); a single-process stage another node is running is waited for (same lock file), then found
    done and skipped, not run a second time."""
    import threading

    from nanochat.rundir import read_run, run_record_name, write_result
    from runners.execute import apply_plan

    home = str(tmp_path / "home")
    text = SPEC.format(text_dir=corpus, stages="[data]").replace(
        "device_type: cpu}", "device_type: cpu, nodes: 2}").replace("total_batch_size: 512", "total_batch_size: 1024")
    spec_path = tmp_path / "two_nodes_data.yaml"
    spec_path.write_text(text)
    plan = make_plan(specs.load(str(spec_path)))
    data = plan.stages[0]
    assert data.name == "data" and data.nnodes == 1
    sdir = data.stage_dir(home)
    os.makedirs(sdir)
    lines = []
    with open(os.path.join(sdir, ".lock"), "a+") as held:   # node 0's apply is running the data stage
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        node1 = threading.Thread(target=apply_plan, args=(plan,),
                                 kwargs={"home": home, "node_rank": 1, "echo": lines.append})
        node1.start()
        deadline = time.time() + 60
        while not any("waiting for it" in line for line in lines):
            assert time.time() < deadline and node1.is_alive(), lines
            time.sleep(0.05)
        write_result(sdir, "data", metrics={}, outputs={})   # node 0 finishes it
    node1.join(timeout=60)
    assert not node1.is_alive()
    assert any("[data] done" in line for line in lines), lines
    assert not os.path.exists(os.path.join(sdir, "stdout.log"))   # node 1 never launched it
    run_dir = os.path.join(home, "runs", plan.run_id)
    assert run_record_name(1) == "run-node1.json" and not os.path.exists(os.path.join(run_dir, "run.json"))
    node1_record = read_run(run_dir, 1)
    assert node1_record["status"] == "success" and node1_record["stages"][0]["status"] == "cached"
    apply_plan(plan, home=home, node_rank=0, echo=lambda line: None)   # node 0's own record, untouched by node 1's
    assert read_run(run_dir)["status"] == "success" and read_run(run_dir, 1)["applies"] == 1


# -----------------------------------------------------------------------------
# two applies at once

@pytest.mark.slow
def test_second_concurrent_apply_fails_fast(corpus, tmp_path):
    home = str(tmp_path / "home")
    spec_path = write_spec(tmp_path / "tiny.yaml", corpus, TRAIN_STAGES)
    run_id, dirs = stage_dirs(spec_path, home)
    log_path = str(tmp_path / "first.log")
    first = start_apply(spec_path, home, log_path)
    wait_for(lambda: os.path.exists(os.path.join(dirs["data"], "stdout.log")), first, log_path,
             what="the first apply to start its data stage")
    before = read_run(home, run_id)
    t0 = time.time()
    second = nanorun(["apply", spec_path, "--yes"], home, timeout=60)
    assert time.time() - t0 < 15
    assert second.returncode == 1
    lines = error_lines(second)
    assert len(lines) == 1 and f"run {run_id} is being run by another nanorun apply (pid {first.pid})" in lines[0]
    after = read_run(home, run_id)  # the second apply did not touch the record
    assert after["applies"] == before["applies"] == 1 and after["status"] == "running"
    os.killpg(first.pid, signal.SIGTERM)  # a scheduler's or `kill`'s way to stop it: same as Ctrl-C
    assert first.wait(timeout=60) == 130
    assert read_run(home, run_id)["status"] == "interrupted"


def test_apply_fails_fast_when_another_run_holds_a_shared_stage(corpus, tmp_path):
    """Stages are shared between runs by content key; a stage another apply is running is not started twice."""
    home = str(tmp_path / "home")
    spec_path = write_spec(tmp_path / "tiny.yaml", corpus, TRAIN_STAGES)
    run_id, dirs = stage_dirs(spec_path, home)
    os.makedirs(dirs["data"])
    with open(os.path.join(dirs["data"], ".lock"), "a+") as held:  # what another apply's flock looks like
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = nanorun(["apply", spec_path, "--yes"], home, timeout=60)
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 1 and f"stage data ({dirs['data']}) is being run by another nanorun apply" in lines[0]
    run = read_run(home, run_id)
    assert run["status"] == "failed"  # not left "running" forever
    assert os.listdir(dirs["data"]) == [".lock"]  # the stage never started


def test_apply_waits_for_leftover_processes_of_a_stage(corpus, tmp_path):
    """A process still running with a stage's --config (left by an earlier apply) is waited for before the
    stage is launched again in the same directory."""
    home = str(tmp_path / "home")
    spec_path = write_spec(tmp_path / "data_only.yaml", corpus, "[data]")
    run_id, dirs = stage_dirs(spec_path, home)
    config_path = os.path.join(dirs["data"], "config.json")
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)", "--config", config_path])
    try:
        t0 = time.time()
        proc = nanorun(["apply", spec_path, "--yes"], home, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "[data] waiting for 1 leftover process(es) of an earlier apply to exit" in proc.stdout
        assert leftover.poll() is not None and time.time() - t0 >= 2.5
    finally:
        leftover.kill()
        leftover.wait()
    assert read_run(home, run_id)["status"] == "success"


def test_apply_sets_aside_an_unreadable_run_record(corpus, tmp_path):
    home = str(tmp_path / "home")
    spec_path = write_spec(tmp_path / "data_only.yaml", corpus, "[data]")
    run_id, dirs = stage_dirs(spec_path, home)
    rdir = os.path.join(home, "runs", run_id)
    os.makedirs(rdir)
    with open(os.path.join(rdir, "run.json"), "w") as f:
        f.write('{"run_id": "' + run_id + '", "stat')  # torn by a full disk or an editor crash
    with open(os.path.join(rdir, "run.json.tmp.12345"), "w") as f:
        f.write("{")  # the temp file of a write a killed apply never finished
    proc = nanorun(["apply", spec_path, "--yes"], home, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "unreadable run record set aside" in proc.stdout
    assert read_run(home, run_id)["status"] == "success"
    left = sorted(os.listdir(rdir))
    assert [n for n in left if n.startswith("run.json.corrupt-")] and "run.json.tmp.12345" not in left
