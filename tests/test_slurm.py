"""
The Slurm launcher against a real Slurm: tests/slurm/cluster.sh starts munged, slurmctld and two slurmd on this machine
(installing Debian's packages when missing; 2 fake GPUs per node) for the session, and every run trains for real on
CPU with gloo. Covers a 1-node x 2-process apply into the registry, --detach then a later apply, a job warned by USR1
(as before its time limit) that requeues itself and resumes from its checkpoint exactly, a 2-node job whose ranks
rendezvous, cancel, studies as job arrays (max_parallel, the shared stages' job, a cancelled task written back by
`runs` and resubmitted alone, cancel STUDY, GPU cells on the fake GPUs), and bad input (no sbatch, an unknown
partition, an unknown launcher): one line, exit 2, nothing submitted.

    .venv/bin/python -m pytest -q tests/test_slurm.py
"""

import json
import os
import subprocess
import sys
import time

import pytest

from nanochat.rundir import checkpoint_steps, read_jobs
from test_apply import NANORUN, SPEC, loss_curve, stage_dirs, write_corpus

CLUSTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm", "cluster.sh")
TRAIN_STAGES = "[data, tok_train, base_train]"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A 2-node Slurm of this machine, 2 fake GPUs per node, private to the test session: the environment to use its
    tools."""
    state = str(tmp_path_factory.mktemp("slurm"))
    env = dict(os.environ, NANORUN_SLURM_DIR=state, NANORUN_SLURM_NODES="2", NANORUN_SLURM_PORT="17817",
               NANORUN_SLURM_GPUS="2")
    up = subprocess.run([CLUSTER, "up"], env=env, capture_output=True, text=True, timeout=1200)
    if up.returncode != 0:
        pytest.fail(f"cluster.sh up failed: {up.stderr.strip()}")
    conf = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield {"SLURM_CONF": conf, "NANORUN_SLURM_DIR": state}
    subprocess.run([CLUSTER, "down"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory, slurm):
    """One NANORUN_HOME and corpus for the module, so every run shares the data and tokenizer stages."""
    root = tmp_path_factory.mktemp("slurm_runs")
    text_dir = str(root / "text")
    write_corpus(text_dir)
    home = str(root / "home")
    os.makedirs(home)
    return {"root": root, "text_dir": text_dir, "home": home}


def slurm_spec(work, name, *, nodes=1, procs=2, hardware_extra="", train_extra="", stages=TRAIN_STAGES):
    """The tiny spec of test_apply on `launcher: slurm`; `train_extra` replaces lines of its train block."""
    text = SPEC.format(text_dir=work["text_dir"], stages=stages).replace("name: tiny_apply", f"name: {name}")
    text = text.replace("hardware: {gpu: cpu, device_type: cpu}",
                        f"hardware: {{gpu: cpu, device_type: cpu, nodes: {nodes}, gpus_per_node: {procs}, "
                        f"launcher: slurm{hardware_extra}}}")
    text = text.replace("total_batch_size: 512", f"total_batch_size: {512 * nodes * procs}")
    for line in train_extra.splitlines():
        key = line.split(":")[0]
        text = "\n".join(f"  {line}" if l.strip().startswith(key + ":") else l for l in text.splitlines()) + "\n"
    path = str(work["root"] / f"{name}.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def run(args, work, slurm, timeout=600, **env):
    """`nanorun ARGS` with the module's home and the test cluster's environment."""
    env = dict(os.environ, NANORUN_HOME=work["home"], **slurm, **env)
    return subprocess.run(NANORUN + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def squeue(slurm, *args):
    out = subprocess.run(["squeue", "-h", *args], env=dict(os.environ, **slurm), capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip()


def jobs_of(work, run_id):
    return read_jobs(os.path.join(work["home"], "runs", run_id))


# -----------------------------------------------------------------------------
# Runs


def test_apply_one_node_two_processes(work, slurm):
    spec = slurm_spec(work, "slurm_e2e")
    out = run(["apply", spec, "--yes"], work, slurm)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_id, dirs = stage_dirs(spec, work["home"])
    assert "[slurm] submitted job" in out.stdout and "[base_train]" in out.stdout   # stage output followed
    jobs = jobs_of(work, run_id)
    assert [j["state"] for j in jobs] == ["COMPLETED"] and jobs[0]["stages"] == ["data", "tok_train", "base_train"]
    script = open(jobs[0]["script"]).read()
    assert "--nproc-per-node=2" in script and "#SBATCH --cpus-per-task=2" in script
    with open(os.path.join(dirs["base_train"], "result.json")) as f:
        assert json.load(f)["metrics"]["num_iterations"] == 12
    record = json.load(open(os.path.join(work["home"], "runs", run_id, "run.json")))
    assert record["status"] == "success" and record["launcher"] == "slurm"
    assert [s["status"] for s in record["stages"]] == ["success"] * 3
    assert all(s["wall_seconds"] > 0 for s in record["stages"])
    runs = json.loads(run(["runs", "--json"], work, slurm).stdout)
    row = next(r for r in runs if r["run_id"] == run_id)
    assert row["status"] == "success" and "COMPLETED" in row["jobs"]
    again = run(["apply", spec, "--yes"], work, slurm)   # nothing left: no second job
    assert again.returncode == 0 and "submitted" not in again.stdout
    assert len(jobs_of(work, run_id)) == 1


def test_detach_then_apply_follows_the_same_job(work, slurm):
    spec = slurm_spec(work, "slurm_detach", train_extra="warmup_steps: 3")   # a new base_train key; data, tok shared
    out = run(["apply", spec, "--yes", "--detach"], work, slurm, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_id, dirs = stage_dirs(spec, work["home"])
    jobs = jobs_of(work, run_id)
    assert len(jobs) == 1 and jobs[0]["stages"] == ["base_train"] and "detached" in out.stdout
    assert jobs[0]["job_id"] in squeue(slurm, "-o", "%i")   # still queued or running
    later = run(["apply", spec, "--yes"], work, slurm)
    assert later.returncode == 0, later.stdout[-3000:] + later.stderr[-3000:]
    assert f"following job {jobs[0]['job_id']}" in later.stdout and "[slurm] submitted" not in later.stdout
    assert [j["state"] for j in jobs_of(work, run_id)] == ["COMPLETED"]
    assert os.path.exists(os.path.join(dirs["base_train"], "result.json"))


def test_requeued_job_resumes_from_its_checkpoint(work, slurm):
    """USR1 to the batch script (what --signal=B:USR1@90 sends before the time limit) makes the job requeue itself;
    the requeued job skips the finished stages and base_train resumes from its last complete checkpoint: the steps
    it trains twice give the same loss."""
    spec = slurm_spec(work, "slurm_requeue", train_extra="num_iterations: 16\nsave_every: 4\neval_every: 8")
    run_id, dirs = stage_dirs(spec, work["home"])
    log_path = str(work["root"] / "requeue.log")
    env = dict(os.environ, NANORUN_HOME=work["home"], **slurm)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(NANORUN + ["apply", spec, "--yes"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900   # data and tokenizer first when this test runs alone
        while not checkpoint_steps(os.path.join(dirs["base_train"], "checkpoints")):
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 900 s:\n" + open(log_path).read()[-3000:]
            time.sleep(0.2)
        job_id = jobs_of(work, run_id)[0]["job_id"]
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True, timeout=30)
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = open(log_path).read()
    assert proc.returncode == 0, output[-3000:]
    jobs = jobs_of(work, run_id)
    assert len(jobs) == 1 and jobs[0]["restarts"] == 1 and jobs[0]["state"] == "COMPLETED"
    assert "requeued 1x" in output
    curve, repeats = loss_curve(dirs["base_train"])
    assert sorted(curve) == list(range(16))
    assert all(a == b for _, a, b in repeats), repeats   # the steps trained twice give the same loss
    with open(os.path.join(dirs["base_train"], "stdout.log")) as f:
        assert "resum" in f.read().lower()
    show = run(["show", run_id], work, slurm)
    assert f"slurm job {job_id} COMPLETED, requeued 1x" in show.stdout


def test_two_node_job_rendezvous(work, slurm):
    # its own num_iterations: 1 node x 2 processes has the same world size, so the same stage keys (shared, done)
    spec = slurm_spec(work, "slurm_2node", nodes=2, procs=1, train_extra="num_iterations: 10")
    out = run(["apply", spec, "--yes"], work, slurm)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_id, dirs = stage_dirs(spec, work["home"])
    script = open(jobs_of(work, run_id)[0]["script"]).read()
    assert "#SBATCH --nodes=2" in script and '--rdzv-endpoint="$rdzv"' in script and "--rdzv-backend=c10d" in script
    with open(os.path.join(dirs["base_train"], "result.json")) as f:
        result = json.load(f)
    assert result["metrics"]["num_iterations"] == 10
    assert result["metrics"]["world_size"] == 2


def test_cancel_stops_the_job(work, slurm):
    spec = slurm_spec(work, "slurm_cancel", train_extra="num_iterations: 400")
    out = run(["apply", spec, "--yes", "--detach"], work, slurm, timeout=120)
    assert out.returncode == 0, out.stderr
    run_id, _ = stage_dirs(spec, work["home"])
    job_id = jobs_of(work, run_id)[0]["job_id"]
    cancelled = run(["cancel", run_id], work, slurm, timeout=60)
    assert cancelled.returncode == 0 and f"cancelled slurm job {job_id}" in cancelled.stdout
    deadline = time.time() + 60
    while job_id in squeue(slurm, "-o", "%i"):
        assert time.time() < deadline
        time.sleep(0.5)
    again = run(["cancel", run_id], work, slurm, timeout=60)
    assert again.returncode == 0 and "nothing is queued or running" in again.stdout


# -----------------------------------------------------------------------------
# Studies: the cells as a job array


def study_spec(work, name, grid, max_parallel, vocab=512):
    """A study of the tiny spec on one process per cell (1 CPU of a node's 2: without a cap all cells fit at once)."""
    path = slurm_spec(work, name, procs=1)
    text = open(path).read().replace("vocab_size: 512", f"vocab_size: {vocab}")
    text += f"sweep:\n  grid:\n    train.num_iterations: {grid}\n  max_parallel: {max_parallel}\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def study_record(work, name):
    with open(os.path.join(work["home"], "studies", name, "study.json")) as f:
        return json.load(f)


def task_intervals(record):
    """(start, end) of each array task, from the markers the job script writes to its output."""
    out = []
    for cell in record["cells"]:
        text = open(cell["output"]).read()
        start = float(text.split(" start ", 1)[1].split()[0])
        end = float(text.rsplit("@nanorun job ", 1)[1].split(" end ")[1].split()[0])
        out.append((start, end))
    return out


def test_study_as_job_array_detach_then_apply(work, slurm):
    """3 cells -> one array job (max_parallel 2) after a job that runs the stages they share (a new tokenizer) once;
    --detach returns at once, a later apply follows the tasks to the end and records every cell."""
    spec = study_spec(work, "slurm_study", "[4, 5, 6]", 2, vocab=520)
    out = run(["apply", spec, "--yes", "--detach"], work, slurm, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "detached" in out.stdout
    record = study_record(work, "slurm_study")
    shared, array = record["jobs"]
    assert shared["kind"] == "shared" and any(s.startswith("tok_train-") for s in shared["stages"])
    assert array["kind"] == "array" and array["after"] == shared["job_id"]
    script = open(array["script"]).read()
    assert "#SBATCH --array=0-2%2" in script and f"#SBATCH --dependency=afterok:{shared['job_id']}" in script
    # array task i runs cell i: the mapping in the study record, the cells' job ids and the script's branches
    assert [(t["index"], t["cell"]) for t in array["tasks"]] == [(0, 1), (1, 2), (2, 3)]
    branches = script.split('case "${SLURM_ARRAY_TASK_ID:-}" in')[1].split(";;")
    for i, cell in enumerate(record["cells"]):
        assert cell["job_id"] == f"{array['job_id']}_{i}" and array["tasks"][i]["run_id"] == cell["run_id"]
        assert jobs_of(work, cell["run_id"])[0]["job_id"] == cell["job_id"]
        train_dir = stage_dirs(cell["spec"], work["home"])[1]["base_train"]
        assert branches[i].lstrip().startswith(f"{i})") and train_dir in branches[i]
        assert all(train_dir not in b for j, b in enumerate(branches) if j != i)
    status = json.loads(run(["study", "status", "slurm_study", "--json"], work, slurm, timeout=120).stdout)
    assert [c["job"]["job_id"] for c in status["cells"]] == [c["job_id"] for c in record["cells"]]
    assert all(c["state"] == "running" for c in status["cells"])   # queued or running on Slurm, not interrupted

    later = run(["apply", spec, "--yes"], work, slurm)
    assert later.returncode == 0, later.stdout[-3000:] + later.stderr[-3000:]
    assert "following task" in later.stdout and "[slurm] submitted" not in later.stdout
    record = study_record(work, "slurm_study")
    assert record["status"] == "success" and [c["status"] for c in record["cells"]] == ["success"] * 3
    for cell, iterations in zip(record["cells"], (4, 5, 6)):
        assert [j["state"] for j in jobs_of(work, cell["run_id"])] == ["COMPLETED"]
        train_dir = stage_dirs(cell["spec"], work["home"])[1]["base_train"]
        with open(os.path.join(train_dir, "result.json")) as f:
            assert json.load(f)["metrics"]["num_iterations"] == iterations
    # at most 2 tasks at once (4 CPUs free: without the cap all 3 would have run together)
    spans = task_intervals(record)
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2
    rows = json.loads(run(["query", "select run_id, status from runs where name like 'slurm_study.%'", "--json"],
                          work, slurm, timeout=120).stdout)
    assert sorted((r["run_id"], r["status"]) for r in rows) == sorted((c["run_id"], "success") for c in record["cells"])
    again = run(["apply", spec, "--yes"], work, slurm, timeout=120)   # nothing left: nothing submitted
    assert again.returncode == 0 and "submitted" not in again.stdout and "all cells are done" in again.stdout


def test_study_cancelled_task_then_apply_runs_what_is_missing(work, slurm):
    """Cancelling one cell's run cancels its array task; `runs` shows it as cancelled and writes that back to the run
    directory (no apply needed); apply then follows the other cell's task and submits only the cancelled cell."""
    spec = study_spec(work, "slurm_study_cancel", "[4, 5]", 1)
    out = run(["apply", spec, "--yes", "--detach"], work, slurm, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    first, second = study_record(work, "slurm_study_cancel")["cells"]
    cancelled = run(["cancel", second["run_id"]], work, slurm, timeout=60)   # still pending: max_parallel 1
    assert cancelled.returncode == 0 and f"cancelled slurm job {second['job_id']}" in cancelled.stdout
    deadline = time.time() + 60
    while second["job_id"] in squeue(slurm, "-r", "-o", "%i"):
        assert time.time() < deadline
        time.sleep(0.5)
    runs = json.loads(run(["runs", "--json"], work, slurm, timeout=120).stdout)
    row = next(r for r in runs if r["run_id"] == second["run_id"])
    assert row["status"] == "interrupted" and f"job {second['job_id']} CANCELLED" in row["jobs"]
    assert jobs_of(work, second["run_id"])[-1]["state"] == "CANCELLED"   # written back: later readers need no Slurm
    with open(os.path.join(work["home"], "runs", second["run_id"], "run.json")) as f:
        assert json.load(f)["status"] == "interrupted"
    status = run(["study", "status", "slurm_study_cancel"], work, slurm, timeout=120).stdout
    assert "interrupted" in status and f"[slurm {second['job_id']} CANCELLED]" in status, status

    again = run(["apply", spec, "--yes"], work, slurm)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"following task {first['job_id']}" in again.stdout
    record = study_record(work, "slurm_study_cancel")
    assert [c["status"] for c in record["cells"]] == ["success", "success"]
    resubmitted = record["jobs"][-1]
    assert [t["cell"] for t in resubmitted["tasks"]] == [2] and resubmitted["job_id"] != first["job_id"].split("_")[0]
    assert "#SBATCH --array=0-0%1" in open(resubmitted["script"]).read()
    assert [j["state"] for j in jobs_of(work, first["run_id"])] == ["COMPLETED"]
    assert [j["state"] for j in jobs_of(work, second["run_id"])] == ["CANCELLED", "COMPLETED"]


def test_cancel_study_cancels_its_array(work, slurm):
    spec = study_spec(work, "slurm_study_stop", "[400, 401]", 2)
    out = run(["apply", spec, "--yes", "--detach"], work, slurm, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    array = study_record(work, "slurm_study_stop")["jobs"][-1]
    stopped = run(["cancel", "slurm_study_stop"], work, slurm, timeout=60)
    assert stopped.returncode == 0 and f"cancelled slurm job {array['job_id']} (array of cells 1, 2)" in stopped.stdout
    deadline = time.time() + 60
    while array["job_id"] in squeue(slurm, "-o", "%A"):
        assert time.time() < deadline
        time.sleep(0.5)
    status = json.loads(run(["study", "status", "slurm_study_stop", "--json"], work, slurm, timeout=120).stdout)
    assert [(c["state"], c["job"]["state"]) for c in status["cells"]] == [("interrupted", "CANCELLED")] * 2
    again = run(["cancel", "slurm_study_stop"], work, slurm, timeout=60)
    assert again.returncode == 0 and "nothing is queued or running" in again.stdout


def test_gpu_cells_get_their_gpus(work, slurm):
    """The test cluster's nodes have 2 fake GPUs each (GRES gpu:2 on device files): cells that ask for 2 GPUs get
    them (CUDA_VISIBLE_DEVICES in each task, for its srun steps too) and Slurm runs at most 2 at once on the 4 GPUs,
    though the CPUs would take all 3. The cells run CPU stages only (data, tok_train): there is no real GPU here."""
    path = str(work["root"] / "slurm_gpu.yaml")
    with open(path, "w") as f:
        f.write(f"name: slurm_gpu\nhardware: {{gpu: H100-SXM, gpus_per_node: 2, launcher: slurm}}\n"
                f"data:\n  train:\n    - {{source: text, path: {work['text_dir']}}}\n"
                f"tokenizer: {{vocab_size: 600, max_chars: 1000000}}\nmodel: {{depth: 2}}\nstages: [data, tok_train]\n"
                f"sweep:\n  grid:\n    tokenizer.vocab_size: [600, 610, 620]\n")
    out = run(["apply", path, "--yes"], work, slurm)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = study_record(work, "slurm_gpu")
    assert "#SBATCH --gpus-per-node=2" in open(record["jobs"][-1]["script"]).read()
    for cell in record["cells"]:
        assert " gpus 0,1\n" in open(cell["output"]).read()
    spans = task_intervals(record)
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2


# -----------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing submitted


def test_no_sbatch_on_path(work, slurm):
    spec = slurm_spec(work, "slurm_nosbatch")
    out = run(["apply", spec, "--yes"], work, slurm, timeout=120, PATH=os.path.dirname(sys.executable))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "sbatch: not found on PATH" in out.stderr
    run_id, _ = stage_dirs(spec, work["home"])
    assert not os.path.exists(os.path.join(work["home"], "runs", run_id))


def test_unknown_partition(work, slurm):
    spec = slurm_spec(work, "slurm_nopart", hardware_extra=", slurm: {partition: nope}")
    out = run(["apply", spec, "--yes"], work, slurm, timeout=120)
    assert out.returncode == 2
    col = open(spec).read().splitlines()[1].index("nope") + 1   # points at the value in the spec
    assert out.stderr.strip() == (f"error: {spec}:2:{col}: hardware.slurm.partition: no partition 'nope' on this "
                                  f"cluster (partitions: debug)")
    assert "slurm_nopart" not in squeue(slurm, "-o", "%j")


def test_unknown_launcher_and_skypilot(work, slurm):
    bad = slurm_spec(work, "slurm_badlauncher").replace(".yaml", "_x.yaml")
    with open(bad, "w") as f:
        f.write(open(slurm_spec(work, "slurm_badlauncher")).read().replace("launcher: slurm", "launcher: slurmm"))
    out = run(["validate", bad], work, slurm, timeout=60)
    assert out.returncode == 2
    col = open(bad).read().splitlines()[1].index("slurmm") + 1
    assert out.stderr.strip() == (f"{bad}:2:{col}: hardware.launcher: must be one of 'local', 'slurm', 'skypilot' "
                                  f"(got 'slurmm') (did you mean 'slurm'?)")
    sky = bad.replace("_x.yaml", "_sky.yaml")
    with open(sky, "w") as f:
        f.write(open(bad).read().replace("launcher: slurmm", "launcher: skypilot"))
    plan = run(["plan", sky], work, slurm, timeout=120)
    assert plan.returncode == 0 and "launcher skypilot: cluster nanorun-slurm-badlauncher-" in plan.stdout
    # SkyPilot missing (a `sky` that fails to import shadows any installed one): one line, exit 2, nothing launched;
    # the launcher itself is tested against SkyPilot's parser and a fake of its API in test_skypilot.py
    shadow = work["root"] / "no_sky" / "sky"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text("raise ImportError('no SkyPilot here')\n")
    out = run(["apply", sky, "--yes"], work, slurm, timeout=120, PYTHONPATH=str(shadow.parent))
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("error: skypilot: not installed") and "pip install 'nanorun[skypilot]'" in out.stderr
    assert "slurm_badlauncher" not in squeue(slurm, "-o", "%j")


def test_plan_json_carries_the_job_script(work, slurm):
    spec = slurm_spec(work, "slurm_plan", nodes=2, procs=1, train_extra="num_iterations: 14",   # not done yet
                      hardware_extra=', slurm: {partition: debug, account: lab, qos: high, time: "4:00:00", '
                                     'extra_args: ["--exclusive"]}')
    out = run(["plan", spec, "--json"], work, slurm, timeout=120)
    assert out.returncode == 0, out.stderr
    launcher = json.loads(out.stdout)["launcher"]
    assert launcher["kind"] == "slurm" and len(launcher["jobs"]) == 1
    script = launcher["jobs"][0]["script"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                 "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --time=4:00:00", "#SBATCH --requeue",
                 "#SBATCH --exclusive", "trap requeue USR1"):
        assert line in script
    train = next(l for l in script.splitlines() if l.startswith("stage base_train"))
    assert "srun --nodes=2 --ntasks=2" in train and "--nnodes=2" in train and "--nproc-per-node=1" in train
