"""
The SkyPilot launcher without a cloud (none can be reached here): the rendered task is parsed by SkyPilot's own parser
(sky.Task.from_yaml, the pinned SkyPilot in a venv of its own, built once per machine); the task's `run` is executed by real bash with
SkyPilot's node variables and a recording `nanorun` on PATH (and once with the real nanorun, which applies a tiny CPU
spec as a node would); the launch path runs against a recorded fake of SkyPilot's API boundary only (sky.launch,
sky.jobs.launch, sky.get, sky.stream_and_get, tail_logs, job status, cancel, down), returning what SkyPilot 0.14
returns, and every fake call binds to the real function's signature. Bad input: SkyPilot not installed, an accelerator not NAME:COUNT, a bucket that is not a URI.

    .venv/bin/python -m pytest -q tests/test_skypilot.py
"""

import enum
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from click.testing import CliRunner

import specs
from nanochat.rundir import read_jobs
from runners.cli import main
from runners.plan import make_plan
from runners.skypilot import task_config, task_yaml

try:   # SkyPilot in this interpreter (a user's venv with the extra): the fake API is patched onto the real module
    import sky
    import sky.jobs
    from sky.schemas.api.responses import ManagedJobRecord
    from sky.skylet.job_lib import JobStatus
except ImportError:
    sky = None
# SkyPilot is an optional extra and not in `dev`: it pins click<8.2, whose CliRunner mixes stderr into stdout (other
# tests read result.stderr), and brings ~60 packages. The tests that need the real thing run it in a venv of its own
# (`sky_python`), built once per machine from PyPI: the parser reads what nanorun renders, and the real functions'
# signatures are what the fake API below must bind to.
SKYPILOT = "skypilot==0.14.1"

SPEC = """\
name: {name}
hardware:
  nodes: {nodes}
  gpus_per_node: 8
  gpu: H100-SXM
  launcher: skypilot
  skypilot: {skypilot}
data: {{train: [{{source: climbmix, shards: 2}}]}}
model: {{depth: 4}}
stages: [data, tok_train, base_train]
"""
SKY = ('{cloud: aws, region: us-east-1, use_spot: true, bucket: "s3://my-bucket/nanorun", disk_size: 512, '
       'setup: ["pip install flash-attn"], envs: {WANDB_MODE: offline}}')


def write_spec(tmp_path, name="sky_run", nodes=2, skypilot=SKY):
    path = str(tmp_path / f"{name}.yaml")
    with open(path, "w") as f:
        f.write(SPEC.format(name=name, nodes=nodes, skypilot=skypilot))
    return path


def plan_of(path):
    return make_plan(specs.load(path))


def cli(*args):
    """`nanorun ARGS` in this process (so the fake API is what it calls): (exit code, stdout and stderr)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


# -----------------------------------------------------------------------------
# The task, as SkyPilot's own parser reads it


PARSE = r"""
import json, sys
import sky
task = sky.Task.from_yaml(sys.argv[1])
(res,) = task.resources
print(json.dumps({
    "name": task.name, "num_nodes": task.num_nodes, "accelerators": res.accelerators,
    "cloud": None if res.cloud is None else str(res.cloud), "region": res.region, "use_spot": res.use_spot,
    "disk_size": res.disk_size, "cpus": res.cpus, "envs": dict(task.envs), "workdir": task.workdir,
    "file_mounts": task.file_mounts, "setup": task.setup, "run": task.run,
    "mounts": {path: {"source": st.source, "mode": st.mode.name} for path, st in (task.storage_mounts or {}).items()},
}))
"""

SIGNATURES = r"""
import inspect, json
import sky, sky.jobs
used = {sky: ("launch", "get", "stream_and_get", "tail_logs", "job_status", "down", "cancel"),
        sky.jobs: ("launch", "queue_v2", "tail_logs", "cancel")}
print(json.dumps({("" if module is sky else "jobs.") + name:
                      [[p.name, p.kind.name, p.default is not inspect.Parameter.empty]
                       for p in inspect.signature(getattr(module, name)).parameters.values()]
                  for module, names in used.items() for name in names}))
"""


@pytest.fixture(scope="session")
def sky_python():
    """The python of a venv holding the real SkyPilot (nothing else), built once per machine under
    ~/.cache/nanorun/test-venvs ($NANORUN_TEST_VENVS to point elsewhere; ~45 s, 460 MB); skipped, with the reason
    shown, only when PyPI cannot be reached."""
    root = os.environ.get("NANORUN_TEST_VENVS") or os.path.join(os.path.expanduser("~"), ".cache", "nanorun",
                                                                 "test-venvs")
    venv = os.path.join(root, SKYPILOT.replace("==", "-"))
    python, done = os.path.join(venv, "bin", "python"), os.path.join(venv, ".installed")
    if not os.path.exists(done):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", SKYPILOT],
                             capture_output=True, text=True)
        if pip.returncode:
            pytest.skip(f"{SKYPILOT} could not be installed: {(pip.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        open(done, "w").close()
    return python


def sky_parse(sky_python, path):
    """What SkyPilot's own parser (sky.Task.from_yaml, in its own venv) reads from the task YAML at `path`."""
    out = subprocess.run([sky_python, "-c", PARSE, path], capture_output=True, text=True,
                         env={**os.environ, "HOME": os.path.dirname(path)})   # sky writes ~/.sky on import
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def sky_signatures(sky_python, tmp_path_factory):
    """{"launch" | "jobs.launch" | ...: inspect.Signature} of the real SkyPilot functions nanorun calls."""
    out = subprocess.run([sky_python, "-c", SIGNATURES], capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path_factory.mktemp("skyhome"))})
    assert out.returncode == 0, out.stderr[-3000:]
    empty = inspect.Parameter.empty
    return {name: inspect.Signature([inspect.Parameter(p, getattr(inspect.Parameter, kind),
                                                       default=None if has_default else empty)
                                     for p, kind, has_default in params])
            for name, params in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_task_parses_with_skypilot(tmp_path, sky_python):
    spec = write_spec(tmp_path)
    plan = plan_of(spec)
    config = task_config(plan, spec)
    rendered = str(tmp_path / "rendered.yaml")
    with open(rendered, "w") as f:
        f.write(task_yaml(config))
    task = sky_parse(sky_python, rendered)
    assert task["name"] == f"nanorun-sky-run-{plan.run_id.rsplit('-', 1)[1]}" and task["num_nodes"] == 2
    assert task["accelerators"] == {"H100": 8} and task["cloud"] == "AWS" and task["region"] == "us-east-1"
    assert task["use_spot"] is True and task["disk_size"] == 512
    assert task["envs"] == {"WANDB_MODE": "offline", "NANORUN_HOME": "/nanorun"}
    assert task["mounts"] == {"/nanorun": {"source": "s3://my-bucket/nanorun", "mode": "MOUNT_CACHED"}}
    assert task["workdir"] == "." and task["file_mounts"] in (None, {})
    assert task["setup"].splitlines()[1].startswith("pip install -e .") and "pip install flash-attn" in task["setup"]
    assert task["run"] == config["run"] and "nanorun apply" in task["run"]

    # `nanorun export skypilot -o FILE` writes the same task, and sky.Task.from_yaml reads that file
    out = str(tmp_path / "task.yaml")
    code, output = cli("export", "skypilot", spec, "-o", out)
    assert code == 0, output
    assert f"sky jobs launch {out}" in output
    assert sky_parse(sky_python, out) == task


def test_cpu_task_without_bucket_parses(tmp_path, sky_python):
    spec = str(tmp_path / "cpu.yaml")
    with open(spec, "w") as f:
        f.write(SPEC.format(name="sky_cpu", nodes=1, skypilot="{}").replace("gpu: H100-SXM", "gpu: cpu")
                .replace("gpus_per_node: 8", "gpus_per_node: 4"))
    out = str(tmp_path / "task.yaml")
    with open(out, "w") as f:
        f.write(task_yaml(task_config(plan_of(spec), spec)))
    task = sky_parse(sky_python, out)
    assert task["accelerators"] is None and task["cpus"] == "4+" and task["use_spot"] is False
    assert task["num_nodes"] == 1 and task["mounts"] == {} and task["envs"] == {"NANORUN_HOME": "/nanorun"}
    assert "sudo mkdir -p /nanorun" in task["setup"]   # no bucket: the home on the node's disk


def test_default_accelerators_and_spec_hash(tmp_path):
    """accelerators default to the spec's GPU and GPU count; the launcher and its skypilot block are not part of the
    run id."""
    plan = plan_of(write_spec(tmp_path, skypilot="{bucket: 'gs://b/x', managed: true}"))
    assert task_config(plan)["resources"] == {"accelerators": "H100:8"}
    text = SPEC.format(name="sky_run", nodes=2, skypilot="{}").replace("launcher: skypilot", "launcher: local")
    assert make_plan(specs.load_text(text)).run_id == plan.run_id


# -----------------------------------------------------------------------------
# The task's run script, executed by bash as on a node


def fake_nanorun(tmp_path):
    """A directory with a `nanorun` that records its argv and NANORUN_HOME, one JSON line per call."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nanorun"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"call = {{'argv': sys.argv[1:], 'home': os.environ.get('NANORUN_HOME')}}\n"
                      f"with open({str(log)!r}, 'a') as f:\n"
                      f"    f.write(json.dumps(call) + '\\n')\n")
    script.chmod(0o755)
    return str(bin_dir), log


def node_env(tmp_path, bin_dir, rank, nodes=2, gpus=8):
    home = tmp_path / f"node{rank}"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "NANORUN_HOME": str(tmp_path / "bucket"),
            "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_NODES": str(nodes),
            "SKYPILOT_NODE_IPS": "\n".join(f"10.0.0.{i + 1}" for i in range(nodes)) + "\n",
            "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus)}


def test_run_script_on_two_nodes(tmp_path):
    spec = write_spec(tmp_path)
    plan = plan_of(spec)
    run = task_config(plan, spec)["run"]
    bin_dir, log = fake_nanorun(tmp_path)

    # node 1 waits for node 0's single-process stages (data, tok_train) in the shared home
    waiting = subprocess.Popen(["bash", "-c", run], env=node_env(tmp_path, bin_dir, 1), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(1.5)
    assert waiting.poll() is None and not log.exists()
    os.killpg(waiting.pid, signal.SIGKILL)   # bash and its sleep
    waiting.wait()

    node0 = subprocess.run(["bash", "-c", run], env=node_env(tmp_path, bin_dir, 0), capture_output=True, text=True)
    assert node0.returncode == 0, node0.stderr
    for stage in plan.stages[:2]:   # node 0 ran them: their result.json is in the bucket
        done = tmp_path / "bucket" / "stages" / stage.dir_name / "result.json"
        done.parent.mkdir(parents=True)
        done.write_text("{}")
    node1 = subprocess.run(["bash", "-c", run], env=node_env(tmp_path, bin_dir, 1), capture_output=True, text=True,
                           timeout=30)
    assert node1.returncode == 0, node1.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        spec_file = str(tmp_path / f"node{rank}" / ".nanorun" / "specs" / "sky_run.yaml")
        assert call["argv"] == ["apply", spec_file, "--yes", "--launcher", "local", "--no-registry",
                                "--node-rank", str(rank), "--rdzv-endpoint", "10.0.0.1:29500"]
        assert call["home"] == str(tmp_path / "bucket")
        with open(spec_file) as f, open(spec) as g:
            assert f.read() == g.read()   # the spec as planned: the same run id on the nodes
        assert specs.load(spec_file) == plan.spec


def test_run_script_checks_the_node(tmp_path):
    spec = write_spec(tmp_path, nodes=1)
    run = task_config(plan_of(spec), spec)["run"]
    bin_dir, log = fake_nanorun(tmp_path)
    ok = subprocess.run(["bash", "-c", run], env=node_env(tmp_path, bin_dir, 0, nodes=1), capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(log.read_text())["argv"][2:] == ["--yes", "--launcher", "local", "--no-registry"]
    wrong = subprocess.run(["bash", "-c", run], env=node_env(tmp_path, bin_dir, 0, nodes=1, gpus=4),
                           capture_output=True, text=True)
    assert wrong.returncode == 1
    assert "this node has 4 GPUs; the spec runs 8 processes per node" in wrong.stderr
    assert len(log.read_text().splitlines()) == 1   # nanorun was not started


def test_run_script_applies_for_real(tmp_path, monkeypatch):
    """The node's half for real on CPU: the rendered run script starts the real `nanorun apply --launcher local
    --no-registry`, which runs the stages into $NANORUN_HOME (the bucket) and writes the run record, not the
    registry; copied home, `nanorun registry sync` picks the run up."""
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i in range(20):
        (text_dir / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 30)
    spec = str(tmp_path / "node.yaml")
    with open(spec, "w") as f:
        f.write(f"name: sky_node\nhardware: {{gpu: cpu, device_type: cpu, gpus_per_node: 1, launcher: skypilot}}\n"
                f"data: {{train: [{{source: text, path: {text_dir}}}]}}\nmodel: {{depth: 2}}\nstages: [data]\n")
    plan = plan_of(spec)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nanorun").write_text(f'#!/bin/sh\nexec {sys.executable} -m runners "$@"\n')
    (bin_dir / "nanorun").chmod(0o755)
    env = dict(os.environ, **node_env(tmp_path, str(bin_dir), 0, nodes=1, gpus=0))
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    out = subprocess.run(["bash", "-c", task_config(plan, spec)["run"]], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    home = tmp_path / "bucket"
    with open(home / "runs" / plan.run_id / "run.json") as f:
        record = json.load(f)
    assert record["status"] == "success" and record["launcher"] == "skypilot"
    assert (home / "stages" / plan.stages[0].dir_name / "result.json").exists()
    assert not (home / "registry.duckdb").exists()   # the nodes leave the registry to `registry sync`

    local = tmp_path / "local"   # `aws s3 sync s3://BUCKET/PATH $NANORUN_HOME`, then `nanorun registry sync`
    shutil.copytree(home, local)
    monkeypatch.setenv("NANORUN_HOME", str(local))
    code, out = cli("registry", "sync")
    assert code == 0, out
    code, out = cli("runs", "--json")
    assert [(r["run_id"], r["status"]) for r in json.loads(out)] == [(plan.run_id, "success")]


# -----------------------------------------------------------------------------
# Launching: a recorded fake of SkyPilot's API boundary


class _Status(enum.Enum):
    """Stands in for sky's ManagedJobStatus / JobStatus when SkyPilot is not installed (same names and values)."""
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class FakeSky:
    """SkyPilot's API as nanorun calls it, recording every call and returning what SkyPilot 0.14 returns: launch
    functions give request ids (str), sky.get / sky.stream_and_get the request's result (sky.launch: (job id, handle),
    sky.jobs.launch: ([job ids], handle), jobs queue_v2: (records, total, counts, total), job_status: {id: status}),
    tail_logs streams to output_stream and returns the job's exit code (0, 100 failed, 103 cancelled). With SkyPilot
    installed the functions are patched on the real module (sky.Task, the enums and records stay real)."""

    def __init__(self, monkeypatch, signatures):
        self.signatures = signatures
        self.calls, self.results, self.requests = [], {}, 0
        self.status, self.recoveries, self.exit_code = "SUCCEEDED", 0, 0
        self.after_logs = None           # the status once the followed job's logs end (None: unchanged)
        self.cluster_up = False          # after the job a cluster launched with down=True is gone
        self.interrupt = False           # Ctrl-C while waiting for the launch request
        if sky is not None:
            self.module, target = sky, sky
            self.managed_status, self.job_status_enum = sky.jobs.ManagedJobStatus, JobStatus
            self.gone = sky.exceptions.ClusterDoesNotExist
        else:
            target = self.module = types.ModuleType("sky")
            target.jobs = types.ModuleType("sky.jobs")
            self.gone = type("ClusterDoesNotExist", (ValueError,), {})
            target.exceptions = types.SimpleNamespace(ClusterDoesNotExist=self.gone)
            target.Task = types.SimpleNamespace(from_yaml_config=lambda config: {"parsed": config})
            self.managed_status = self.job_status_enum = _Status
            monkeypatch.setitem(sys.modules, "sky", target)
            monkeypatch.setitem(sys.modules, "sky.jobs", target.jobs)
        for name in ("launch", "get", "stream_and_get", "tail_logs", "job_status", "down", "cancel"):
            self._install(monkeypatch, target, name, getattr(self, name), self.signatures[name])
        for name in ("launch", "queue_v2", "tail_logs", "cancel"):
            self._install(monkeypatch, target.jobs, name, getattr(self, "jobs_" + name), self.signatures["jobs." + name])

    @staticmethod
    def _install(monkeypatch, module, name, fake, signature):
        """Every call must also bind to the real function's signature (SkyPilot's, as `sky_signatures` read it):
        nanorun calls the API as the pinned version defines it."""
        if sky is not None:
            signature = inspect.signature(getattr(module, name))

        def call(*args, **kwargs):
            signature.bind(*args, **kwargs)
            return fake(*args, **kwargs)
        monkeypatch.setattr(module, name, call, raising=sky is not None)

    def _request(self, result):
        self.requests += 1
        rid = f"req-{self.requests}"
        self.results[rid] = result
        return rid

    def names(self):
        return [c[0] for c in self.calls]

    def launch(self, task, cluster_name=None, down=False, **kwargs):
        self.calls.append(("launch", task, cluster_name, down))
        return self._request((3, None))

    def jobs_launch(self, task, name=None, **kwargs):
        self.calls.append(("jobs.launch", task, name))
        return self._request(([7], None))

    def get(self, request_id):
        self.calls.append(("get", request_id))
        result = self.results[request_id]
        if isinstance(result, Exception):
            raise result
        return result

    def stream_and_get(self, request_id=None, output_stream=None, **kwargs):
        self.calls.append(("stream_and_get", request_id))
        output_stream.write("Considered resources (2 nodes): H100:8\nLaunching")
        if self.interrupt:
            raise KeyboardInterrupt
        output_stream.write(" done\n")
        return self.results[request_id]

    def _stream_logs(self, output_stream):
        output_stream.write("(head, rank=0) [base_train] step 00001/00012\n(head, rank=0) [base_train] done\n")
        self.status = self.after_logs or self.status
        return self.exit_code

    def jobs_tail_logs(self, name=None, job_id=None, follow=True, output_stream=None, **kwargs):
        self.calls.append(("jobs.tail_logs", job_id, follow))
        return self._stream_logs(output_stream)

    def tail_logs(self, cluster_name, job_id, follow, output_stream=None, **kwargs):
        self.calls.append(("tail_logs", cluster_name, job_id, follow))
        return self._stream_logs(output_stream)

    def jobs_queue_v2(self, refresh, skip_finished=False, all_users=False, job_ids=None, **kwargs):
        self.calls.append(("jobs.queue_v2", job_ids))
        status = self.managed_status[self.status]
        record = ManagedJobRecord(job_id=7, status=status, recovery_count=self.recoveries) if sky is not None \
            else {"job_id": 7, "status": status, "recovery_count": self.recoveries}
        return self._request(([record], 1, {self.status: 1}, 1))

    def job_status(self, cluster_name, job_ids=None):
        self.calls.append(("job_status", cluster_name, job_ids))
        if not self.cluster_up:
            return self._request(self.gone(f"Cluster {cluster_name!r} does not exist."))
        return self._request({3: self.job_status_enum[self.status]})

    def jobs_cancel(self, name=None, job_ids=None, **kwargs):
        self.calls.append(("jobs.cancel", job_ids))
        return self._request(None)

    def down(self, cluster_name, purge=False, **kwargs):
        self.calls.append(("down", cluster_name))
        return self._request(None)

    def cancel(self, cluster_name, all=False, all_users=False, job_ids=None, **kwargs):
        self.calls.append(("cancel", cluster_name, job_ids))
        return self._request(None)


@pytest.fixture
def fake_sky(monkeypatch, nanorun_home, sky_signatures):
    return FakeSky(monkeypatch, sky_signatures)


def run_files(home, run_id):
    directory = os.path.join(home, "runs", run_id)
    with open(os.path.join(directory, "run.json")) as f:
        return json.load(f), read_jobs(directory)


def test_managed_job_launch_and_follow(tmp_path, fake_sky, nanorun_home):
    spec = write_spec(tmp_path)
    plan = plan_of(spec)
    fake_sky.recoveries = 1   # preempted once: the managed job was relaunched and resumed
    code, out = cli("apply", spec, "--yes")
    assert code == 0, out
    assert fake_sky.names() == ["jobs.launch", "stream_and_get", "jobs.tail_logs", "jobs.queue_v2", "get"]
    _, task, name = fake_sky.calls[0]
    assert name == task_config(plan, spec)["name"]
    if sky is not None:   # the real sky.Task, as SkyPilot would send it
        assert task.num_nodes == 2 and list(task.resources)[0].use_spot and "/nanorun" in task.storage_mounts
    assert fake_sky.calls[2][1:] == (7, True)
    assert "[skypilot] launched job 7" in out and "[base_train] step 00001/00012" in out
    assert "job 7: SUCCEEDED, recovered 1x" in out
    record, jobs = run_files(nanorun_home, plan.run_id)
    assert record["status"] == "success" and record["launcher"] == "skypilot" and record["requeues"] == 1
    assert [s["status"] for s in record["stages"]] == ["success"] * 3
    (job,) = jobs
    assert job["launcher"] == "skypilot" and job["job_id"] == "7" and job["managed"] and job["state"] == "SUCCEEDED"
    assert job["request_id"] == "req-1" and job["stages"] == ["data", "tok_train", "base_train"]
    with open(job["script"]) as f:
        assert f.read() == task_yaml(task_config(plan, spec))   # the task as launched, kept with the run
    with open(job["output"]) as f:
        assert "[base_train] done" in f.read()
    code, out = cli("runs", "--json")
    row = next(r for r in json.loads(out) if r["run_id"] == plan.run_id)
    assert row["status"] == "success" and row["jobs"] == "skypilot job 7 SUCCEEDED, requeued 1x"

    code, out = cli("apply", spec, "--yes")   # done: nothing launched again
    assert code == 0 and "nothing to launch" in out and fake_sky.names().count("jobs.launch") == 1


def test_detach_then_apply_follows_then_cancel(tmp_path, fake_sky, nanorun_home):
    spec = write_spec(tmp_path)
    plan = plan_of(spec)
    fake_sky.status = "RUNNING"
    code, out = cli("apply", spec, "--yes", "--detach")
    assert code == 0, out
    assert fake_sky.names() == ["jobs.launch", "stream_and_get"] and "detached" in out
    record, jobs = run_files(nanorun_home, plan.run_id)
    assert record["status"] == "running" and record["apply_pid"] is None and jobs[0]["state"] == "PENDING"

    code, out = cli("cancel", plan.run_id)
    assert code == 0, out
    assert fake_sky.calls[-4:] == [("jobs.queue_v2", [7]), ("get", "req-2"), ("jobs.cancel", [7]), ("get", "req-3")]
    assert "cancelled skypilot managed job 7 (RUNNING)" in out

    fake_sky.after_logs, fake_sky.exit_code = "CANCELLED", 103   # the cancel lands while apply follows the job
    code, out = cli("apply", spec, "--yes")   # follows the job it launched, records how it ended
    assert code == 0, out
    assert "following job 7 (RUNNING)" in out and fake_sky.names().count("jobs.launch") == 1
    record, jobs = run_files(nanorun_home, plan.run_id)
    assert record["status"] == "interrupted" and jobs[0]["state"] == "CANCELLED"
    code, out = cli("cancel", plan.run_id)
    assert code == 0 and "nothing is queued or running" in out


def test_cluster_launch_cancel_and_down(tmp_path, fake_sky, nanorun_home):
    """managed: false: a job on cluster nanorun-<run>, taken down after the job (the home is the bucket)."""
    spec = write_spec(tmp_path, nodes=1, skypilot='{bucket: "gs://my-bucket/nanorun", managed: false}')
    plan = plan_of(spec)
    cluster = task_config(plan, spec)["name"]
    code, out = cli("apply", spec, "--yes")
    assert code == 0, out
    assert fake_sky.names() == ["launch", "stream_and_get", "tail_logs", "job_status", "get"]
    assert fake_sky.calls[0][2:] == (cluster, True) and fake_sky.calls[2][1:] == (cluster, 3, True)
    record, jobs = run_files(nanorun_home, plan.run_id)
    assert record["status"] == "success" and jobs[0]["state"] == "SUCCEEDED" and jobs[0]["cluster"] == cluster

    spec2 = write_spec(tmp_path, name="sky_cluster2", nodes=1, skypilot='{bucket: "gs://b/x", managed: false}')
    fake_sky.cluster_up, fake_sky.status = True, "RUNNING"
    code, out = cli("apply", spec2, "--yes", "--detach")
    assert code == 0, out
    code, out = cli("cancel", "sky_cluster2")
    assert code == 0, out
    assert fake_sky.calls[-2][0] == "down" and f"cluster {task_config(plan_of(spec2), spec2)['name']} taken down" in out

    spec3 = write_spec(tmp_path, name="sky_cluster3", nodes=1, skypilot="{managed: false}")   # home on the disk
    code, out = cli("apply", spec3, "--yes", "--detach")
    assert code == 0, out
    assert fake_sky.calls[-2][3] is False   # sky.launch(down=False): the cluster keeps the run's home
    code, out = cli("cancel", "sky_cluster3")
    assert code == 0, out
    assert fake_sky.calls[-2] == ("cancel", task_config(plan_of(spec3), spec3)["name"], [3])
    assert "stays up with the run's home on its disk" in out


def test_failed_job(tmp_path, fake_sky, nanorun_home):
    spec = write_spec(tmp_path)
    fake_sky.status, fake_sky.exit_code = "FAILED", 100
    code, out = cli("apply", spec, "--yes")
    assert code == 1
    assert out.strip().splitlines()[-1] == ("error: skypilot job 7 ended FAILED: `sky jobs logs 7` shows why "
                                            f"[log: {run_files(nanorun_home, plan_of(spec).run_id)[1][0]['output']}]")
    record, _ = run_files(nanorun_home, plan_of(spec).run_id)
    assert record["status"] == "failed" and record["error"] == "skypilot job 7 FAILED"


def test_interrupted_launch_is_picked_up(tmp_path, fake_sky, nanorun_home):
    """Ctrl-C while SkyPilot launches: the request id is already recorded, so the next apply waits for that launch
    (sky.get) instead of launching a second job."""
    spec = write_spec(tmp_path)
    plan = plan_of(spec)
    fake_sky.interrupt = True
    code, out = cli("apply", spec, "--yes")
    assert code == 130 and "the launch goes on" in out
    _, jobs = run_files(nanorun_home, plan.run_id)
    assert jobs[0]["state"] == "LAUNCHING" and jobs[0]["request_id"] == "req-1"
    fake_sky.interrupt, fake_sky.status, fake_sky.after_logs = False, "RUNNING", "SUCCEEDED"
    code, out = cli("apply", spec, "--yes")
    assert code == 0, out
    assert fake_sky.names().count("jobs.launch") == 1 and ("get", "req-1") in fake_sky.calls
    assert "waiting for the launch an earlier apply started (request req-1)" in out and "job 7: SUCCEEDED" in out
    assert [j["job_id"] for j in run_files(nanorun_home, plan.run_id)[1]] == ["7"]


def test_plan_shows_the_task(tmp_path, nanorun_home):
    spec = write_spec(tmp_path)
    code, out = cli("plan", spec)
    assert code == 0, out
    assert "launcher skypilot: managed job (sky.jobs.launch)" in out
    assert "resources H100:8 x 2 node(s), infra aws/us-east-1, spot, disk 512 GB" in out
    assert "NANORUN_HOME /nanorun = s3://my-bucket/nanorun" in out
    code, out = cli("plan", spec, "--json")
    launcher = json.loads(out)["launcher"]
    assert launcher["kind"] == "skypilot" and launcher["managed"] and launcher["launch"] == "sky.jobs.launch"
    assert launcher["task"] == task_config(plan_of(spec), spec) and launcher["yaml"] == task_yaml(launcher["task"])
    code, out = cli("export", "skypilot", spec)
    assert code == 0 and out == launcher["yaml"]


# -----------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing launched


def test_skypilot_not_installed(tmp_path, monkeypatch, nanorun_home):
    monkeypatch.setitem(sys.modules, "sky", None)   # `import sky` raises ImportError
    spec = write_spec(tmp_path)
    code, out = cli("apply", spec, "--yes")
    assert code == 2
    assert out.strip().splitlines() == [out.strip()] and out.startswith("error: skypilot: not installed for ")
    assert "pip install 'nanorun[skypilot]'" in out
    assert not os.path.exists(os.path.join(nanorun_home, "runs"))


def test_bad_accelerators_and_bucket(tmp_path, fake_sky, nanorun_home):
    spec = write_spec(tmp_path, skypilot='{accelerators: "H100x8", bucket: "my-bucket/nanorun", use_spot: true}')
    line = open(spec).read().splitlines()[6]
    acc, bucket = line.index('"H100x8') + 1, line.index('"my-bucket') + 1   # the values' columns
    code, out = cli("validate", spec)
    assert code == 2
    assert out.strip().splitlines() == [
        f"{spec}:7:{acc}: hardware.skypilot.accelerators: must be NAME:COUNT as SkyPilot spells it, e.g. H100:8 "
        f"(got 'H100x8')",
        f"{spec}:7:{bucket}: hardware.skypilot.bucket: must be a storage URI such as s3://BUCKET/PATH or "
        f"gs://BUCKET/PATH (got 'my-bucket/nanorun')"]
    code, out = cli("apply", spec, "--yes")
    assert code == 2 and fake_sky.calls == []
    spec = write_spec(tmp_path, name="sky_nobucket", skypilot="{use_spot: true}")
    code, out = cli("apply", spec, "--yes")
    assert code == 2 and fake_sky.calls == []
    assert "hardware.skypilot.use_spot: a managed job resumes on a new node after preemption" in out
