"""
A study's cells on Slurm (the base spec has `hardware.launcher: slurm`): `nanorun apply STUDY` submits the cells that
are not done as one job array, `sbatch --array=0-(N-1)%max_parallel`, whose task i runs the stage chain of the i-th
of those cells (each cell is an ordinary run: its own run id, run.json and jobs.json, job id `ARRAY_TASK`). Stages
the cells share (data, tok_train: the same content key) run once, in a job of their own that the array waits for
(`--dependency=afterok`); a failed shared job cancels the array. Then apply follows the tasks, writing each cell's run
record and ingesting it as it changes (`--detach` returns after submission; a later apply, `study status` or `plan`
picks the state up).

    from runners.slurm_study import apply_study_slurm
    apply_study_slurm(plan_study(specs.read_study(path)), echo=print, detach=True)

    studies/{name}/study.json   each cell's job_id ("1234_0") and, under "jobs", every submission: the shared job
                                and the arrays with their task -> cell mapping
    studies/{name}/slurm/       the job scripts, the shared job's output (shared-{id}.out), each task's
                                (job-{A}_{i}.out)

Cells that differ in what they ask of Slurm (a grid over hardware.gpus_per_node, say) go in one array per kind; the
max_parallel cap holds within each array.
"""

import contextlib
import os
import shutil
import time
from collections import Counter

from nanochat import rundir
from runners import slurm
from runners.execute import Lock, open_run_record
from runners.study import cell_state, fmt_seconds, merged_record, read_record, study_dir, write_record
from specs.errors import LaunchError

POLL_SECONDS = slurm.POLL_SECONDS


def _slurm_dir(name, home):
    return os.path.join(study_dir(name, home), "slurm")


def _nodes(plan):
    return max(s.nnodes for s in plan.stages)


def _shared(cells):
    """The stages that more than one of `cells` ([(entry, plan, pending stages)]) needs: [(plan, stage)], upstream
    first (a stage shared by two cells has the same upstream keys, so its upstream stages are shared too)."""
    uses = Counter(s.key for _, _, stages in cells for s in stages)
    out, seen = [], set()
    for _, plan, stages in cells:
        for stage in stages:
            if uses[stage.key] > 1 and stage.key not in seen:
                seen.add(stage.key)
                out.append((plan, stage))
    return out


def _groups(cells):
    """Cells grouped by what one array task asks of Slurm (nodes, GPUs or cores, hardware.slurm), in cell order."""
    groups = {}
    for cell in cells:
        plan = cell[1]
        groups.setdefault(tuple(slurm.sbatch_head(plan, _nodes(plan), "", "", ".")), []).append(cell)
    return list(groups.values())


def render_shared(name, shared, home, cwd=None):
    """The job that runs the stages the cells share, once."""
    plan = shared[0][0]
    head = slurm.sbatch_head(plan, max(s.nnodes for _, s in shared), f"nanorun-{name}-shared",
                             os.path.join(_slurm_dir(name, home), "shared-%j.out"), cwd)
    lines = ["#!/bin/bash", f"# nanorun study {name}: the stages its cells share, "
                            f"{', '.join(s.dir_name for _, s in shared)}"]
    lines += [f"#SBATCH {arg}" for arg in head] + slurm.script_prelude(home)
    lines += [slurm.stage_line(p, s, home) for p, s in shared]
    lines.append('echo "@nanorun job $SLURM_JOB_ID end $(now)"')
    return "\n".join(lines) + "\n"


def render_array(name, cells, home, *, max_parallel=None, after=None, cwd=None):
    """The array job: task i runs the stages of cells[i] ([(entry, plan, stages)]) as the single-run job does (a done
    stage is skipped, so a requeued task resumes). `after`: the shared job it waits for."""
    plan = cells[0][1]
    head = slurm.sbatch_head(plan, max(_nodes(p) for _, p, _ in cells), f"nanorun-{name}",
                             os.path.join(_slurm_dir(name, home), "job-%A_%a.out"), cwd)
    head.insert(1, f"--array=0-{len(cells) - 1}" + (f"%{max_parallel}" if max_parallel else ""))
    if after:
        head += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    lines = ["#!/bin/bash", f"# nanorun study {name}: {len(cells)} cells, array task i = the i-th below"]
    lines += [f"#SBATCH {arg}" for arg in head] + slurm.script_prelude(home)
    lines.append('case "${SLURM_ARRAY_TASK_ID:-}" in')
    for i, (entry, plan, stages) in enumerate(cells):
        lines.append(f"{i})  # cell {entry['cell']}: run {plan.run_id}")
        lines += [f"    {slurm.stage_line(plan, s, home)}" for s in stages]
        lines.append("    ;;")
    lines += ['*) echo "array task ${SLURM_ARRAY_TASK_ID:-?} has no cell in this script" >&2; exit 1 ;;', "esac",
              'echo "@nanorun job $SLURM_JOB_ID end $(now)"']
    return "\n".join(lines) + "\n"


def launcher_report(splan, home=None):
    """What `plan STUDY` shows and `plan --json` carries under "launcher": the jobs apply would submit now."""
    home = home or rundir.home()
    record = read_record(splan.name, home) or {}
    recorded = {c["run_id"]: c for c in record.get("cells", [])}
    todo = [(recorded.get(plan.run_id) or {"cell": cell.index + 1}, plan, slurm.pending_stages(plan, home))
            for cell, plan in splan.cells() if cell_state(plan, recorded.get(plan.run_id), home) != "done"]
    shared, jobs = _shared(todo), []
    if shared:
        jobs.append({"kind": "shared", "stages": [s.dir_name for _, s in shared],
                     "script": render_shared(splan.name, shared, home)})
    for group in _groups(todo):
        jobs.append({"kind": "array", "cells": [e["cell"] for e, _, _ in group],
                     "script": render_array(splan.name, group, home, max_parallel=splan.study.spec.sweep.max_parallel,
                                            after="SHARED_JOB_ID" if shared else None)})
    return {"kind": "slurm", "submit": "sbatch --parsable", "jobs": jobs}


# -----------------------------------------------------------------------------
# Submitting


def _submit(splan, record, todo, home, echo, on_update):
    """Submit `todo` ([(entry, plan)]): the shared job when cells share pending stages, then the array(s). Each cell's
    run record and jobs.json get its task; the study record its job id and the submission."""
    name, sdir = splan.name, _slurm_dir(splan.name, home)
    os.makedirs(sdir, exist_ok=True)
    cells = [(entry, plan, slurm.pending_stages(plan, home)) for entry, plan in todo]
    shared = _shared(cells)
    shared_keys = {s.key for _, s in shared}
    with contextlib.ExitStack() as held:
        runs = {}
        for entry, plan, _ in cells:   # every cell's run lock first: nothing is submitted if one is busy
            rdir = rundir.run_dir(plan.run_id, home)
            os.makedirs(rdir, exist_ok=True)
            held.enter_context(Lock(rdir, f"run {plan.run_id} (cell {entry['cell']})"))
            runs[plan.run_id] = open_run_record(plan, home, entry["spec"], echo)
        for entry, plan, stages in cells:
            slurm.write_configs(plan, stages, home)
        stamp, after = int(time.time() * 1000), None

        def refused(group, error):
            """sbatch refused a job: the cells not submitted are recorded as failed, the shared job is cancelled."""
            if after:
                slurm._run(["scancel", after])
            for entry, plan, _ in group:
                runs[plan.run_id].update(status="failed", finished_at=time.time(), error=str(error), apply_pid=None)
                rundir.atomic_write_json(os.path.join(rundir.run_dir(plan.run_id, home), "run.json"),
                                         runs[plan.run_id])
                entry.update(status="failed", error=str(error))
            write_record(record, home)

        if shared:
            script = os.path.join(sdir, f"shared-{stamp}.sh")
            try:
                after = slurm.sbatch(script, render_shared(name, shared, home))
            except LaunchError as e:
                refused(cells, e)
                raise
            record.setdefault("jobs", []).append({
                "kind": "shared", "job_id": after, "stages": [s.dir_name for _, s in shared], "state": "PENDING",
                "script": script, "submitted_at": time.time(), "output": os.path.join(sdir, f"shared-{after}.out")})
            echo(f"[slurm] submitted job {after}: the shared stages {', '.join(s.dir_name for _, s in shared)}")
        cap, groups = splan.study.spec.sweep.max_parallel, _groups(cells)
        for n, group in enumerate(groups):
            script = os.path.join(sdir, f"array-{stamp}-{n}.sh")
            try:
                array = slurm.sbatch(script, render_array(name, group, home, max_parallel=cap, after=after))
            except LaunchError as e:
                refused([c for g in groups[n:] for c in g], e)
                raise
            record.setdefault("jobs", []).append({
                "kind": "array", "job_id": array, "script": script, "max_parallel": cap, "after": after,
                "submitted_at": time.time(), "tasks": [{"index": i, "cell": e["cell"], "run_id": p.run_id}
                                                       for i, (e, p, _) in enumerate(group)]})
            for i, (entry, plan, stages) in enumerate(group):
                job = {"launcher": "slurm", "job_id": f"{array}_{i}", "array_job_id": array, "array_index": i,
                       "study": name, "stages": [s.name for s in stages if s.key not in shared_keys],
                       "script": script, "output": os.path.join(sdir, f"job-{array}_{i}.out"),
                       "submitted_at": time.time(), "state": "PENDING", "reason": "", "restarts": 0,
                       "updated_at": time.time()}
                rdir = rundir.run_dir(plan.run_id, home)
                jobs = rundir.read_jobs(rdir) + [job]
                rundir.write_jobs(rdir, jobs)
                run = runs[plan.run_id]
                for srec in run["stages"]:   # done before this job (by an earlier job or another run)
                    if srec["status"] not in ("success", "cached") and not srec.get("adhoc") and \
                            rundir.stage_state(rundir.locate_stage_dir(srec["dir"], home)) == "done":
                        srec["status"] = "cached"
                run.update(apply_pid=None, requeues=sum(j.get("restarts") or 0 for j in jobs))
                rundir.atomic_write_json(os.path.join(rdir, "run.json"), run)
                entry.update(job_id=job["job_id"], output=job["output"], status="running", started_at=time.time(),
                             finished_at=None, wall_seconds=None, error=None)
                if on_update:
                    on_update(run)
            echo(f"[slurm] submitted array job {array}: {len(group)} cells as tasks 0-{len(group) - 1}"
                 + (f", at most {cap} at once" if cap else "") + (f", after job {after}" if after else "")
                 + f" [script: {script}]")
            for i, (entry, plan, _) in enumerate(group):
                echo(f"[cell {entry['cell']}] task {array}_{i} -> run {plan.run_id}")
        write_record(record, home)


def _record_done(entry, plan, home, echo, on_update):
    """A cell whose every stage is done already (same content keys as other runs): its run, recorded as success."""
    rdir = rundir.run_dir(plan.run_id, home)
    os.makedirs(rdir, exist_ok=True)
    with Lock(rdir, f"run {plan.run_id} (cell {entry['cell']})"):
        run = open_run_record(plan, home, entry["spec"], echo)
        for srec in run["stages"]:
            if srec["status"] != "success" and not srec.get("adhoc"):
                srec["status"] = "cached"
        run.update(status="success", finished_at=time.time(), apply_pid=None)
        rundir.atomic_write_json(os.path.join(rdir, "run.json"), run)
    entry.update(status="success", finished_at=time.time(), error=None)
    if on_update:
        on_update(run)


# -----------------------------------------------------------------------------
# Reading the state back


def _cell_jobs(record, home):
    """{run_id: jobs} of the study's cells that have Slurm jobs."""
    out = {}
    for entry in record.get("cells", []):
        rdir = rundir.run_dir(entry["run_id"], home)
        if os.path.exists(rundir.jobs_path(rdir)):
            try:
                out[entry["run_id"]] = rundir.read_jobs(rdir)
            except rundir.RunDirError:
                continue
    return out


def _live_ids(record, cell_jobs):
    ids = [j["job_id"] for jobs in cell_jobs.values() for j in slurm._live(jobs)]
    ids += [j["job_id"] for j in record.get("jobs", []) if j.get("kind") == "shared" and j.get("state") in
            slurm.ACTIVE]
    return ids


def _settle(entry, run, jobs, plan=None, home=None):
    """The study entry of a cell from its run record once its last job ended; True when it changed."""
    job = jobs[-1]
    if job["state"] in slurm.ACTIVE:
        changed = entry.get("job_id") != job["job_id"] or entry.get("status") != "running"
        entry.update(job_id=job["job_id"], status="running")
        return changed
    status = (run or {}).get("status")
    if status in (None, "running", "pending"):   # another apply holds the run and has not written it yet
        done = plan is not None and cell_state(plan, None, home) == "done"
        status = "success" if done else ("interrupted" if job["state"] in ("CANCELLED", "PREEMPTED") else "failed")
    error = None if status == "success" else ((run or {}).get("error") or f"slurm job {job['job_id']} {job['state']}")
    walls = [s.get("wall_seconds") or 0.0 for s in (run or {}).get("stages", []) if s["stage"] in job["stages"]]
    new = {"job_id": job["job_id"], "status": status, "error": error, "wall_seconds": sum(walls) or None,
           "finished_at": entry.get("finished_at") or time.time()}
    if all(entry.get(k) == v for k, v in new.items() if k != "finished_at"):
        return False
    entry.update(new)
    return True


def _overall(record):
    """The study's status once no cell is in Slurm: success, failed when a cell failed, else interrupted."""
    statuses = {c.get("status") for c in record["cells"]}
    return "success" if statuses <= {"success"} else ("failed" if "failed" in statuses else "interrupted")


def _shared_states(record, states):
    changed = False
    for job in record.get("jobs", []):
        if job.get("kind") == "shared" and job.get("state") in slurm.ACTIVE and job["job_id"] in states:
            state = states[job["job_id"]][0]
            if state != "UNKNOWN" and state != job["state"]:
                job["state"], changed = state, True
    return changed


def refresh_study(name, home=None):
    """Bring a Slurm study's cells up to date (slurm.refresh_run for each cell with a job that may still run, one
    squeue call for all) and write their state into study.json unless an apply holds the study. `study status`,
    `study show` and `plan` call this first; without Slurm tools or an answering controller it does nothing."""
    home = home or rundir.home()
    record = read_record(name, home)
    if not record or record.get("launcher") != "slurm":
        return
    cell_jobs, states, runs = _cell_jobs(record, home), {}, {}
    ids = _live_ids(record, cell_jobs)
    if ids and shutil.which("squeue"):
        try:
            states = slurm.job_states(ids)
        except LaunchError:
            pass
    for run_id, jobs in cell_jobs.items():
        rdir = rundir.run_dir(run_id, home)
        try:
            runs[run_id] = slurm.refresh_run(rdir, home, states) if states and slurm._live(jobs) else \
                (rundir.read_run(rdir), jobs)
        except rundir.RunDirError:
            continue
    if record.get("status") != "running" and all(c.get("status") != "running" for c in record.get("cells", [])):
        return
    lock = Lock(study_dir(name, home), f"study {name}")
    try:
        lock.__enter__()
    except LaunchError:   # an apply follows the study and writes its record
        return
    try:
        record = read_record(name, home)
        changed = _shared_states(record, states)
        for entry in record.get("cells", []):
            run, jobs = runs.get(entry["run_id"], (None, []))
            if jobs:
                changed = _settle(entry, run, jobs) or changed
        if all(c.get("status") not in ("running", "pending") for c in record["cells"]) and \
                record.get("status") == "running":
            record["status"] = _overall(record)
            changed = True
        if changed:
            write_record(record, home)
    finally:
        lock.__exit__(None, None, None)


# -----------------------------------------------------------------------------
# apply STUDY


def apply_study_slurm(splan, *, home=None, echo=print, detach=False, on_update=None, poll=POLL_SECONDS):
    """Submit the study's cells that are not done as a job array (and its shared stages as a job before it), follow
    cells whose tasks an earlier apply submitted and that may still run, and unless `detach` follow every task to its
    end. Returns the study record; LaunchError at the end when cells did not finish (the others ran). Ctrl-C stops
    following, not the jobs (`nanorun cancel STUDY` does that)."""
    from runners.study_apply import _write_cell_spec
    home = home or rundir.home()
    slurm.check_cluster(splan.plans[0], splan.study.path)
    sdir = study_dir(splan.name, home)
    for sub in ("cells", "logs", "slurm"):
        os.makedirs(os.path.join(sdir, sub), exist_ok=True)
    with Lock(sdir, f"study {splan.name}"):
        record = merged_record(splan, home)
        record.update(applies=record["applies"] + 1, status="running", launcher="slurm",
                      apply_pid=None if detach else os.getpid(), apply_host=os.uname().nodename)
        total, plans = len(record["cells"]), {p.run_id: p for p in splan.plans}
        entries = {e["run_id"]: e for e in record["cells"]}
        for cell, plan in splan.cells():
            _write_cell_spec(entries[plan.run_id], cell, splan.study)
        # what Slurm says about jobs earlier applies submitted, written back to the cells' runs first
        cell_jobs = _cell_jobs(record, home)
        states = slurm.job_states(_live_ids(record, cell_jobs))
        _shared_states(record, states)
        following, todo, skipped = {}, [], 0
        for cell, plan in splan.cells():
            entry, rdir = entries[plan.run_id], rundir.run_dir(plan.run_id, home)
            run, jobs = slurm.refresh_run(rdir, home, states, on_update) if plan.run_id in cell_jobs else (None, [])
            if jobs and jobs[-1]["state"] in slurm.ACTIVE:
                entry.update(job_id=jobs[-1]["job_id"], output=jobs[-1].get("output"), status="running")
                following[plan.run_id] = entry
                echo(f"[cell {entry['cell']}/{total}] following task {jobs[-1]['job_id']} ({jobs[-1]['state']}), "
                     f"submitted by an earlier apply")
            elif cell_state(plan, None, home) == "done":
                entry["status"], skipped = "success", skipped + 1
            elif not slurm.pending_stages(plan, home):   # its stages were run for other runs: record it, submit nothing
                _record_done(entry, plan, home, echo, on_update)
                skipped += 1
            else:
                todo.append((entry, plan))
        write_record(record, home)
        if skipped:
            echo(f"[study {splan.name}] {skipped} of {total} cells are done already, skipping them")
        if todo:
            _submit(splan, record, todo, home, echo, on_update)
            following.update({plan.run_id: entry for entry, plan in todo})
        if detach or not following:
            if not following:
                record["status"] = "success"
            record["apply_pid"] = None
            write_record(record, home)
            if following:
                echo(f"[slurm] detached; `nanorun apply {splan.study.path}` follows the cells again, `nanorun study "
                     f"status {splan.name}` shows them, `nanorun cancel {splan.name}` stops them")
            return record
        try:
            _follow(splan, record, following, plans, home, echo, on_update, poll)
        except KeyboardInterrupt:
            record["apply_pid"] = None
            write_record(record, home)
            echo(f"[slurm] stopped following; the jobs keep running (`nanorun cancel {splan.name}` stops them)")
            raise
    failed = [e for e in record["cells"] if e["status"] != "success"]
    if failed:
        cells = ", ".join(str(e["cell"]) for e in failed)
        raise LaunchError(f"study {splan.name}: {len(failed)} of {total} cells did not finish (cell {cells}: "
                          f"{failed[0]['error']}); the other cells ran: `nanorun apply {splan.study.path}` runs "
                          f"only what is missing")
    return record


def _follow(splan, record, following, plans, home, echo, on_update, poll):
    """Poll Slurm for the followed cells' tasks until all ended, writing their runs and the study record."""
    total, last = len(record["cells"]), {}

    def progress():
        by = Counter(e["status"] for e in record["cells"])
        echo(f"[study {splan.name}] {by['success']}/{total} done, {by['running']} in Slurm, "
             f"{by['failed'] + by['interrupted']} failed or cancelled")

    progress()
    while following:
        cell_jobs = {run_id: rundir.read_jobs(rundir.run_dir(run_id, home)) for run_id in following}
        states = slurm.job_states(_live_ids(record, cell_jobs))
        changed = _shared_states(record, states)
        for job in record.get("jobs", []):
            if job.get("kind") == "shared" and last.get(job["job_id"]) != job["state"]:
                last[job["job_id"]] = job["state"]
                echo(f"[slurm] shared job {job['job_id']}: {job['state']}")
        for run_id, entry in list(following.items()):
            run, jobs = slurm.refresh_run(rundir.run_dir(run_id, home), home, states, on_update)
            job = jobs[-1]
            seen = (job["state"], job.get("reason"), job.get("restarts"))
            if last.get(run_id) != seen:
                last[run_id] = seen
                reason = f" ({job['reason']})" if job.get("reason") else ""
                requeues = f", requeued {job['restarts']}x" if job.get("restarts") else ""
                echo(f"[cell {entry['cell']}/{total}] task {job['job_id']}: {job['state']}{reason}{requeues}")
            changed = _settle(entry, run, jobs, plans.get(run_id), home) or changed
            if job["state"] not in slurm.ACTIVE:
                del following[run_id]
                what = f"done in {fmt_seconds(entry['wall_seconds'] or 0)}" if entry["status"] == "success" else \
                    f"{entry['status']}: {entry['error']} (output {job.get('output')})"
                echo(f"[cell {entry['cell']}/{total}] {what} (run {run_id})")
                progress()
        if changed:
            write_record(record, home)
        if following:
            time.sleep(poll)
    record["status"] = _overall(record)
    record["apply_pid"] = None
    write_record(record, home)


def cancel_study_jobs(record, home=None, echo=print):
    """scancel the study's shared job and arrays that may still run; returns the job ids cancelled."""
    home = home or rundir.home()
    cell_jobs = _cell_jobs(record, home)
    states = slurm.job_states(_live_ids(record, cell_jobs))
    live_arrays = {j.get("array_job_id") for jobs in cell_jobs.values() for j in jobs
                   if states.get(j["job_id"], ("",))[0] in slurm.ACTIVE}
    cancelled = []
    for job in record.get("jobs", []):
        active = job["job_id"] in live_arrays if job["kind"] == "array" else \
            states.get(job["job_id"], ("",))[0] in slurm.ACTIVE
        if active:
            code, _, err = slurm._run(["scancel", job["job_id"]])
            if code != 0:
                raise LaunchError(f"scancel {job['job_id']}: {err.strip() or f'exit {code}'}")
            what = f"array of cells {', '.join(str(t['cell']) for t in job['tasks'])}" if job["kind"] == "array" \
                else "shared stages"
            echo(f"cancelled slurm job {job['job_id']} ({what})")
            cancelled.append(job["job_id"])
    return cancelled
