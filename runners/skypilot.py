"""
The SkyPilot launcher (`hardware.launcher: skypilot`): a run goes to rented nodes as one SkyPilot task, launched with
SkyPilot's Python API (`pip install 'nanorun[skypilot]'`), recorded in runs/{run_id}/jobs.json and followed.

    from runners.skypilot import apply_skypilot, task_config, task_yaml
    print(task_yaml(task_config(plan, "specs/d20.yaml")))     # what `nanorun export skypilot` writes
    record = apply_skypilot(plan, spec_path="specs/d20.yaml", echo=print, detach=False)

The task: resources from `hardware` (accelerators NAME:COUNT, infra cloud/region, spot, disk), num_nodes =
hardware.nodes, the nanorun checkout as workdir (setup: `pip install -e .`), and hardware.skypilot.bucket mounted at
/nanorun = $NANORUN_HOME (MOUNT_CACHED: written on the node's disk and uploaded behind, so appends and renames work).
The run script writes the spec as it was planned and starts the same `nanorun apply SPEC --launcher local
--no-registry` on every node: --node-rank from SKYPILOT_NODE_RANK and the c10d rendezvous on the first of
SKYPILOT_NODE_IPS, so each stage runs the torchrun line it runs by hand. A managed job (the default with use_spot) is
relaunched on new nodes after a preemption; its apply skips the stages with a result.json in the bucket and resumes
the interrupted one from its last complete checkpoint there. The nodes never open the DuckDB registry: the run
directory in the bucket is the record (`nanorun registry sync` after copying it home).
"""

import copy
import io
import os
import re
import shlex
import time

import yaml

from nanochat import rundir
from nanochat.rundir import atomic_write_json, stage_state
from specs.errors import LaunchError, MissingToolError, SpecError

REMOTE_HOME = "/nanorun"      # where the bucket is mounted on every node; $NANORUN_HOME there
REMOTE_SPECS = "~/.nanorun/specs"
RDZV_PORT = 29500             # the c10d rendezvous on the first node
WAIT_SECONDS = 10             # how often the other nodes look for node 0's single-process stages
# job states after which nothing more runs (managed jobs' and cluster jobs' final states; UNKNOWN: no longer known)
FINAL = {"SUCCEEDED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER",
         "FAILED_DRIVER", "CANCELLED", "UNKNOWN", "LAUNCH_FAILED"}
EXIT_STATES = {0: "SUCCEEDED", 100: "FAILED", 103: "CANCELLED"}   # sky's JobExitCode of a followed job


# -----------------------------------------------------------------------------
# The task


def default_accelerators(hw):
    """NAME:COUNT for the spec's GPU as SkyPilot names it (H100-SXM x 8 -> H100:8, A100 80GB -> A100-80GB, RTX 4090 ->
    RTX4090); None on CPU. Set hardware.skypilot.accelerators where SkyPilot spells a GPU differently."""
    if hw.gpu.lower() == "cpu":
        return None
    words = [w for w in re.split(r"[^A-Z0-9]+", hw.gpu.upper()) if w]
    words = [w for w in words if w not in ("NVIDIA", "GEFORCE", "SXM", "SXM4", "SXM5", "PCIE", "HBM3")
             and not (re.fullmatch(r"\d+GB", w) and words[:2] != ["A100", "80GB"])]   # only A100 has a -80GB name
    if words[:1] == ["RTX"] and len(words) > 1:
        words = ["RTX" + words[1]] + words[2:]
    return f"{'-'.join(words) or hw.gpu}:{hw.gpus_per_node}"


def accelerators(hw):
    return hw.skypilot.accelerators or default_accelerators(hw)


def task_name(plan):
    """The task's (and cluster's or managed job's) name: nanorun-{run_id}, in the letters every cloud accepts."""
    return "nanorun-" + re.sub(r"[^a-z0-9-]", "-", plan.run_id.lower())


def project_root():
    """The nanorun checkout this code runs from (synced as the task's workdir and pip-installed there)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(root):
    return "." if os.path.realpath(os.getcwd()) == os.path.realpath(root) else root


def remote_spec(plan, spec_path=None):
    """Where the run script writes the spec on the nodes (a name the shell takes as it is)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(spec_path)) if spec_path else f"{plan.spec.name}.yaml"
    return f"{REMOTE_SPECS}/{name}"


def run_script(plan, spec_text, spec_file):
    """The task's `run`: write the spec, check the node's GPUs, wait (nodes > 0) for node 0's single-process stages,
    then `nanorun apply` with this node's rank and the rendezvous on the first node."""
    hw = plan.spec.hardware
    path = spec_file.replace("~/", "$HOME/", 1)
    lines = ["set -euo pipefail",
             "# the spec as it was planned (its hash is the run id); every node writes the same file",
             f'mkdir -p "$(dirname "{path}")"',
             f"cat > \"{path}\" <<'NANORUN_SPEC'", spec_text.rstrip("\n"), "NANORUN_SPEC"]
    if hw.gpu.lower() != "cpu":
        lines += [f'if [ "$SKYPILOT_NUM_GPUS_PER_NODE" != {hw.gpus_per_node} ]; then',
                  f'    echo "nanorun: this node has $SKYPILOT_NUM_GPUS_PER_NODE GPUs; the spec runs '
                  f'{hw.gpus_per_node} processes per node (hardware.gpus_per_node)" >&2',
                  "    exit 1",
                  "fi"]
    apply = ["nanorun", "apply", f'"{path}"', "--yes", "--launcher", "local", "--no-registry"]
    if hw.nodes > 1:
        # data and tok_train run on one node: node 0. The others wait for their result.json in the shared home
        # (locks do not reach across nodes on a bucket), then every node joins the stages that span them.
        single = [s for s in plan.stages if s.nnodes == 1]
        waits = " ".join(f'"$NANORUN_HOME"/stages/{shlex.quote(s.dir_name)}/result.json' for s in single)
        lines += [f'if [ "$SKYPILOT_NUM_NODES" != {hw.nodes} ]; then',
                  f'    echo "nanorun: $SKYPILOT_NUM_NODES nodes; the spec needs {hw.nodes} (hardware.nodes)" >&2',
                  "    exit 1",
                  "fi"]
        if single:
            lines += ['if [ "$SKYPILOT_NODE_RANK" != 0 ]; then',
                      f"    for done in {waits}; do",
                      f'        until [ -e "$done" ]; do sleep {WAIT_SECONDS}; done',
                      "    done",
                      "fi"]
        lines.append('head_ip=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)')
        apply += ["--node-rank", '"$SKYPILOT_NODE_RANK"', "--rdzv-endpoint", f'"$head_ip:{RDZV_PORT}"']
    lines.append("exec " + " ".join(apply))
    return "\n".join(lines) + "\n"


def task_config(plan, spec_path=None, root=None):
    """The SkyPilot task of a run as a dict (what sky.Task.from_yaml_config takes and task_yaml writes)."""
    from specs import dump_yaml
    hw, sky = plan.spec.hardware, plan.spec.hardware.skypilot
    if spec_path:
        with open(spec_path) as f:
            spec_text = f.read()
    else:
        spec_text = dump_yaml(plan.spec)
    acc = accelerators(hw)
    resources = {"accelerators": acc} if acc else {"cpus": f"{hw.gpus_per_node}+"}
    if sky.cloud or sky.region:
        resources["infra"] = (sky.cloud or "*") + (f"/{sky.region}" if sky.region else "")
    if sky.use_spot:
        resources["use_spot"] = True
    if sky.disk_size:
        resources["disk_size"] = sky.disk_size
    setup = ["set -e", "pip install -e .   # the nanorun checkout, synced as the workdir"]
    if not sky.bucket:   # the home on the first disk of each node: gone with the node
        setup.append(f'[ -w {REMOTE_HOME} ] || {{ sudo mkdir -p {REMOTE_HOME} && '
                     f'sudo chown "$(id -u)" {REMOTE_HOME}; }}')
    setup += list(sky.setup)
    config = {
        "name": task_name(plan),
        "workdir": _workdir(root or project_root()),
        "num_nodes": hw.nodes,
        "resources": resources,
        "envs": {**sky.envs, "NANORUN_HOME": REMOTE_HOME},
    }
    if sky.bucket:
        config["file_mounts"] = {REMOTE_HOME: {"source": sky.bucket, "mode": "MOUNT_CACHED"}}
    config["setup"] = "\n".join(setup) + "\n"
    config["run"] = run_script(plan, spec_text, remote_spec(plan, spec_path))
    return config


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as literal blocks, as people write them in task YAML."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def task_yaml(config):
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def launcher_report(plan, spec_path=None):
    """What `plan` shows and `plan --json` carries under "launcher" for skypilot: how it launches and the task."""
    sky = plan.spec.hardware.skypilot
    config = task_config(plan, spec_path)
    return {"kind": "skypilot", "managed": sky.is_managed, "launch": "sky.jobs.launch" if sky.is_managed else
            "sky.launch", "cluster": None if sky.is_managed else task_name(plan), "bucket": sky.bucket,
            "task": config, "yaml": task_yaml(config)}


def render_lines(report):
    """The `launcher` lines of `plan` for skypilot."""
    task, res = report["task"], report["task"]["resources"]
    how = ("managed job (sky.jobs.launch): relaunched on new nodes after a preemption" if report["managed"] else
           f"cluster {report['cluster']} (sky.launch)")
    what = [f"{res.get('accelerators') or 'cpus ' + res['cpus']} x {task['num_nodes']} node(s)"]
    if "infra" in res:
        what.append(f"infra {res['infra']}")
    if res.get("use_spot"):
        what.append("spot")
    if "disk_size" in res:
        what.append(f"disk {res['disk_size']} GB")
    home = (f"{REMOTE_HOME} = {report['bucket']} (mounted, MOUNT_CACHED)" if report["bucket"] else
            f"{REMOTE_HOME} on each node's disk (no bucket: lost with the nodes)")
    extra = len(task["setup"].splitlines()) - 2 - (not report["bucket"])
    apply = next(line for line in task["run"].splitlines() if line.startswith("exec nanorun apply"))
    return ["", f"launcher skypilot: {how}; task {task['name']} (plan --json carries it under launcher.yaml; "
                f"`nanorun export skypilot SPEC` writes it)",
            f"         resources {', '.join(what)}",
            f"         NANORUN_HOME {home}",
            f"         setup     pip install -e . in workdir {task['workdir']}"
            + (f" (+{extra} line(s))" if extra else ""),
            f"         run       {apply[len('exec '):]}"]


# -----------------------------------------------------------------------------
# SkyPilot's API (sky.launch / sky.jobs.launch return request ids; sky.get / sky.stream_and_get wait for them)


def load_sky():
    """The sky module; MissingToolError (exit 2) naming what is missing when SkyPilot is not installed."""
    try:
        import sky
        import sky.jobs  # noqa: F401
    except ImportError:
        import sys
        raise MissingToolError(f"skypilot: not installed for {sys.executable}; hardware.launcher: skypilot needs it: "
                               f"pip install 'nanorun[skypilot]' (then `sky check` to enable a cloud), or use "
                               f"launcher: local or slurm") from None
    return sky


def _call(what, fn, *args, **kwargs):
    """A SkyPilot call; what it raises (no credentials, no capacity, API server down) as one LaunchError line."""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, LaunchError):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise LaunchError(f"skypilot {what}: {type(e).__name__}: {first}") from None


def _state_name(status):
    return getattr(status, "value", status) or "UNKNOWN"


def job_state(sky, job):
    """(state, reason, restarts) of a recorded job, asked of SkyPilot: the managed job's status and recovery count,
    or the cluster job's status. ("UNKNOWN", why, n) when SkyPilot no longer knows it (a cluster taken down)."""
    job_id, restarts = int(job["job_id"]), job.get("restarts") or 0
    if job["managed"]:
        queue = getattr(sky.jobs, "queue_v2", None)
        found = _call("jobs queue", lambda: sky.get(queue(refresh=False, job_ids=[job_id]) if queue else
                                                    sky.jobs.queue(refresh=False, job_ids=[job_id])))
        records = found[0] if isinstance(found, tuple) else found
        record = next((r for r in records or [] if r.get("job_id") == job_id), None)
        if record is None:
            return "UNKNOWN", f"managed job {job_id} is not in the jobs queue", restarts
        return (_state_name(record.get("status")), record.get("failure_reason") or "",
                max(restarts, record.get("recovery_count") or 0))
    gone = getattr(getattr(sky, "exceptions", None), "ClusterDoesNotExist", ())
    try:
        statuses = sky.get(sky.job_status(job["cluster"], [job_id]))
    except gone:
        return "UNKNOWN", f"cluster {job['cluster']} is down", restarts
    except Exception as e:
        raise LaunchError(f"skypilot job_status {job['cluster']}: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]}") from None
    status = statuses.get(job_id, statuses.get(str(job_id)))
    return (_state_name(status), "", restarts) if status is not None else \
        ("UNKNOWN", f"job {job_id} is not on cluster {job['cluster']}", restarts)


class _Stream(io.TextIOBase):
    """What SkyPilot streams (provisioning, the job's output): echoed line by line and appended to the job's log."""

    def __init__(self, echo, path):
        self.echo, self.path, self.pending = echo, path, ""

    def writable(self):
        return True

    def write(self, text):
        with open(self.path, "a") as f:
            f.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.echo(line.rstrip("\r"))
        return len(text)

    def flush(self):
        """SkyPilot flushes after every print: a partial line waits for its end (or for finish)."""

    def finish(self):
        if self.pending:
            self.echo(self.pending.rstrip("\r"))
            self.pending = ""


def submit(sky, plan, config, job):
    """Write the task YAML to job["script"] and send the launch (a managed job, or a job on cluster job["cluster"]);
    returns SkyPilot's request id, recorded in job["request_id"] so that an apply stopped while it waits leaves the
    launch to the next apply instead of launching twice."""
    task = _task(sky, plan, config)
    rundir.atomic_write_bytes(job["script"], task_yaml(config).encode())
    if job["managed"]:
        request = _call("jobs launch", sky.jobs.launch, task, name=config["name"])
    else:   # with a bucket nothing lives on the nodes: take them down once the job ends
        request = _call("launch", sky.launch, task, cluster_name=job["cluster"], down=bool(job["bucket"]))
    job["request_id"] = str(request)
    return request


def _launched(sky, job, wait):
    """Wait for a launch request and record its job id (state PENDING), or LAUNCH_FAILED with SkyPilot's reason."""
    try:
        result = _call("launch", wait)
    except LaunchError as e:
        job.update(state="LAUNCH_FAILED", reason=str(e), updated_at=time.time())
        raise
    job_id = result[0]
    job_id = job_id[0] if isinstance(job_id, (list, tuple)) else job_id
    if job_id is None:
        job.update(state="LAUNCH_FAILED", reason="SkyPilot submitted no job", updated_at=time.time())
        raise LaunchError("skypilot launch: SkyPilot submitted no job")
    job.update(job_id=str(job_id), state="PENDING", updated_at=time.time())


def _task(sky, plan, config):
    try:
        return sky.Task.from_yaml_config(copy.deepcopy(config))   # it pops what it reads
    except Exception as e:
        raise SpecError(f"{plan.spec.name}: hardware.skypilot: SkyPilot rejects the task: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


# -----------------------------------------------------------------------------
# Applying, following, cancelling


def _close(record, job):
    """The launcher's record of a run whose job ended: success when the job succeeded (the nodes' apply exits 0 only
    when every stage is done), interrupted when cancelled, failed otherwise."""
    now = time.time()
    if job["state"] == "SUCCEEDED":
        for srec in record["stages"]:
            if srec["stage"] in job["stages"] and srec["status"] not in ("success", "cached"):
                srec.update(status="success", finished_at=now, exit_code=0, error=None)
        record["status"], record["error"] = "success", None
    else:
        record["status"] = "interrupted" if job["state"] == "CANCELLED" else "failed"
        record["error"] = f"skypilot job {job['job_id'] or '?'} {job['state']}" + \
            (f": {job['reason']}" if job.get("reason") else "")
    record["finished_at"], record["apply_pid"] = now, None


def _logs_hint(job):
    return f"sky jobs logs {job['job_id']}" if job["managed"] else f"sky logs {job['cluster']} {job['job_id']}"


def apply_skypilot(plan, *, home=None, spec_path=None, echo=print, detach=False, on_update=None):
    """Launch the run as a SkyPilot task (or pick up the job an earlier apply launched, while it may still run), then,
    unless `detach`, follow its output to the end. run.json and jobs.json here are the launcher's record (the nodes
    keep theirs in the bucket). Returns the run record; LaunchError when the job failed or SkyPilot refused it;
    MissingToolError when SkyPilot is not installed. Ctrl-C stops following, not the job (`nanorun cancel`)."""
    from runners.execute import Lock, open_run_record
    sky = load_sky()
    home = home or rundir.home()
    config = task_config(plan, spec_path)
    rdir = rundir.run_dir(plan.run_id, home)
    os.makedirs(rdir, exist_ok=True)
    with Lock(rdir, f"run {plan.run_id}"):
        record = open_run_record(plan, home, spec_path, echo)
        jobs = rundir.read_jobs(rdir)

        def save():
            record["requeues"] = sum(j.get("restarts") or 0 for j in jobs)
            rundir.write_jobs(rdir, jobs)
            atomic_write_json(os.path.join(rdir, "run.json"), record)
            if on_update:
                on_update(record)

        ours = [j for j in jobs if j.get("launcher") == "skypilot"]
        job = ours[-1] if ours else None
        try:
            if job is not None and job["state"] == "LAUNCHING":   # an apply stopped while SkyPilot launched it
                echo(f"[skypilot] waiting for the launch an earlier apply started (request {job['request_id']})")
                _launched(sky, job, lambda: sky.get(job["request_id"]))
            if job is not None and job["state"] not in FINAL:
                job["state"], job["reason"], job["restarts"] = job_state(sky, job)
        except LaunchError:
            if job["state"] in FINAL:
                _close(record, job)
            record["apply_pid"] = None
            save()
            raise
        for stage, srec in zip(plan.stages, record["stages"]):
            if stage_state(stage.stage_dir(home)) == "done" and srec["status"] not in ("success", "cached"):
                srec["status"] = "cached"
        todo = [s.name for s in plan.stages if stage_state(s.stage_dir(home)) != "done"]
        if not todo or (job is not None and job["state"] == "SUCCEEDED"):
            if todo:   # done in the bucket, which this machine does not see
                echo(f"[skypilot] job {job['job_id']} succeeded: the stages are done in {job['bucket'] or 'its home'}; "
                     f"nothing to launch")
            _close(record, job if todo else {"state": "SUCCEEDED", "stages": []})
            save()
            return record
        if job is None or job["state"] in FINAL:
            if job is not None:
                echo(f"[skypilot] job {job['job_id'] or '?'} ended {job['state']}; launching again")
            job = _new_job(plan, rdir, todo)
            jobs.append(job)
            out = _Stream(echo, job["output"])
            try:
                request = submit(sky, plan, config, job)
                save()
                where = "managed job" if job["managed"] else f"cluster {job['cluster']}"
                echo(f"[skypilot] launching {job['name']} ({where}; request {request}) [task: {job['script']}]")
                _launched(sky, job, lambda: sky.stream_and_get(request, output_stream=out))
            except (LaunchError, SpecError) as e:
                out.finish()
                if job["state"] == "LAUNCHING":   # refused before a request was made
                    job.update(state="LAUNCH_FAILED", reason=str(e), updated_at=time.time())
                record.update(status="failed", finished_at=time.time(), error=str(e), apply_pid=None)
                save()
                raise
            except KeyboardInterrupt:
                out.finish()
                record["apply_pid"] = None
                save()
                echo(f"[skypilot] stopped waiting; the launch goes on and `nanorun apply {spec_path or plan.run_id}` "
                     f"picks it up")
                raise
            out.finish()
            echo(f"[skypilot] launched job {job['job_id']}: {', '.join(todo)}")
        else:
            echo(f"[skypilot] following job {job['job_id']} ({job['state']}), launched by an earlier apply")
        record["apply_pid"] = None if detach else record["apply_pid"]   # the nodes run the stages, not this process
        save()
        if detach:
            echo(f"[skypilot] detached; `nanorun apply {spec_path or plan.run_id}` follows job {job['job_id']} again, "
                 f"`{_logs_hint(job)}` shows its output, `nanorun cancel {plan.run_id}` stops it")
            return record
        try:
            return _follow(sky, record, job, echo, save)
        except KeyboardInterrupt:
            record["apply_pid"] = None
            save()
            echo(f"[skypilot] stopped following; job {job['job_id']} keeps running (`nanorun cancel {plan.run_id}` "
                 f"stops it)")
            raise


def _new_job(plan, rdir, todo):
    sky, stamp = plan.spec.hardware.skypilot, int(time.time() * 1000)
    directory = rundir.launcher_dir(rdir, "skypilot")
    os.makedirs(directory, exist_ok=True)
    return {"launcher": "skypilot", "job_id": "", "managed": sky.is_managed, "name": task_name(plan),
            "cluster": None if sky.is_managed else task_name(plan), "bucket": sky.bucket, "stages": todo,
            "script": os.path.join(directory, f"task-{stamp}.yaml"),
            "output": os.path.join(directory, f"job-{stamp}.log"), "request_id": None, "submitted_at": time.time(),
            "state": "LAUNCHING", "reason": "", "restarts": 0, "updated_at": time.time()}


def _follow(sky, record, job, echo, save):
    """Stream the job's output until it ends (a managed job through its recoveries), then record how it ended."""
    out = _Stream(echo, job["output"])
    if job["managed"]:
        code = _call("jobs logs", sky.jobs.tail_logs, job_id=int(job["job_id"]), follow=True, output_stream=out)
    else:
        code = _call("logs", sky.tail_logs, job["cluster"], int(job["job_id"]), follow=True, output_stream=out)
    out.finish()
    state, reason, restarts = job_state(sky, job)
    if state == "UNKNOWN":   # a cluster taken down after its job: the exit code of the logs says how it ended
        state = EXIT_STATES.get(code, state)
    job.update(state=state, reason=reason, restarts=restarts, updated_at=time.time())
    if state not in FINAL:
        save()
        raise LaunchError(f"skypilot stopped streaming job {job['job_id']} while it is {state}; "
                          f"`nanorun apply` follows it again")
    echo(f"[skypilot] job {job['job_id']}: {state}" + (f", recovered {restarts}x" if restarts else ""))
    _close(record, job)
    save()
    if record["status"] == "failed":
        raise LaunchError(f"skypilot job {job['job_id']} ended {state}" + (f" ({reason})" if reason else "")
                          + f": `{_logs_hint(job)}` shows why [log: {job['output']}]")
    return record


def cancel_jobs(run_directory, echo=print):
    """Cancel the run's SkyPilot jobs that may still run: a managed job with sky.jobs.cancel, a cluster job by taking
    its cluster down (sky.down) when the home is a bucket, else by cancelling the job and keeping the cluster and its
    disk. Returns the ids cancelled. The next apply records the final state."""
    jobs = [j for j in rundir.read_jobs(run_directory) if j.get("launcher") == "skypilot"]
    if all(j.get("state") in FINAL for j in jobs):
        return []
    sky, cancelled = load_sky(), []
    for job in jobs:
        if job.get("state") in FINAL:
            continue
        if job["state"] == "LAUNCHING":
            try:
                _launched(sky, job, lambda: sky.get(job["request_id"]))
            except LaunchError:   # the launch failed: nothing runs
                continue
        state = job_state(sky, job)[0]
        if state in FINAL:
            continue
        if job["managed"]:
            _call("jobs cancel", lambda: sky.get(sky.jobs.cancel(job_ids=[int(job["job_id"])])))
            echo(f"cancelled skypilot managed job {job['job_id']} ({state})")
        elif job.get("bucket"):
            _call("down", lambda: sky.get(sky.down(job["cluster"])))
            echo(f"cancelled skypilot job {job['job_id']}: cluster {job['cluster']} taken down ({state})")
        else:
            _call("cancel", lambda: sky.get(sky.cancel(job["cluster"], job_ids=[int(job["job_id"])])))
            echo(f"cancelled skypilot job {job['job_id']} ({state}); cluster {job['cluster']} stays up with the "
                 f"run's home on its disk (`sky down {job['cluster']}` when done)")
        cancelled.append(job["job_id"])
    return cancelled
