"""
`nanorun apply STUDY`: run a study's cells with a scheduler. Each cell is an ordinary `nanorun apply` of the cell's
spec (written to studies/{name}/cells/{run_id}.yaml) in a child process, its output in studies/{name}/logs/.

- On a node with G GPUs, cells that need fewer GPUs (sweep.gpus_per_cell) run side by side on disjoint GPUs
  (CUDA_VISIBLE_DEVICES); on CPU one at a time.
- A stage shared by several cells (data, tok_train: same content key) is run by one cell; the others wait for its
  result.json, then reuse it, instead of failing on its lock.
- A failed cell is reported and the others go on; a killed apply (Ctrl-C, SIGTERM, SIGKILL) stops its cells, and
  applying again skips the cells that are done and resumes the rest; cells added to the grid later are the only ones
  that run.

    from runners.study_apply import apply_study
    apply_study(plan_study(specs.read_study(path)), echo=print)
"""

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

from nanochat import rundir
from runners.execute import Lock, _alive, _die_with_parent_fn, _interrupt_on_sigterm
from runners.study import cell_state, fmt_seconds, merged_record, read_record, study_dir, write_record
from specs import dump_yaml
from specs.errors import LaunchError, SpecError

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 300   # a progress line at least this often while cells run


def device_groups(spec, environ=None):
    """The device sets cells run on, one cell per set: [None] on CPU and MPS (one cell at a time, every core);
    on GPUs, disjoint groups of sweep.gpus_per_cell ids from CUDA_VISIBLE_DEVICES (else 0..gpus_per_node-1),
    at most sweep.max_parallel of them."""
    environ = os.environ if environ is None else environ
    hw, sweep = spec.hardware, spec.sweep
    if hw.gpu.lower() == "cpu" or hw.device_type in ("cpu", "mps"):
        return [None]
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(hw.gpus_per_node)]
    per = sweep.gpus_per_cell or hw.gpus_per_node
    groups = [ids[i:i + per] for i in range(0, len(ids) - per + 1, per)]
    if not groups:
        raise SpecError(f"{spec.name}: sweep.gpus_per_cell: a cell needs {per} GPUs and CUDA_VISIBLE_DEVICES "
                        f"leaves {len(ids)} ({visible})")
    return groups[:sweep.max_parallel] if sweep.max_parallel else groups


def _open_keys(plan, home):
    """Content keys of the cell's stages whose output does not exist yet."""
    return {s.key for s in plan.stages if rundir.stage_state(s.stage_dir(home)) != "done"}


def _last_error(log_path):
    """The child apply's one-line error ('error: ...' is how the CLI reports a failure), else None."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.startswith("error: ")]
    except OSError:
        return None
    return lines[-1][len("error: "):] if lines else None


def _write_cell_spec(entry, cell, study):
    text = (f"# cell {entry['cell']} of study {study.name} ({os.path.abspath(study.path)}): "
            f"{cell.label}\n# written by `nanorun apply`; `nanorun apply` of this file is the cell's run\n"
            + dump_yaml(cell.spec))
    try:
        with open(entry["spec"]) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    rundir.atomic_write_bytes(entry["spec"], text.encode())


def next_cells(todo, free, busy, open_keys):
    """Which pending cells start now, on which free device group: in order, one per free group, skipping a cell
    that needs a stage (content key) a running cell has not finished yet: it reuses that stage once it is done
    instead of failing on its lock. busy: the open keys of each running cell; open_keys(cell): a cell's open keys."""
    taken, out = set().union(*busy), []
    free = list(free)
    for item in todo:
        if not free:
            break
        keys = open_keys(item)
        if keys & taken:
            continue
        out.append((item, free.pop(0)))
        taken |= keys
    return out


@dataclass
class _Running:
    entry: dict
    plan: object
    proc: subprocess.Popen
    devices: object
    t0: float


def apply_study(splan, *, home=None, echo=print, poll=POLL_SECONDS):
    """Run every cell of the study that is not done. Returns the study record. Raises LaunchError when another
    apply runs this study, or at the end when cells failed (the others ran); KeyboardInterrupt (also on SIGTERM)
    after stopping the running cells and recording them as interrupted."""
    home = home or rundir.home()
    groups = device_groups(splan.study.spec)
    sdir = study_dir(splan.name, home)
    for sub in ("cells", "logs"):
        os.makedirs(os.path.join(sdir, sub), exist_ok=True)
    old_handler = _interrupt_on_sigterm()
    try:
        with Lock(sdir, f"study {splan.name}"):
            return _apply_locked(splan, home, groups, echo, poll)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _apply_locked(splan, home, groups, echo, poll):
    record = merged_record(splan, home)
    record.update(applies=record["applies"] + 1, status="running", apply_pid=os.getpid(), apply_host=os.uname().nodename)
    entries = {e["run_id"]: e for e in record["cells"]}
    total, todo, skipped = len(record["cells"]), deque(), 0
    for cell, plan in splan.cells():
        entry = entries[plan.run_id]
        _write_cell_spec(entry, cell, splan.study)
        if cell_state(plan, None, home) == "done":
            entry["status"], skipped = "success", skipped + 1
        else:
            todo.append((cell, plan, entry))
    write_record(record, home)
    if skipped:
        echo(f"[study {splan.name}] {skipped} of {total} cells are done already, skipping them")

    running, failed, finished = [], [], []   # finished: (estimate, wall) of cells run by this apply
    last_progress = [0.0]

    def eta():
        """Seconds left: the plan's estimates, scaled by how the cells this apply finished compare with theirs (or
        their mean wall time when the estimates are far too small to scale, e.g. tiny CPU cells), per device group."""
        walls, ests = [w for _, w in finished], [e for e, _ in finished]
        if finished and sum(ests) > 0.2 * sum(walls):
            def per_cell(e): return sum(walls) / sum(ests) * (e.get("estimate_seconds") or 0.0)
        elif finished:
            def per_cell(e): return sum(walls) / len(walls)
        else:
            def per_cell(e): return e.get("estimate_seconds") or 0.0
        left = sum(per_cell(entry) for _, _, entry in todo)
        left += sum(max(0.0, per_cell(r.entry) - (time.time() - r.t0)) for r in running)
        return left / len(groups)

    def progress():
        done = sum(e["status"] == "success" for e in record["cells"])
        left = eta()
        echo(f"[study {splan.name}] {done}/{total} done, {len(running)} running, {len(failed)} failed, "
             f"{len(todo)} pending" + (f"; ETA ~{fmt_seconds(left)}" if left >= 1 and (todo or running) else ""))
        last_progress[0] = time.time()

    def start(cell, plan, entry, devices):
        log_path = entry["log"]
        cmd = [sys.executable, "-m", "runners", "apply", entry["spec"], "--yes"]
        env = dict(os.environ, NANORUN_HOME=home, PYTHONUNBUFFERED="1")
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent_fn())
        entry.update(status="running", started_at=time.time(), finished_at=None, wall_seconds=None, error=None)
        write_record(record, home)
        gpus = f" on GPU {','.join(devices)}" if devices else ""
        echo(f"[cell {entry['cell']}/{total}] starting {cell.label} -> run {plan.run_id}{gpus} (log {log_path})")
        running.append(_Running(entry=entry, plan=plan, proc=proc, devices=devices, t0=time.time()))

    def reap(r, code):
        wall = time.time() - r.t0
        running.remove(r)
        if code == 0:
            r.entry.update(status="success", finished_at=time.time(), wall_seconds=wall, error=None)
            finished.append((r.entry.get("estimate_seconds") or 0.0, wall))
            echo(f"[cell {r.entry['cell']}/{total}] done in {fmt_seconds(wall)} (run {r.plan.run_id})")
        else:
            err = _last_error(r.entry["log"]) or f"exit code {code}"
            r.entry.update(status="failed", finished_at=time.time(), wall_seconds=wall, error=err)
            failed.append(r.entry)
            echo(f"[cell {r.entry['cell']}/{total}] failed (exit {code}): {err} (cell log {r.entry['log']})")
        write_record(record, home)
        progress()

    try:
        progress()
        while todo or running:
            free = [g for g in groups if all(g is not r.devices for r in running)]
            busy = [_open_keys(r.plan, home) for r in running]
            chosen = next_cells(todo, free, busy, lambda item: _open_keys(item[1], home))
            for item, devices in chosen:
                todo.remove(item)
                start(*item, devices)
            if chosen:
                progress()
            time.sleep(poll)
            for r in list(running):
                code = r.proc.poll()
                if code is not None:
                    reap(r, code)
            if running and time.time() - last_progress[0] > HEARTBEAT_SECONDS:
                progress()
    except KeyboardInterrupt:
        _stop(running)
        for r in running:
            r.entry.update(status="interrupted", finished_at=time.time(), wall_seconds=time.time() - r.t0)
            echo(f"[cell {r.entry['cell']}/{total}] interrupted (run {r.plan.run_id})")
        record["status"] = "interrupted"
        write_record(record, home)
        raise
    record["status"] = "failed" if failed else "success"
    write_record(record, home)
    if failed:
        cells = ", ".join(str(e["cell"]) for e in failed)
        raise LaunchError(f"study {splan.name}: {len(failed)} of {total} cells failed (cell {cells}: "
                          f"{failed[0]['error']}); the other cells ran: `nanorun plan {splan.study.path}` lists them")
    return record


def _stop(running, timeout=60.0):
    """SIGTERM each running cell's apply (it records its run as interrupted and stops its stage), then wait."""
    for r in running:
        try:
            os.killpg(r.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    for r in running:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()


def cancel_study(name, home=None, echo=print, timeout=60.0):
    """`nanorun cancel STUDY`: scancel its Slurm jobs that may still run (launcher: slurm), or SIGTERM the local apply
    running its cells on this host (it stops them and records them as interrupted). Returns what was stopped."""
    record = read_record(name, home)
    if record.get("launcher") == "slurm":
        from runners.slurm_study import cancel_study_jobs
        stopped = cancel_study_jobs(record, home, echo)
        if stopped:
            echo(f"study {name}: cancelled; `nanorun apply {record.get('spec_path')}` runs what is missing")
    else:
        pid, host, stopped = record.get("apply_pid"), record.get("apply_host"), []
        if record.get("status") == "running" and isinstance(pid, int) and pid > 0 and _alive(pid):
            if host and host != os.uname().nodename:
                raise LaunchError(f"study {name} is being applied on host {host} (pid {pid}); stop it there")
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + timeout
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            echo(f"study {name}: stopped its apply (pid {pid}); `nanorun apply {record.get('spec_path')}` resumes it")
            stopped = [pid]
    if not stopped:
        echo(f"study {name}: nothing is queued or running")
    return stopped
