"""
Studies, planned: every cell of a sweep spec (specs.sweep) resolved by the single-spec planner, the cells' state
on disk, the study record, and the `nanorun plan STUDY` report. The scheduler that runs the cells is
runners/study_apply.py.

    $NANORUN_HOME/studies/{name}/
      study.json            the study record: its grid and its cells (run id, overrides, status), updated by apply
      cells/{run_id}.yaml   each cell's spec as applied (`nanorun apply` of that file is the cell's run)
      logs/{run_id}.log     each cell's apply output

    from runners.study import plan_study, study_report
    report = study_report(plan_study(specs.read_study("specs/scaling_laws.yaml")))
"""

import os
import re
import time
from dataclasses import dataclass

from nanochat import rundir
from runners.plan import fmt_seconds, make_plan
from specs import dump_yaml, spec_hash
from specs.errors import SpecError
from specs.sweep import entry_name, show, split_path, which_cells

CELL_STATES = ("done", "running", "failed", "interrupted", "missing", "partial", "pending")


@dataclass(frozen=True)
class StudyPlan:
    study: object          # specs.Study
    plans: tuple           # one runners.plan.Plan per cell, in cell order

    @property
    def name(self):
        return self.study.name

    def cells(self):
        return zip(self.study.cells, self.plans)


# --- planning ---------------------------------------------------------------------------------------

def _culprit(field, overrides):
    """The override a plan-time problem about `field` (e.g. train.device_batch_size) is most likely about."""
    parts = split_path(field)
    best, best_score = next(iter(overrides)), -1
    for path in overrides:
        common = 0
        for a, b in zip(split_path(path), parts):
            if a != b:
                break
            common += 1
        if common > best_score:
            best, best_score = path, common
    return best


def plan_study(study, caps=None):
    """Plan every cell with runners.plan.make_plan. A cell that cannot be planned (a batch that does not divide, a
    model that cannot fit) is reported at its sweep value; SpecError lists every problem of every cell."""
    from runners.execute import _position
    from runners.plan import device_caps
    plans, failures, probed = [], {}, {}
    for cell in study.cells:
        hw = cell.spec.hardware
        where = (hw.gpu, hw.device_type, cell.spec.train.dtype)   # what device_caps depends on; probed once each
        try:
            if caps is None and where not in probed:
                probed[where] = device_caps(cell.spec)
            plans.append(make_plan(cell.spec, caps if caps is not None else probed[where]))
        except SpecError as e:
            for problem in e.problems:
                m = re.match(rf"{re.escape(cell.spec.name)}: ([a-z_]+(?:\.[a-z_0-9]+)*): (.*)", problem, re.S)
                field, message = (m.group(1), m.group(2)) if m else ("", problem)
                if cell.overrides:
                    culprit = _culprit(field, cell.overrides)
                    where, head = cell.positions[culprit], f"{entry_name(culprit, study.spec.sweep)}: "
                else:
                    where, head = _position(study.path, split_path(field)) if field else study.path, ""
                failures.setdefault((where, f"{head}{field + ': ' if field else ''}{message}"), []).append(cell)
    if failures:
        n = len(study.cells)
        raise SpecError([f"{where}: {message} ({which_cells(bad, n)})" for (where, message), bad in failures.items()])
    return StudyPlan(study=study, plans=tuple(plans))


def preflight(splan, devices=True):
    """What `apply` checks before anything runs, for every cell: the device exists here (unless not `devices`: the
    cells run on a cluster's nodes) and local data paths exist (runners.execute). SpecError with each distinct
    problem once."""
    from runners.execute import check_device, check_local_data
    problems, seen = [], set()
    checks = ((check_device, lambda plan: repr(plan.spec.hardware)),) if devices else ()
    checks += ((check_local_data, lambda plan: plan.stages[0].key),)
    for cell, plan in splan.cells():
        for check, key in ((check, what(plan)) for check, what in checks):
            if (check, key) in seen:   # cells with the same hardware / the same data stage: checked once
                continue
            seen.add((check, key))
            try:
                check(plan, splan.study.path)
            except SpecError as e:
                problems += [p for p in e.problems if p not in problems]
    if problems:
        raise SpecError(problems)


# --- the record and the cells' state on disk ----------------------------------------------------------

def study_dir(name, home=None):
    return rundir.study_dir(name, home)


def read_record(name, home=None):
    """The study record, or None before the study's first apply."""
    return rundir.read_json(os.path.join(study_dir(name, home), "study.json"), default=None)


def write_record(record, home=None):
    record["updated_at"] = time.time()
    rundir.atomic_write_json(os.path.join(study_dir(record["study"], home), "study.json"), record)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, OverflowError):
        return True
    return True


def _run_status(run_id, home):
    """The status in runs/{run_id}/run.json ('running' only while its apply lives), or None without one."""
    directory = rundir.run_dir(run_id, home)
    if not os.path.isfile(os.path.join(directory, "run.json")):
        return None
    try:
        run = rundir.read_run(directory)
    except rundir.RunDirError:
        return "failed"
    status = run.get("status") or "pending"
    if status == "running" and not (run.get("apply_host") in (None, os.uname().nodename)
                                    and isinstance(run.get("apply_pid"), int) and _pid_alive(run["apply_pid"])) \
            and not _in_slurm(directory):
        status = "interrupted"   # killed without a chance to record it
    return status


def _in_slurm(directory):
    """True when the run's last Slurm job is recorded as queued or running (its stages run without an apply)."""
    from runners.slurm import ACTIVE
    try:
        jobs = rundir.read_jobs(directory)
    except rundir.RunDirError:
        return False
    return bool(jobs) and jobs[-1].get("state") in ACTIVE


def cell_state(plan, recorded=None, home=None):
    """done | running | failed | interrupted | missing | partial | pending. done = every stage's output exists and
    the run is recorded; missing = the study record says it finished, but its run or an output was deleted since
    (apply runs it again)."""
    stages = [rundir.stage_state(s.stage_dir(home)) for s in plan.stages]
    status = _run_status(plan.run_id, home)
    if all(s == "done" for s in stages) and status == "success":
        return "done"
    if (recorded or {}).get("status") == "success":
        return "missing"
    if status in ("running", "failed", "interrupted"):
        return status
    return "partial" if "partial" in stages else "pending"


def new_cell_entry(study_name, cell, plan, home=None):
    return {"cell": cell.index + 1, "run_id": plan.run_id, "name": cell.spec.name, "overrides": cell.overrides,
            "spec": os.path.join(study_dir(study_name, home), "cells", f"{plan.run_id}.yaml"),
            "log": os.path.join(study_dir(study_name, home), "logs", f"{plan.run_id}.log"), "status": "pending", "started_at": None, "finished_at": None, "wall_seconds": None, "error": None,
            "estimate_seconds": plan.to_json()["totals"]["seconds"]}


def merged_record(splan, home=None):
    """The study record for this expansion: current cells in grid order (their history kept by run id); cells of
    an earlier grid that are not in this one move to `retired`, so nothing recorded is lost."""
    study = splan.study
    old = read_record(study.name, home) or {}
    by_run = {c["run_id"]: c for c in old.get("cells", []) + old.get("retired", [])}
    cells = []
    for cell, plan in splan.cells():
        history = {k: v for k, v in by_run.get(plan.run_id, {}).items()
                   if k in ("status", "started_at", "finished_at", "wall_seconds", "error", "job_id", "output")}
        cells.append({**new_cell_entry(study.name, cell, plan, home), **history})
    current = {c["run_id"] for c in cells}
    retired = [c for c in by_run.values() if c["run_id"] not in current]
    sweep = study.spec.sweep
    return {"study": study.name, "spec_path": os.path.abspath(study.path), "spec_hash": spec_hash(study.spec),
            "spec_yaml": dump_yaml(study.spec), "grid": sweep.grid, "seeds": sweep.seeds,
            "gpus_per_cell": sweep.gpus_per_cell, "max_parallel": sweep.max_parallel,
            "created_at": old.get("created_at") or time.time(), "updated_at": None,
            "applies": old.get("applies", 0), "status": old.get("status", "pending"),
            "launcher": study.spec.hardware.launcher, "jobs": old.get("jobs", []), "cells": cells, "retired": retired}


# --- the report -------------------------------------------------------------------------------------

def _derived(plan):
    d = plan.derived
    if not d:
        return {}
    return {"depth": d["n_layer"], "n_embd": d["n_embd"], "n_head": d["n_head"], "params": d["params"]["total"],
            "scaling_params": d["scaling_params"], "tokens": d["total_tokens"], "tokens_per_param": d["tokens_per_param"],
            "total_batch_size": d["total_batch_size"], "device_batch_size": d["device_batch_size"],
            "num_iterations": d["num_iterations"], "horizon": d["horizon"], "matrix_lr": d["matrix_lr"],
            "embedding_lr": d["embedding_lr"], "unembedding_lr": d["unembedding_lr"],
            "weight_decay": d["weight_decay_scaled"], "flops_per_token": d["flops_per_token"], "flops": d["total_flops"]}


def parallel_cells(spec, n_cells=1):
    """How many cells run at once on the spec's node: GPUs per node // GPUs per cell, capped by max_parallel;
    one on CPU and MPS (a cell already uses every core). On Slurm: max_parallel, else every cell (the cluster
    decides)."""
    hw, sweep = spec.hardware, spec.sweep
    if hw.launcher == "slurm":
        return max(1, min(n_cells, sweep.max_parallel or n_cells))
    if hw.gpu.lower() == "cpu" or hw.device_type in ("cpu", "mps"):
        return 1
    n = hw.gpus_per_node // (sweep.gpus_per_cell or hw.gpus_per_node)
    return max(1, min(n, sweep.max_parallel or n))


def study_report(splan, home=None):
    """The JSON of `nanorun plan STUDY`: {"study", "cells": [{"cell", "run_id", "overrides", "derived", "estimate",
    "state", "stages"}], "shared_stages", "totals"}."""
    study, record = splan.study, read_record(splan.name, home) or {}
    recorded = {c["run_id"]: c for c in record.get("cells", []) + record.get("retired", [])}
    cells, users = [], {}
    for cell, plan in splan.cells():
        js = plan.to_json()
        state = cell_state(plan, recorded.get(plan.run_id), home)
        for s in plan.stages:
            users.setdefault((s.name, s.key), []).append(cell.index + 1)
        cells.append({"cell": cell.index + 1, "run_id": plan.run_id, "name": cell.spec.name, "label": cell.label,
                      "overrides": cell.overrides, "derived": _derived(plan), "estimate": js["totals"], "state": state,
                      "error": (recorded.get(plan.run_id) or {}).get("error") if state == "failed" else None,
                      "stages": [{"stage": s.name, "key": s.key, "dir_name": s.dir_name,
                                  "state": rundir.stage_state(s.stage_dir(home))} for s in plan.stages]})
    sweep, parallel = study.spec.sweep, parallel_cells(study.spec, len(cells))
    left = [c for c in cells if c["state"] != "done"]
    seconds = sum(c["estimate"]["seconds"] for c in cells)
    remaining = sum(c["estimate"]["seconds"] for c in left)
    shared = [{"stage": name, "key": key, "dir_name": rundir.stage_dir_name(name, key), "cells": len(who)}
              for (name, key), who in users.items() if len(who) > 1]
    return {
        "study": study.name, "spec_path": study.path, "spec_hash": spec_hash(study.spec),
        "grid": sweep.grid, "seeds": sweep.seeds, "gpus_per_cell": sweep.gpus_per_cell or study.spec.hardware.gpus_per_node,
        "parallel": parallel, "hardware": {"gpu": study.spec.hardware.gpu, "gpus_per_node": study.spec.hardware.gpus_per_node},
        "cells": cells, "shared_stages": shared, "launcher": _launcher(splan, home),
        "retired": [c["run_id"] for c in record.get("retired", [])],
        "totals": {"cells": len(cells), "flops": sum(c["estimate"]["flops"] for c in cells), "seconds": seconds,
                   "wall_seconds": seconds / parallel, "usd": sum(c["estimate"]["usd"] for c in cells),
                   "remaining_seconds": remaining, "remaining_wall_seconds": remaining / parallel,
                   "states": {s: n for s in CELL_STATES if (n := sum(c["state"] == s for c in cells))}},
    }




def _launcher(splan, home):
    if splan.study.spec.hardware.launcher != "slurm":
        return {"kind": splan.study.spec.hardware.launcher, "jobs": []}
    from runners.slurm_study import launcher_report
    return launcher_report(splan, home)


def _ranges(numbers):
    """'1-3, 5' for [1, 2, 3, 5]."""
    spans = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _short(x):
    if x >= 1e9:
        return f"{x / 1e9:.2f}B"
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}K"
    return str(x)


def render_study(report):
    """The text of `nanorun plan STUDY`: one row per cell, then the totals."""
    t, n = report["totals"], report["totals"]["cells"]
    dims = " x ".join(f"{len(v)} {p}" for p, v in report["grid"].items()) or "no grid"
    seeds = f" x {report['seeds']} seed{'s' if report['seeds'] != 1 else ''}" if report["seeds"] else ""
    hw = report["hardware"]
    where = "CPU, one cell at a time" if report["parallel"] == 1 and hw["gpu"].lower() == "cpu" else \
        f"{report['gpus_per_cell']} of {hw['gpus_per_node']} {hw['gpu']} per cell, {report['parallel']} at a time"
    launcher = report.get("launcher") or {"kind": "local"}
    if launcher["kind"] == "slurm":
        where = f"a Slurm job array, up to {report['parallel']} at a time"
    lines = [f"study {report['study']}  ({report['spec_path']}: {n} cells = {dims}{seeds}; {where})", ""]
    head = f"{'#':>3}  {'state':<11} {'depth':>5} {'width':>5} {'params':>7} {'tokens':>7} {'tok/p':>6} {'batch':>6} " \
           f"{'iters':>6} {'lr':>7} {'FLOPs':>8} {'time':>8} {'$':>8}  overrides -> run"
    lines.append(head)
    for c in report["cells"]:
        d, e = c["derived"], c["estimate"]
        state = c["state"] + ("!" if c["state"] == "missing" else "")
        if d:
            nums = (f"{d['depth']:>5} {d['n_embd']:>5} {_short(d['params']):>7} {_short(d['tokens']):>7} "
                    f"{d['tokens_per_param']:>6.1f} {_short(d['total_batch_size']):>6} {d['num_iterations']:>6} "
                    f"{d['matrix_lr']:>7.4f}")
        else:
            nums = f"{'-':>5} {'-':>5} {'-':>7} {'-':>7} {'-':>6} {'-':>6} {'-':>6} {'-':>7}"
        lines.append(f"{c['cell']:>3}  {state:<11} {nums} {e['flops']:>8.3g} {fmt_seconds(e['seconds']):>8} "
                     f"{e['usd']:>8.2f}  {c['label']} -> {c['run_id']}")
        if c.get("error"):
            lines.append(f"{'':>5}error: {c['error']}")
    for job in launcher.get("jobs", []):
        what = f"the shared stages {', '.join(job['stages'])}" if job["kind"] == "shared" else \
            f"an array of cells {_ranges(job['cells'])}"
        args = [line.split(" ", 1)[1] for line in job["script"].splitlines() if line.startswith("#SBATCH ")]
        lines += ["", f"slurm    {what}: sbatch {' '.join(args)}"]
    if launcher.get("jobs"):
        lines.append("         (the job scripts are in plan --json under launcher.jobs)")
    if report["shared_stages"]:
        lines += ["", "shared   " + ", ".join(f"{s['dir_name']} ({s['cells']} cells)" for s in report["shared_stages"])
                  + ": run once"]
    if any(c["state"] == "missing" for c in report["cells"]):
        lines.append("missing! = an earlier apply finished it, but its run record or a stage output of this plan is not "
                     "on disk (deleted, or planned differently here); apply runs it again")
    states = ", ".join(f"{k} {v}" for k, v in t["states"].items())
    lines += ["", f"total    {n} cells ({states}): {t['flops']:.3g} FLOPs, ~{fmt_seconds(t['seconds'])} of pretraining"
                  f" (~{fmt_seconds(t['wall_seconds'])} wall at {report['parallel']} at a time), ~${t['usd']:.2f}",
              f"to run:  {n - t['states'].get('done', 0)} cells, ~{fmt_seconds(t['remaining_wall_seconds'])} wall"]
    if report["retired"]:
        lines.append(f"retired: {len(report['retired'])} cells of an earlier grid (kept in the study record)")
    return "\n".join(lines)


# --- the study as its record lists it (no spec needed) -----------------------------------------------

list_studies = rundir.study_names


def recorded_state(entry, home=None):
    """A recorded cell's state from its run directory: the run's status, or missing when the record says the cell
    ran but its run directory or a stage output it lists is gone."""
    directory = rundir.run_dir(entry["run_id"], home)
    if not os.path.isfile(os.path.join(directory, "run.json")):
        return "missing" if entry.get("status") not in (None, "pending") else "pending"
    status = _run_status(entry["run_id"], home)
    if status == "success":
        try:
            stages = rundir.read_run(directory).get("stages") or []
        except rundir.RunDirError:
            return "failed"
        if any(rundir.stage_state(rundir.locate_stage_dir(s.get("dir"), home)) != "done" for s in stages
               if s.get("dir") and not s.get("adhoc")):
            return "missing"
        return "done"
    return status or "pending"


def study_status(name, home=None):
    """{"study", "spec_path", "cells": [{"cell", "run_id", "overrides", "state", "error"}], "states"} from the study
    record alone; RunDirError when there is no such study."""
    record = read_record(name, home)
    if record is None:
        known = list_studies(home)
        raise rundir.RunDirError(f"no study {name!r} under {os.path.join(home or rundir.home(), 'studies')}"
                                 + (f" (known: {', '.join(known)})" if known else " (apply a spec with a sweep "
                                                                                  "block first)"))
    cells = [{"cell": c.get("cell"), "run_id": c["run_id"], "overrides": c.get("overrides", {}),
              "state": recorded_state(c, home), "error": c.get("error"), "wall_seconds": c.get("wall_seconds"),
              "job": _last_job(c["run_id"], home)}
             for c in record.get("cells", [])]
    states = {s: n for s in CELL_STATES if (n := sum(c["state"] == s for c in cells))}
    return {"study": record["study"], "spec_path": record.get("spec_path"), "status": record.get("status"),
            "updated_at": record.get("updated_at"), "cells": cells, "states": states,
            "launcher": record.get("launcher", "local"), "jobs": record.get("jobs", []),
            "retired": [c["run_id"] for c in record.get("retired", [])]}


def _last_job(run_id, home=None):
    """{"job_id", "state", "restarts"} of the cell's last Slurm job (an array task: ARRAY_TASK), None without one."""
    try:
        jobs = rundir.read_jobs(rundir.run_dir(run_id, home))
    except rundir.RunDirError:
        return None
    return {k: jobs[-1].get(k) for k in ("job_id", "state", "reason", "restarts")} if jobs else None


def render_status(status):
    lines = [f"study {status['study']}  ({status['spec_path']}; last apply: {status['status']})", ""]
    for c in status["cells"]:
        label = " ".join(f"{k}={show(v)}" for k, v in c["overrides"].items()) or "(base)"
        mark = "!" if c["state"] == "missing" else ""
        job, slurm = c.get("job"), ""
        if job:
            requeues = f", requeued {job['restarts']}x" if job.get("restarts") else ""
            slurm = f"  [slurm {job['job_id']} {job['state']}{requeues}]"
        lines.append(f"{c['cell']:>3}  {c['state'] + mark:<12} {label} -> {c['run_id']}{slurm}")
        if c["state"] == "failed" and c.get("error"):
            lines.append(f"{'':>5}error: {c['error']}")
    states = ", ".join(f"{k} {v}" for k, v in status["states"].items())
    lines += ["", f"{len(status['cells'])} cells: {states}"]
    if "missing" in status["states"]:
        lines.append("missing! = its run directory or a stage output was deleted; `nanorun apply` of the study "
                     "runs it again")
    return "\n".join(lines)
