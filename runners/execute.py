"""
Execute a Plan: run each stage as a subprocess (torchrun for multi-process stages) in its
content-addressed directory, skip stages that already succeeded, resume interrupted ones, and keep
`$NANORUN_HOME/runs/<run_id>/run.json` up to date (the registry ingests it; it is the source of truth).

    from runners.execute import apply_plan
    apply_plan(plan, echo=print)

Only this process writes run.json, atomically. A stage's own files (events.jsonl, checkpoints,
result.json) are written by the stage; a stage counts as done only when its result.json exists.
"""

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque

from runners.plan import get_home, stage_state
from specs import dump_yaml
from specs.errors import LaunchError


def _atomic_write_json(path, obj):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_dir(plan, home=None):
    return os.path.join(home or get_home(), "runs", plan.run_id)


def load_run_record(plan, home=None):
    path = os.path.join(run_dir(plan, home), "run.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _new_run_record(plan, home, spec_path):
    spec, hw = plan.spec, plan.spec.hardware
    return {
        "run_id": plan.run_id, "name": spec.name, "spec_path": os.path.abspath(spec_path) if spec_path else None,
        "spec_yaml": dump_yaml(spec), "spec_hash": plan.spec_hash, "plan": plan.to_json(),
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
    if "base_train" in dirs:
        inputs["checkpoint_dir"] = os.path.join(dirs["base_train"], "checkpoints")
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


class _StageLock:
    """An exclusive flock on <stage_dir>/.lock so two applies never run the same stage at once."""

    def __init__(self, stage_dir):
        self.path = os.path.join(stage_dir, ".lock")
        self.f = None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise LaunchError(f"{os.path.dirname(self.path)} is being run by another nanorun apply") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _run_subprocess(cmd, env, log_path, echo, prefix):
    """Run cmd in its own process group, tee its output to log_path and (prefixed) to echo.
    Returns (exit_code, last_lines). SIGINT/SIGTERM to us are forwarded to the whole group."""
    tail = deque(maxlen=200)
    with open(log_path, "a", buffering=1) as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1, start_new_session=True)

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
    if stage.params.get("dtype"):
        env["NANOCHAT_DTYPE"] = stage.params["dtype"]
    return env


def apply_plan(plan, *, home=None, spec_path=None, echo=print, node_rank=0, rdzv_endpoint=None, on_update=None):
    """Run every stage of the plan that is not done yet. Returns the final run record.
    on_update(record) is called after each stage (the CLI ingests into the registry there)."""
    home = home or get_home()
    rdir = run_dir(plan, home)
    os.makedirs(rdir, exist_ok=True)
    record = load_run_record(plan, home) or _new_run_record(plan, home, spec_path)
    # the plan may have grown (new stages) since the last apply: keep recorded stage history by key
    old = {s["key"]: s for s in record.get("stages", [])}
    record["stages"] = [old.get(s.key) or {"stage": s.name, "key": s.key, "dir": s.stage_dir(home), "status": "pending",
                                           "started_at": None, "finished_at": None, "wall_seconds": None,
                                           "exit_code": None, "error": None} for s in plan.stages]
    record["plan"] = plan.to_json()
    record["applies"] = record.get("applies", 0) + 1
    record["status"], record["started_at"], record["finished_at"] = "running", record["started_at"] or time.time(), None
    run_json = os.path.join(rdir, "run.json")
    _atomic_write_json(run_json, record)

    def save(stage_rec=None, **fields):
        if stage_rec is not None:
            stage_rec.update(fields)
        _atomic_write_json(run_json, record)
        if on_update:
            on_update(record)

    try:
        for stage, srec in zip(plan.stages, record["stages"]):
            sdir = stage.stage_dir(home)
            state = stage_state(sdir)
            if state == "done":
                if srec["status"] != "success":
                    save(srec, status="cached")
                echo(f"[{stage.name}] done ({stage.dir_name}), skipping")
                continue
            os.makedirs(sdir, exist_ok=True)
            with _StageLock(sdir):
                config = {**stage.params, **stage_inputs(plan, stage, home), "out_dir": sdir}
                config_path = os.path.join(sdir, "config.json")
                _atomic_write_json(config_path, config)
                cmd = stage_command(stage, config_path, sdir, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
                echo(f"[{stage.name}] {'resuming' if state == 'partial' else 'starting'} in {sdir}")
                t0 = time.time()
                save(srec, status="running", started_at=t0, finished_at=None, exit_code=None, error=None)
                code, tail = _run_subprocess(cmd, _stage_env(stage), os.path.join(sdir, "stdout.log"), echo,
                                             f"[{stage.name}] ")
                wall = time.time() - t0
                if code != 0 or stage_state(sdir) != "done":
                    err = _error_line(tail) or f"exit code {code}"
                    save(srec, status="failed", finished_at=time.time(), wall_seconds=wall, exit_code=code, error=err)
                    record["status"], record["finished_at"] = "failed", time.time()
                    save()
                    raise LaunchError(f"stage {stage.name} failed (exit {code}): {err.strip()} "
                                      f"[log: {os.path.join(sdir, 'stdout.log')}]")
                save(srec, status="success", finished_at=time.time(), wall_seconds=wall, exit_code=0)
    except KeyboardInterrupt:
        for srec in record["stages"]:
            if srec["status"] == "running":
                srec.update(status="interrupted", finished_at=time.time())
        record["status"], record["finished_at"] = "interrupted", time.time()
        save()
        raise
    record["status"], record["finished_at"] = "success", time.time()
    save()
    return record
