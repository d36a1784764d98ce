"""
Execute a Plan: run each stage as a subprocess (torchrun for multi-process stages) in its
content-addressed directory, skip stages that already succeeded, resume interrupted ones, and keep
`$NANORUN_HOME/runs/<run_id>/run.json` up to date (the registry ingests it; it is the source of truth).

    from runners.execute import apply_plan
    apply_plan(plan, echo=print)

Only this process writes run.json, atomically. A stage's own files (events.jsonl, checkpoints,
result.json) are written by the stage; a stage counts as done only when its result.json exists.
Two applies never run the same run (flock on runs/<run_id>/.lock) or the same stage (flock on
<stage_dir>/.lock) at once; the second fails fast. A stage's processes die with the apply that launched
them (SIGINT/SIGTERM are forwarded; if the apply itself is killed, the kernel sends the stage SIGTERM), so a
re-apply never races a leftover trainer: it resumes from the last complete checkpoint.
"""

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque

from nanochat import rundir
from nanochat.rundir import atomic_write_json, stage_state
from specs import dump_yaml, recipe_hash
from specs.errors import InputError, LaunchError, SpecError


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_dir(plan, home=None):
    return rundir.run_dir(plan.run_id, home)


def load_run_record(plan, home=None, node_rank=0):
    """The run's record (node_rank > 0: that node's own), or None before its first apply; RunDirError when it is
    unusable."""
    directory = run_dir(plan, home)
    exists = os.path.exists(os.path.join(directory, rundir.run_record_name(node_rank)))
    return rundir.read_run(directory, node_rank) if exists else None


def _new_run_record(plan, home, spec_path):
    spec, hw = plan.spec, plan.spec.hardware
    return {
        "run_id": plan.run_id, "name": spec.name, "spec_path": os.path.abspath(spec_path) if spec_path else None,
        "spec_yaml": dump_yaml(spec), "spec_hash": plan.spec_hash,
        "recipe_hash": recipe_hash(spec), "plan": plan.to_json(),
        "status": "pending", "created_at": time.time(), "started_at": None, "finished_at": None,
        "git_commit": _git_commit(), "host": socket.gethostname(),
        "hardware": {"nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node, "gpu": hw.gpu,
                     "usd_per_gpu_hour": hw.usd_per_gpu_hour, "device_type": getattr(hw, "device_type", "")},
        "tags": list(spec.tags), "seed": spec.seed, "applies": 0,
        "stages": [{"stage": s.name, "key": s.key, "dir": s.stage_dir(home), "status": "pending",
                    "started_at": None, "finished_at": None, "wall_seconds": None, "exit_code": None, "error": None}
                   for s in plan.stages],
    }


def stage_inputs(plan, stage, home=None):
    """File-system inputs of a stage (paths of upstream stage outputs); not part of the stage key."""
    dirs = {u: plan.stage(u).stage_dir(home) for u in stage.upstream}
    inputs = {}
    if "data" in dirs:
        inputs["data_dir"] = dirs["data"]
    if "tok_train" in dirs:
        inputs["tokenizer_dir"] = os.path.join(dirs["tok_train"], "tokenizer")
    # the model a stage starts from: the latest of base_train -> sft -> rl among its upstream stages
    for producer in ("base_train", "sft", "rl"):
        if producer in dirs:
            inputs["checkpoint_dir"] = os.path.join(dirs[producer], "checkpoints")
    return inputs


def stage_command(stage, config_path, out_dir, *, node_rank=0, rdzv_endpoint=None):
    """The exact command line of a stage: torchrun for multi-process stages, plain python otherwise."""
    args = ["--config", config_path, "--out-dir", out_dir]
    if stage.nproc_per_node == 1 and stage.nnodes == 1 and stage.name not in ("base_train", "base_eval"):
        return [sys.executable, "-m", stage.module, *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if stage.nnodes > 1:
        if not rdzv_endpoint:
            raise LaunchError(f"stage {stage.name}: {stage.nnodes} nodes need --rdzv-endpoint HOST:PORT "
                              f"(run the same apply on every node with its --node-rank)")
        torchrun += [f"--nnodes={stage.nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={stage.key[:16]}"]
    else:
        torchrun += ["--standalone", "--nnodes=1"]
    return [*torchrun, f"--nproc-per-node={stage.nproc_per_node}", "-m", stage.module, *args]


class Lock:
    """An exclusive flock on <directory>/.lock (a run or a stage) so two applies never run it at once; `nanorun
    eval` takes a run's lock to update its run.json. The lock file holds the owner's pid for the error message;
    the kernel drops the lock when the owner dies. Each node of a multi-node apply (same run, shared
    $NANORUN_HOME) takes its own lock file, so a second apply with the same --node-rank is the one refused."""

    def __init__(self, directory, what, node_rank=0, wait=None):
        """wait: None = fail at once when held; else a function called with a message, after which the lock is
        waited for (the other nodes of a multi-node apply wait for a single-process stage one of them runs)."""
        name = ".lock" if node_rank == 0 else f".lock-node{node_rank}"
        self.path, self.what, self.wait, self.f = os.path.join(directory, name), what, wait, None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            owner = self.f.read().strip()
            if self.wait is not None:
                self.wait(f"{self.what} is being run by another node's apply{f' (pid {owner})' if owner else ''}; "
                          "waiting for it")
                fcntl.flock(self.f, fcntl.LOCK_EX)
            else:
                self.f.close()
                raise LaunchError(f"{self.what} is being run by another nanorun apply"
                                  f"{f' (pid {owner})' if owner else ''}; wait for it or stop it first") from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"{os.getpid()}\n")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _die_with_parent_fn():
    """A preexec_fn for stages: Linux sends the stage SIGTERM when this apply dies (even by SIGKILL), and
    torchrun passes SIGTERM on to its workers, so no trainer outlives a crashed apply and races the next one.
    None where prctl is unavailable (the leftover-process check below still guards the next apply)."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: after fork only the call runs
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent():
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the apply died before prctl took effect
            os._exit(1)
    return die_with_parent


def _stage_processes(config_path):
    """Pids of live processes launched with `--config config_path` (a stage's launcher and its workers),
    read from /proc; [] where there is no /proc."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    needle = ["--config", config_path]
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[-1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and any(argv[i:i + 2] == needle for i in range(len(argv) - 1)):
            pids.append(int(entry))
    return pids


def _wait_for_leftovers(stage_name, config_path, echo, timeout=60.0):
    """Processes of this stage that outlived an earlier apply (killed mid-stage) must be gone before we
    resume in the same directory; they are given `timeout` seconds to finish dying."""
    deadline, told = time.time() + timeout, False
    while True:
        pids = _stage_processes(config_path)
        if not pids:
            return
        if time.time() > deadline:
            raise LaunchError(f"stage {stage_name}: processes {pids} of an earlier apply still run with "
                              f"--config {config_path}; stop them (kill {' '.join(map(str, pids))}) and apply again")
        if not told:
            echo(f"[{stage_name}] waiting for {len(pids)} leftover process(es) of an earlier apply to exit")
            told = True
        time.sleep(0.2)


def _run_subprocess(cmd, env, log_path, echo, prefix):
    """Run cmd in its own process group, tee its output to log_path and (prefixed) to echo.
    Returns (exit_code, last_lines). SIGINT/SIGTERM to us are forwarded to the whole group."""
    tail = deque(maxlen=200)
    with open(log_path, "a", buffering=1) as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1, start_new_session=True, preexec_fn=_die_with_parent_fn())

        def forward(signum, _frame):
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass
            raise KeyboardInterrupt

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                echo(f"{prefix}{line.rstrip()}")
            code = proc.wait()
        except KeyboardInterrupt:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return code, list(tail)


_LAUNCHER_NOISE = re.compile(r"torch/distributed|ChildFailedError|^\s*(File |\^|=+$|-+$|\[\d+\]:|Root Cause|Failures:|"
                             r"time |host |rank |exitcode|error_file|traceback :|<NO_OTHER|raise |return |Traceback)|"
                             r"^E\d{4} |^W\d{4} ")


def _error_line(tail):
    """The stage's own last words: the last output line that is not torchrun's failure report."""
    own = [l.strip() for l in tail if l.strip() and not _LAUNCHER_NOISE.search(l.strip())
           and not l.strip().endswith(" FAILED")]
    errors = [l for l in own if re.search(r"error|exception|not found|does not exist|no such", l, re.IGNORECASE)]
    return (errors or own or [None])[-1]


def _stage_env(stage):
    env = dict(os.environ)
    if stage.params.get("device_type") == "cpu":  # split the cores between the processes of this node
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // stage.nproc_per_node)))
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(stage.env)  # e.g. NANOCHAT_DTYPE from the spec: part of the stage key
    return env


def launch_stage(stage, config, echo, *, home=None, node_rank=0, rdzv_endpoint=None, on_start=None):
    """Run one stage (a StagePlan) in its content-addressed directory; the caller holds that directory's Lock.
    Waits for processes of an earlier launch to exit, writes config.json (`config` + out_dir), runs the stage's
    command line with its environment, its output teed to stdout.log and, prefixed, to echo; on_start(t0) is called
    as it starts. Returns (exit code, wall seconds, error): error is None when the stage exited 0 and wrote its
    result.json, else its own last error line. `nanorun apply` and `nanorun eval` both launch stages here."""
    sdir = stage.stage_dir(home)
    config_path = os.path.join(sdir, "config.json")
    _wait_for_leftovers(stage.name, config_path, echo)
    atomic_write_json(config_path, {**config, "out_dir": sdir})
    cmd = stage_command(stage, config_path, sdir, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    t0 = time.time()
    if on_start is not None:
        on_start(t0)
    code, tail = _run_subprocess(cmd, _stage_env(stage), os.path.join(sdir, "stdout.log"), echo, f"[{stage.name}] ")
    wall = time.time() - t0
    if code != 0 or stage_state(sdir) != "done":
        return code, wall, (_error_line(tail) or f"exit code {code}").strip()
    return code, wall, None


def _position(spec_path, keys):
    """'FILE:LINE:COL' of the YAML node at `keys` (mapping keys and list indexes) in the spec file; FILE
    alone when the node cannot be found (the spec was edited since it was loaded)."""
    import yaml
    try:
        with open(spec_path) as f:
            node = yaml.compose(f)
        for k in keys:
            if isinstance(node, yaml.MappingNode):
                node = next(value for key, value in node.value if key.value == k)
            else:
                node = node.value[k]
        return f"{spec_path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"
    except (OSError, yaml.YAMLError, StopIteration, IndexError, AttributeError, TypeError):
        return spec_path


def check_local_data(plan, spec_path=None, home=None):
    """Pre-flight: every local data path (`text` / `parquet` sources) exists, so a typo fails in a second with
    one line pointing at the spec instead of after the plan starts. Skipped when the data stage is done.
    Paths are checked as the data stage will read them (relative to the current directory)."""
    if not any(s.name == "data" for s in plan.stages):
        return
    data = plan.stage("data")
    if stage_state(data.stage_dir(home)) == "done":
        return
    entries = [(("train", i), e) for i, e in enumerate(data.params.get("train") or [])]
    if data.params.get("val"):
        entries.append((("val",), data.params["val"]))
    problems = []
    for keys, entry in entries:
        source, path = entry.get("source"), entry.get("path")
        if source not in ("text", "parquet") or not path:
            continue
        field = "data." + keys[0] + (f"[{keys[1]}]" if len(keys) > 1 else "") + ".path"
        if not os.path.exists(path):
            why = f"{path} does not exist"
        elif not os.path.isdir(path):
            kind = ".txt/.md" if source == "text" else ".parquet"
            why = f"{path} is not a directory (source {source!r} reads the {kind} files in a folder)"
        else:
            continue
        where = _position(spec_path, ["data", *keys, "path"]) if spec_path else plan.spec.name
        problems.append(f"{where}: {field}: {why}")
    if problems:
        raise SpecError(problems)


def check_device(plan, spec_path=None):
    """Pre-flight: the spec's device exists on this machine (a CUDA spec on a machine without a GPU fails here in
    one line, not inside torchrun). `plan` still resolves such a spec from the tables, for another machine."""
    device = (plan.hardware or {}).get("device") or {}
    if device.get("device_type") != "cpu" and device.get("source") == "table":
        hw = plan.spec.hardware
        field = "device_type" if hw.device_type else "gpu"
        where = _position(spec_path, ["hardware", field]) if spec_path else plan.spec.name
        value = hw.device_type or hw.gpu
        if device["device_type"] == "mps":
            raise SpecError([f"{where}: hardware.{field}: 'mps' needs an Apple-silicon Mac and this machine is not "
                             f"one; use device_type: cpu here"])
        raise SpecError([f"{where}: hardware.{field}: {value!r} needs a CUDA GPU and this machine has none "
                         f"(nvidia-smi lists no GPU); use gpu: cpu here, or apply the spec on a GPU node"])


def _interrupt_on_sigterm():
    """SIGTERM (a scheduler, `kill`) ends an apply like Ctrl-C does: recorded as interrupted, nothing lost.
    Returns the previous handler, or None when not on the main thread (signals cannot be set there)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _load_or_new_record(plan, home, spec_path, echo, node_rank=0):
    rdir = run_dir(plan, home)
    name = rundir.run_record_name(node_rank)
    rundir.remove_temp_files(os.path.join(rdir, name))  # of a write that a killed apply never finished
    try:
        record = load_run_record(plan, home, node_rank)
    except rundir.RunDirError:  # not JSON, or not the shape this runner writes
        bad = os.path.join(rdir, f"{name}.corrupt-{int(time.time())}")
        os.replace(os.path.join(rdir, name), bad)
        echo(f"warning: {bad}: unreadable run record set aside; starting a new one (stage outputs are kept)")
        record = None
    return record or _new_run_record(plan, home, spec_path)


def check_node_rank(plan, node_rank):
    """This node's rank is one of the spec's nodes: 0 on a single-node spec (another rank would take its own lock
    files and so not be stopped by a concurrent apply of the same run)."""
    nodes = plan.spec.hardware.nodes
    if not isinstance(node_rank, int) or isinstance(node_rank, bool) or not 0 <= node_rank < nodes:
        raise InputError(f"--node-rank {node_rank}: must be in 0..{nodes - 1} (spec {plan.spec.name} has "
                         f"hardware.nodes: {nodes})")


def apply_plan(plan, *, home=None, spec_path=None, echo=print, node_rank=0, rdzv_endpoint=None, on_update=None):
    """Run every stage of the plan that is not done yet. Returns the final run record.
    on_update(record) is called after each stage (the CLI ingests into the registry there).
    Raises InputError for a node rank the spec does not have, SpecError for a missing local data path,
    LaunchError when another apply runs this run or one of its stages, or when a stage fails; KeyboardInterrupt
    (also on SIGTERM) after recording the run as interrupted."""
    home = home or rundir.home()
    check_node_rank(plan, node_rank)
    check_local_data(plan, spec_path, home)
    rdir = run_dir(plan, home)
    os.makedirs(rdir, exist_ok=True)
    old_handler = _interrupt_on_sigterm()
    try:
        with Lock(rdir, f"run {plan.run_id}", node_rank):
            return _apply_locked(plan, home, spec_path, echo, node_rank, rdzv_endpoint, on_update)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def open_run_record(plan, home, spec_path, echo, node_rank=0):
    """The run's record as an apply starts it (the caller holds the run's Lock): recorded stage history kept by key,
    `nanorun eval` entries after the planned stages, status running, written to run.json (node_rank > 0: to its
    own run-node{R}.json). Returns the record."""
    record = _load_or_new_record(plan, home, spec_path, echo, node_rank)
    # the plan may have grown (new stages) since the last apply: keep recorded stage history by key
    old = {s["key"]: s for s in record.get("stages", [])}
    record["stages"] = [old.get(s.key) or {"stage": s.name, "key": s.key, "dir": s.stage_dir(home), "status": "pending",
                                           "started_at": None, "finished_at": None, "wall_seconds": None,
                                           "exit_code": None, "error": None} for s in plan.stages]
    # evaluations added later by `nanorun eval` belong to the run too; they come after the planned stages
    planned = {s.key for s in plan.stages}
    record["stages"] += [s for s in old.values() if s.get("adhoc") and s["key"] not in planned]
    record["plan"] = plan.to_json()
    record["launcher"] = plan.spec.hardware.launcher
    record["applies"] = record.get("applies", 0) + 1
    # who is applying: a reader seeing status "running" can tell a live apply from one that was killed
    record["apply_pid"], record["apply_host"] = os.getpid(), socket.gethostname()
    record["status"], record["started_at"], record["finished_at"] = "running", record["started_at"] or time.time(), None
    atomic_write_json(os.path.join(run_dir(plan, home), rundir.run_record_name(node_rank)), record)
    return record


def _apply_locked(plan, home, spec_path, echo, node_rank, rdzv_endpoint, on_update):
    record = open_run_record(plan, home, spec_path, echo, node_rank)
    run_json = os.path.join(run_dir(plan, home), rundir.run_record_name(node_rank))
    if node_rank > 0:
        on_update = None   # node 0's apply ingests the run; this node's record is its own file
    multi_node = plan.spec.hardware.nodes > 1

    def save(stage_rec=None, **fields):
        if stage_rec is not None:
            stage_rec.update(fields)
        atomic_write_json(run_json, record)
        if on_update:
            on_update(record)

    def finish(status, error=None):
        """Close the record: stages still marked running get `status` too."""
        now = time.time()
        for srec in record["stages"]:
            if srec["status"] == "running":
                srec.update(status=status, finished_at=now, error=error)
        record["status"], record["finished_at"] = status, now
        save()

    try:
        for stage, srec in zip(plan.stages, record["stages"]):
            sdir = stage.stage_dir(home)
            if stage_state(sdir) == "done":
                if srec["status"] != "success":
                    save(srec, status="cached")
                echo(f"[{stage.name}] done ({stage.dir_name}), skipping")
                continue
            os.makedirs(sdir, exist_ok=True)
            # a stage that spans the nodes: every node's apply runs its part under its own lock file; a single-process
            # stage (data, tok_train) of a multi-node spec: one node runs it, and with a shared
            # $NANORUN_HOME the others wait on the same lock and then find it done
            spans = stage.nnodes > 1
            waiting = (lambda msg, name=stage.name: echo(f"[{name}] {msg}")) if multi_node and not spans else None
            with Lock(sdir, f"stage {stage.name} ({sdir})", node_rank if spans else 0, wait=waiting):
                state = stage_state(sdir)  # again, under the lock: another run sharing this stage may have finished it
                if state == "done":
                    save(srec, status="cached")
                    echo(f"[{stage.name}] done ({stage.dir_name}), skipping")
                    continue
                echo(f"[{stage.name}] {'resuming' if state == 'partial' else 'starting'} in {sdir}")
                code, wall, err = launch_stage(
                    stage, {**stage.params, **stage_inputs(plan, stage, home)}, echo, home=home, node_rank=node_rank,
                    rdzv_endpoint=rdzv_endpoint, on_start=lambda t0, srec=srec: save(
                        srec, status="running", started_at=t0, finished_at=None, exit_code=None, error=None))
                if err is not None:
                    srec.update(wall_seconds=wall, exit_code=code)
                    finish("failed", err)
                    raise LaunchError(f"stage {stage.name} failed (exit {code}): {err} "
                                      f"[log: {os.path.join(sdir, 'stdout.log')}]")
                save(srec, status="success", finished_at=time.time(), wall_seconds=wall, exit_code=0)
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    except BaseException as e:  # a busy stage lock, leftover processes, or a bug: never leave "running" behind
        if record["status"] == "running":
            finish("failed", str(e))
        raise
    record["status"], record["finished_at"] = "success", time.time()
    save()
    return record


def cancel_run(ref, home=None, echo=print, timeout=60.0):
    """Stop what runs for the run `ref` names: scancel its Slurm jobs that may still run, cancel its SkyPilot jobs; else
    SIGTERM the local apply running it on this host and wait for it to record the run as interrupted. Returns what was
    stopped (job ids, or the apply's pid); [] with a message when nothing was queued or running. LaunchError for an
    apply on another host; MissingToolError for a SkyPilot job without SkyPilot installed."""
    home = home or rundir.home()
    run_id, record = rundir.find_run(ref, home)
    rdir = rundir.run_dir(run_id, home)
    jobs = rundir.read_jobs(rdir)
    if jobs:
        from runners import skypilot, slurm
        cancelled = slurm.cancel_jobs(rdir, echo) if any(j.get("launcher", "slurm") == "slurm" for j in jobs) else []
        if any(j.get("launcher") == "skypilot" for j in jobs):
            cancelled += skypilot.cancel_jobs(rdir, echo)
        if cancelled:
            echo(f"run {run_id}: cancelled; `nanorun apply` records the final state and resumes from there")
            return cancelled
    pid, host = record.get("apply_pid"), record.get("apply_host")
    if record.get("status") == "running" and isinstance(pid, int) and pid > 0:
        if host and host != socket.gethostname():
            raise LaunchError(f"run {run_id} is being applied on host {host} (pid {pid}); stop it there")
        try:
            os.kill(pid, signal.SIGTERM)   # the apply ends like Ctrl-C: stage stopped, run recorded as interrupted
        except ProcessLookupError:
            pid = None
        if pid:
            deadline = time.time() + timeout
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            echo(f"run {run_id}: stopped its apply (pid {pid}); `nanorun apply` resumes it")
            return [pid]
    echo(f"run {run_id}: nothing is queued or running (status {record.get('status')})")
    return []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie child of ours has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True
