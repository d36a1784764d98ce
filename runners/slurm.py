"""
The Slurm launcher (`hardware.launcher: slurm`): `nanorun apply` submits the run's stages that are not done as one
batch job (`sbatch --parsable`), records the job in runs/{run_id}/jobs.json and follows it until it ends.

    from runners.slurm import apply_slurm, render_job
    record = apply_slurm(plan, spec_path="specs/x.yaml", echo=print, detach=False)

The job script runs each stage with the command line the local launcher uses (runners.execute.stage_command): one
`srun` task per node launching torchrun, `--standalone` on one node and a c10d rendezvous on the first node of the
allocation on several. A stage whose result.json exists is skipped, so a requeued job (preempted, or warned by
USR1 90 s before its time limit, which the script answers with `scontrol requeue`) starts again where it stopped:
base_train resumes from its last complete checkpoint (resume_from_step -2), the other stages as they do locally.
Job state comes from squeue, then scontrol, then sacct; requeues and stage times from the `@nanorun` lines the
script writes to its output (runs/{run_id}/slurm/job-{id}.out). A later apply follows a job that is still queued or
running instead of submitting another; `nanorun cancel RUN` scancels it.
"""

import os
import re
import shlex
import shutil
import subprocess
import time

from nanochat import rundir
from nanochat.rundir import atomic_write_json, stage_state
from specs.errors import LaunchError, MissingToolError, SpecError

POLL_SECONDS = 2.0
REQUEUE_WARNING_SECONDS = 90   # USR1 this long before the time limit: the script requeues the job itself
TOOL_TIMEOUT = 30              # seconds any Slurm command may take before we give up on the controller
# job states in which the job may still run (everything else is final: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_RDZV = "@NANORUN_RDZV@"   # stands for the rendezvous endpoint, known only inside the job


# -----------------------------------------------------------------------------
# The Slurm tools


def _run(cmd, timeout=TOOL_TIMEOUT):
    """(exit code, stdout, stderr) of a Slurm command; LaunchError when it does not answer in time."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(cmd[:3])}` did not answer within {timeout}s: is slurmctld up? "
                          f"(scontrol ping)") from None
    except FileNotFoundError:
        _missing(cmd[0])
    return out.returncode, out.stdout, out.stderr


def _missing(tool):
    raise MissingToolError(f"{tool}: not found on PATH; hardware.launcher: slurm needs the Slurm client tools "
                           f"(load your cluster's slurm module, or apt-get install slurm-client; tests/slurm/cluster.sh "
                           f"up starts a local Slurm), or use launcher: local")


def check_cluster(plan, spec_path=None):
    """Pre-flight, before anything is written or submitted: the Slurm tools are on PATH and the spec's partition
    exists. MissingToolError (exit 2) naming what is missing; SpecError pointing at hardware.slurm.partition."""
    for tool in ("sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            _missing(tool)
    partition = plan.spec.hardware.slurm.partition
    if partition:
        code, out, err = _run(["scontrol", "show", "partition", partition, "-o"])
        if code != 0:
            if "not found" not in out + err:
                raise LaunchError(f"scontrol show partition {partition}: {(err + out).strip() or f'exit {code}'}")
            code, out, _ = _run(["sinfo", "-h", "-o", "%R"]) if shutil.which("sinfo") else (1, "", "")
            known = ", ".join(sorted(set(out.split()))) if code == 0 and out.strip() else "see `sinfo`"
            from runners.execute import _position
            where = _position(spec_path, ["hardware", "slurm", "partition"]) if spec_path else plan.spec.name
            raise SpecError([f"{where}: hardware.slurm.partition: no partition {partition!r} on this cluster "
                             f"(partitions: {known})"])


def job_state(job_id):
    """(state, reason) of a job (or array task, ARRAY_TASK): squeue while it is known to the controller, scontrol
    show job for a while after it ended, then sacct (clusters with accounting); ("UNKNOWN", "") when none of them
    knows it any more."""
    code, out, _ = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if code == 0 and out.strip():
        state, _, reason = out.strip().splitlines()[0].partition("|")
        return state, ("" if reason in ("None", "(null)") else reason)
    code, out, _ = _run(["scontrol", "show", "job", "-o", job_id])
    if code == 0 and "JobState=" in out:
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        reason = fields.get("Reason", "")
        return fields["JobState"], ("" if reason in ("None", "(null)") else reason)
    if shutil.which("sacct"):
        code, out, _ = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if code == 0 and out.strip():
            return out.split()[0], ""
    if "_" in job_id:   # an array task cancelled while pending has no record of its own, only a gap in its array
        code, out, _ = _run(["scontrol", "show", "job", "-o", job_id.split("_")[0]])
        if code == 0 and "JobState=" in out:
            return "CANCELLED", "cancelled while pending"
    return "UNKNOWN", ""


def cancel_jobs(run_directory, echo=print):
    """scancel every recorded job of the run that may still run; returns the ids cancelled."""
    cancelled = []
    for job in rundir.read_jobs(run_directory):
        if job.get("launcher", "slurm") != "slurm":   # runners.skypilot cancels its own
            continue
        if job.get("state") in ACTIVE or job.get("state") is None:
            state, _ = job_state(job["job_id"])
            if state in ACTIVE:
                code, _, err = _run(["scancel", job["job_id"]])
                if code != 0:
                    raise LaunchError(f"scancel {job['job_id']}: {err.strip() or f'exit {code}'}")
                echo(f"cancelled slurm job {job['job_id']} ({state})")
                cancelled.append(job["job_id"])
    return cancelled


# -----------------------------------------------------------------------------
# The job script


def _is_cpu(hw):
    return hw.gpu.lower() == "cpu" or hw.device_type in ("cpu", "mps")


def stage_line(plan, stage, home):
    """The script line that runs one stage: `stage NAME DIR srun ... env VARS <the stage's command line>`."""
    from runners.execute import stage_command
    sdir = stage.stage_dir(home)
    cmd = stage_command(stage, os.path.join(sdir, "config.json"), sdir,
                        rdzv_endpoint=_RDZV if stage.nnodes > 1 else None)
    threads = f"$(threads {stage.nproc_per_node})" if _is_cpu(plan.spec.hardware) else "1"
    env = [f"{k}={shlex.quote(str(v))}" for k, v in sorted(stage.env.items())]
    srun = ["srun", f"--nodes={stage.nnodes}", f"--ntasks={stage.nnodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1"]
    line = ["stage", stage.name, shlex.quote(sdir), *srun, '${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}',
            "env", f"OMP_NUM_THREADS={threads}", *env, shlex.join(cmd).replace(_RDZV, '"$rdzv"')]
    return " ".join(line)


def job_output(run_directory):
    return os.path.join(rundir.launcher_dir(run_directory), "job-%j.out")


def sbatch_head(plan, nodes, job_name, output, cwd=None):
    """The #SBATCH arguments of a job of `plan`'s hardware on `nodes` nodes: one task per node, its GPUs (on CPU its
    cores), hardware.slurm's settings, requeue on preemption with a USR1 warning, output appended to `output`."""
    hw, slurm = plan.spec.hardware, plan.spec.hardware.slurm
    head = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={hw.gpus_per_node}" if _is_cpu(hw) else f"--gpus-per-node={hw.gpus_per_node}"]
    head += [f"--{flag}={value}" for flag, value in (("partition", slurm.partition), ("account", slurm.account),
                                                      ("qos", slurm.qos), ("time", slurm.time)) if value]
    return head + ["--requeue", f"--signal=B:USR1@{REQUEUE_WARNING_SECONDS}", "--open-mode=append",
                   f"--output={output}", f"--chdir={cwd or os.getcwd()}", *slurm.extra_args]


def script_prelude(home):
    """The job script's lines after #SBATCH: environment, the requeue trap, the rendezvous endpoint and `stage`,
    the shell function every stage line calls."""
    return [
        "set -u",
        f"export NANORUN_HOME={shlex.quote(home)} PYTHONUNBUFFERED=1",
        "now() { date +%s.%N; }",
        'echo "@nanorun job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} start $(now) on $(hostname)'
        '${CUDA_VISIBLE_DEVICES:+ gpus $CUDA_VISIBLE_DEVICES}"',
        "# preemption warning or time limit near (USR1, from --signal): requeue; every stage resumes where it was",
        "requeued=0",
        'requeue() { requeued=1; echo "@nanorun job $SLURM_JOB_ID requeue $(now)"; scontrol requeue "$SLURM_JOB_ID"; }',
        "trap requeue USR1",
        "# a c10d rendezvous on the first node of the allocation (multi-node stages), on a port of this job",
        'rdzv="$(hostname):$((20000 + SLURM_JOB_ID % 20000))"',
        'threads() { local t=$(( ${SLURM_CPUS_PER_TASK:-1} / $1 )); echo $(( t > 0 ? t : 1 )); }',
        "# stage NAME DIR CMD...: skip it when done, else run CMD under the stage's lock, output to DIR/stdout.log",
        "stage() {",
        "    local name=$1 dir=$2 pid rc; shift 2",
        '    if [ -e "$dir/result.json" ]; then echo "@nanorun stage $name done"; return 0; fi',
        '    echo "@nanorun stage $name start $(now)"',
        '    printf \'\\n$ %s\\n\' "$*" >>"$dir/stdout.log"',
        '    flock --nonblock --conflict-exit-code 75 "$dir/.lock" "$@" >>"$dir/stdout.log" 2>&1 &',
        "    pid=$!",
        '    wait "$pid"; rc=$?',
        '    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done   # a signal interrupted the wait',
        '    echo "@nanorun stage $name end $(now) rc $rc"',
        '    if [ "$requeued" = 1 ]; then exit 0; fi',
        '    if [ "$rc" = 75 ]; then echo "stage $name is being run by another nanorun apply ($dir/.lock)" >&2; exit 75; fi',
        '    if [ "$rc" != 0 ]; then exit "$rc"; fi',
        '    if [ ! -e "$dir/result.json" ]; then echo "stage $name exited 0 without writing result.json" >&2; exit 1; fi',
        "}",
    ]


def render_job(plan, stages, home=None, cwd=None):
    """The sbatch script that runs `stages` (StagePlans of `plan`, in order) in their stage directories."""
    home = home or rundir.home()
    head = sbatch_head(plan, max(s.nnodes for s in stages), f"nanorun-{plan.run_id}",
                       job_output(rundir.run_dir(plan.run_id, home)), cwd)
    lines = ["#!/bin/bash", f"# nanorun run {plan.run_id}: stages {', '.join(s.name for s in stages)}"]
    lines += [f"#SBATCH {arg}" for arg in head]
    lines += script_prelude(home)
    lines += [stage_line(plan, s, home) for s in stages]
    lines.append('echo "@nanorun job $SLURM_JOB_ID end $(now)"')
    return "\n".join(lines) + "\n"


def pending_stages(plan, home=None):
    """The stages a job would run now: those without a result.json (a partial one resumes)."""
    return [s for s in plan.stages if stage_state(s.stage_dir(home)) != "done"]


def launcher_report(plan, home=None):
    """What `plan` shows and `plan --json` carries under "launcher": the kind and, for slurm, the job script."""
    kind = plan.spec.hardware.launcher
    if kind == "local":
        return {"kind": kind, "jobs": []}
    todo = pending_stages(plan, home)
    jobs = [{"stages": [s.name for s in todo], "script": render_job(plan, todo, home)}] if todo else []
    return {"kind": kind, "submit": "sbatch --parsable", "jobs": jobs}


# -----------------------------------------------------------------------------
# Submitting and following


def _markers(job):
    """What the job's output says: {"restarts": n, "stages": {name: {"start": t, "end": t, "rc": code}}}."""
    found = {"restarts": 0, "stages": {}}
    try:
        with open(job["output"], errors="replace") as f:
            text = f.read()
    except OSError:
        return found
    for m in re.finditer(r"^@nanorun job \S+ restart (\d+)", text, re.M):
        found["restarts"] = max(found["restarts"], int(m.group(1)))
    for m in re.finditer(r"^@nanorun stage (\S+) (start|end) ([\d.]+)(?: rc (\d+))?", text, re.M):
        entry = found["stages"].setdefault(m.group(1), {})
        if m.group(2) == "start":
            entry.setdefault("start", float(m.group(3)))
        else:
            entry.update(end=float(m.group(3)), rc=int(m.group(4)))
    return found


def write_configs(plan, stages, home):
    """Each stage's config.json (its parameters, its inputs' paths, out_dir), as the local launcher writes it."""
    from runners.execute import stage_inputs
    for stage in stages:
        sdir = stage.stage_dir(home)
        os.makedirs(sdir, exist_ok=True)
        atomic_write_json(os.path.join(sdir, "config.json"),
                          {**stage.params, **stage_inputs(plan, stage, home), "out_dir": sdir})


def sbatch(script, text):
    """Write the job script `text` to `script` and submit it; the job id (an array's: its array job id)."""
    rundir.atomic_write_bytes(script, text.encode())
    code, out, err = _run(["sbatch", "--parsable", script])
    if code != 0:
        raise LaunchError(f"sbatch refused the job: {(err.strip().splitlines() or [f'exit {code}'])[-1]} "
                          f"[script: {script}]")
    return out.strip().split(";")[0]


def submit(plan, stages, home, echo=print):
    """Write the stages' config.json files and the job script, sbatch it; returns the job record."""
    rdir = rundir.run_dir(plan.run_id, home)
    write_configs(plan, stages, home)
    script = os.path.join(rundir.launcher_dir(rdir), f"job-{int(time.time() * 1000)}.sh")
    job_id = sbatch(script, render_job(plan, stages, home))
    echo(f"[slurm] submitted job {job_id}: {', '.join(s.name for s in stages)} [script: {script}]")
    return {"launcher": "slurm", "job_id": job_id, "stages": [s.name for s in stages], "script": script,
            "output": job_output(rdir).replace("%j", job_id), "submitted_at": time.time(), "state": "PENDING",
            "reason": "", "restarts": 0, "updated_at": time.time()}


def _last_error(sdir):
    from runners.execute import _error_line
    try:
        with open(os.path.join(sdir, "stdout.log"), errors="replace") as f:
            tail = f.read()[-20000:].splitlines()
    except OSError:
        tail = []
    return _error_line([line for line in tail if not line.startswith(("srun:", "slurmstepd"))])


def jobs_summary(run_directory, live=False):
    """One line about a run's launcher jobs for `runs` / `show` ('slurm job 12 RUNNING, requeued 1x'), None when it
    has none. live: ask Slurm about a job recorded as still active (the record is only as fresh as the last apply)."""
    try:
        jobs = rundir.read_jobs(run_directory)
    except rundir.RunDirError:
        return None
    if not jobs:
        return None
    job, requeues = jobs[-1], sum(j.get("restarts") or 0 for j in jobs)
    state = job.get("state") or "?"
    if live and state in ACTIVE and job.get("launcher", "slurm") == "slurm" and shutil.which("squeue"):
        try:
            state = job_state(job["job_id"])[0]
        except LaunchError:
            pass
    more = f" ({len(jobs)} jobs)" if len(jobs) > 1 else ""
    return f"{job.get('launcher', 'slurm')} job {job['job_id']} {state}{more}, requeued {requeues}x"


def _stage_dir(srec, home):
    return rundir.locate_stage_dir(srec.get("dir"), home)


def _update_stages(record, job, home):
    """Stage entries of the run record that `job` runs, from the stage directories and the job's markers; True when
    any changed. Works from the record alone (no plan), so any reader can bring a run up to date."""
    marks, changed = _markers(job), False
    job["restarts"] = max(job.get("restarts") or 0, marks["restarts"])
    active = job["state"] in ACTIVE
    for srec in record["stages"]:
        if srec.get("adhoc"):
            continue
        if srec["stage"] not in job["stages"]:   # done before the job, or by another one (a study's shared stages)
            if srec["status"] not in ("success", "cached") and stage_state(_stage_dir(srec, home)) == "done":
                srec["status"], changed = "cached", True
            continue
        mark, sdir = marks["stages"].get(srec["stage"], {}), _stage_dir(srec, home)
        fields = {"started_at": mark.get("start"), "finished_at": None, "wall_seconds": None, "exit_code": None,
                  "error": None}
        if stage_state(sdir) == "done":
            end = mark.get("end") or (rundir.read_result(sdir) or {}).get("finished_at")
            fields.update(status="success", finished_at=end, exit_code=0,
                          wall_seconds=end - mark["start"] if end and mark.get("start") else None)
        elif "start" not in mark:   # not reached yet (or never: an earlier stage failed, the job was cancelled)
            fields.update(status="pending")
        elif active:   # running, or requeued and waiting to resume
            fields.update(status="running")
        else:
            failed = job["state"] not in ("CANCELLED", "PREEMPTED")
            fields.update(status="failed" if failed else "interrupted", finished_at=mark.get("end") or time.time(),
                          exit_code=mark.get("rc"), error=(_last_error(sdir) or f"job {job['job_id']} {job['state']}")
                          if failed else f"slurm job {job['job_id']} {job['state'].lower()}")
        if srec["status"] in ("success", "cached") and fields["status"] == "success":
            continue
        if any(srec.get(k) != v for k, v in fields.items()):
            srec.update(fields)
            changed = True
    return changed


def finish_record(record, jobs, home):
    """Close the run record once its last job ended: success when every planned stage is done, interrupted when the
    job was cancelled or preempted, failed otherwise (with the failed stage's error)."""
    job, planned = jobs[-1], [s for s in record["stages"] if not s.get("adhoc")]
    if all(stage_state(_stage_dir(s, home)) == "done" for s in planned):
        record["status"], record["error"] = "success", None
    else:
        record["status"] = "interrupted" if job["state"] in ("CANCELLED", "PREEMPTED") else "failed"
        failed = next((s for s in planned if s["status"] == "failed"), None)
        record["error"] = f"stage {failed['stage']}: {failed['error']}" if failed else \
            f"slurm job {job['job_id']} {job['state']}" + (f" ({job['reason']})" if job.get("reason") else "")
    record["finished_at"], record["apply_pid"] = time.time(), None
    record["requeues"] = sum(j.get("restarts") or 0 for j in jobs)
    return record


def job_states(job_ids):
    """{job id: (state, reason)} for several jobs (plain ids or array tasks `ARRAY_TASK`) with one squeue call; the
    jobs squeue no longer lists are asked one by one (job_state: scontrol, then sacct)."""
    ids, found = list(dict.fromkeys(job_ids)), {}
    if not ids:
        return found
    code, out, _ = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if code == 0:
        for line in out.splitlines():
            job_id, state, reason = (line.strip().split("|") + ["", ""])[:3]
            if job_id in ids:
                found[job_id] = (state, "" if reason in ("None", "(null)") else reason)
    for job_id in ids:
        if job_id not in found:
            found[job_id] = job_state(job_id)
    return found


def _live(jobs):
    return [j for j in jobs if j.get("launcher", "slurm") == "slurm"   # runners.skypilot follows its own
            and (j.get("state") in ACTIVE or j.get("state") is None)]


def refresh_run(run_directory, home=None, states=None, on_update=None):
    """Bring a Slurm run's record up to date with Slurm and write it back: the live state of its jobs recorded as
    possibly running, their stages, and once the last job ended the final state of the job, the stages and the run
    (jobs.json, run.json, atomically), so later readers need no Slurm. `states`: {job id: (state, reason)} already
    asked (job_states), else Slurm is asked here. Nothing is written while an apply holds the run's lock (it keeps
    the record itself). Returns (run record, jobs) as they are now; (None, []) for a run without jobs."""
    from runners.execute import Lock
    home = home or rundir.home()
    jobs = rundir.read_jobs(run_directory)
    if not _live(jobs):
        return (rundir.read_run(run_directory) if jobs else None), jobs
    if states is None:
        states = job_states([j["job_id"] for j in _live(jobs)])
    lock = Lock(run_directory, "run")
    try:
        lock.__enter__()
    except LaunchError:   # an apply follows the run and writes its record: report what Slurm says
        for job in _live(jobs):
            if job["job_id"] in states:
                job["state"], job["reason"] = states[job["job_id"]]
        return rundir.read_run(run_directory), jobs
    try:
        jobs, record, changed = rundir.read_jobs(run_directory), rundir.read_run(run_directory), False
        for job in _live(jobs):
            if job["job_id"] not in states:   # not asked this time
                continue
            state, reason = states[job["job_id"]]   # UNKNOWN: ended so long ago that Slurm forgot it
            restarts = job.get("restarts") or 0
            if (state, reason) != (job.get("state"), job.get("reason")):
                job.update(state=state, reason=reason, updated_at=time.time())
                changed = True
            changed = _update_stages(record, job, home) or changed or job["restarts"] != restarts
        if not changed:
            return record, jobs
        if jobs[-1]["state"] not in ACTIVE and record.get("status") in ("running", "pending"):
            finish_record(record, jobs, home)
        record["requeues"] = sum(j.get("restarts") or 0 for j in jobs)
        rundir.write_jobs(run_directory, jobs)
        atomic_write_json(os.path.join(run_directory, "run.json"), record)
        if on_update:
            on_update(record)
        return record, jobs
    finally:
        lock.__exit__(None, None, None)


def refresh_runs(home=None):
    """refresh_run for every run of the home with a Slurm job recorded as possibly running (one squeue call for all;
    `nanorun runs` / `show` call this before reading). Quietly does nothing without Slurm tools or when the
    controller does not answer: the recorded state is shown."""
    home = home or rundir.home()
    todo = {}
    for run_id in rundir.run_ids(home):
        directory = rundir.run_dir(run_id, home)
        if not os.path.exists(rundir.jobs_path(directory)):
            continue
        try:
            jobs = rundir.read_jobs(directory)
        except rundir.RunDirError:
            continue
        if _live(jobs):
            todo[directory] = [j["job_id"] for j in _live(jobs)]
    if not todo or shutil.which("squeue") is None:
        return
    try:
        states = job_states([i for ids in todo.values() for i in ids])
        for directory in todo:
            refresh_run(directory, home, states)
    except (LaunchError, rundir.RunDirError):
        pass


class _Tails:
    """New lines of the stages' stdout.log files, prefixed as the local launcher prints them."""

    def __init__(self, plan, names, home):
        self.files = {s.name: os.path.join(s.stage_dir(home), "stdout.log") for s in plan.stages if s.name in names}
        self.offsets = {n: os.path.getsize(p) if os.path.exists(p) else 0 for n, p in self.files.items()}

    def echo(self, echo):
        for name, path in self.files.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[name])
                    chunk = f.read()
            except OSError:
                continue
            complete = chunk[:chunk.rfind(b"\n") + 1]
            self.offsets[name] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                echo(f"[{name}] {line.rstrip()}")


def apply_slurm(plan, *, home=None, spec_path=None, echo=print, detach=False, on_update=None, poll=POLL_SECONDS):
    """Submit the run's stages that are not done as one Slurm job (or follow the job a previous apply submitted, while
    it may still run), then, unless `detach`, follow it to its end: stage output echoed, run.json and jobs.json kept
    up to date (on_update(record) after each change). Returns the run record; LaunchError when the job failed.
    Ctrl-C stops following, not the job (`nanorun cancel RUN` does that)."""
    from runners.execute import Lock, open_run_record
    home = home or rundir.home()
    check_cluster(plan, spec_path)
    rdir = rundir.run_dir(plan.run_id, home)
    os.makedirs(rdir, exist_ok=True)
    with Lock(rdir, f"run {plan.run_id}"):
        record = open_run_record(plan, home, spec_path, echo)
        jobs = rundir.read_jobs(rdir)
        run_json = os.path.join(rdir, "run.json")

        def save():
            record["requeues"] = sum(j.get("restarts") or 0 for j in jobs)
            rundir.write_jobs(rdir, jobs)
            atomic_write_json(run_json, record)
            if on_update:
                on_update(record)

        job = jobs[-1] if jobs else None
        if job is not None:
            job["state"], job["reason"] = job_state(job["job_id"])
            if job["state"] not in ACTIVE:   # a job that ended while nobody watched: record how
                _update_stages(record, job, home)
                job = None
        for stage, srec in zip(plan.stages, record["stages"]):
            if stage_state(stage.stage_dir(home)) == "done" and srec["status"] not in ("success", "cached"):
                srec["status"] = "cached"
        if job is None:
            todo = pending_stages(plan, home)
            if not todo:
                record["status"], record["finished_at"] = "success", time.time()
                save()
                return record
            try:
                job = submit(plan, todo, home, echo)
            except LaunchError as e:
                record["status"], record["finished_at"], record["error"] = "failed", time.time(), str(e)
                save()
                raise
            jobs.append(job)
        else:
            echo(f"[slurm] following job {job['job_id']} ({job['state']}), submitted by an earlier apply")
        record["apply_pid"] = None if detach else record["apply_pid"]   # the job runs the stages, not this process
        save()
        if detach:
            echo(f"[slurm] detached; `nanorun apply {spec_path or plan.run_id}` follows job {job['job_id']} again, "
                 f"`nanorun cancel {plan.run_id}` stops it")
            return record
        try:
            return _follow(plan, record, job, home, echo, save, poll)
        except KeyboardInterrupt:
            record["apply_pid"] = None
            save()
            echo(f"[slurm] stopped following; job {job['job_id']} keeps running (`nanorun cancel {plan.run_id}` "
                 f"stops it)")
            raise


def _follow(plan, record, job, home, echo, save, poll):
    tails, last = _Tails(plan, job["stages"], home), None
    while True:
        job["state"], job["reason"] = job_state(job["job_id"])
        job["updated_at"] = time.time()
        tails.echo(echo)
        restarts = job.get("restarts") or 0
        changed = _update_stages(record, job, home)
        if (job["state"], job["reason"]) != last or job["restarts"] != restarts:
            last = (job["state"], job["reason"])
            reason = f" ({job['reason']})" if job["reason"] else ""
            requeues = f", requeued {job['restarts']}x" if job["restarts"] else ""
            echo(f"[slurm] job {job['job_id']}: {job['state']}{reason}{requeues}")
            changed = True
        if job["state"] not in ACTIVE:
            break
        if changed:
            save()
        time.sleep(poll)
    tails.echo(echo)
    done = all(stage_state(s.stage_dir(home)) == "done" for s in plan.stages)
    record["status"] = "success" if done else ("interrupted" if job["state"] in ("CANCELLED", "PREEMPTED") else "failed")
    record["finished_at"] = time.time()
    save()
    if record["status"] == "failed":
        failed = next((s for s in record["stages"] if s["status"] == "failed"), None)
        what = f"stage {failed['stage']}: {failed['error']}" if failed else "no stage failed"
        raise LaunchError(f"slurm job {job['job_id']} ended {job['state']}: {what} [output: {job['output']}]")
    return record
