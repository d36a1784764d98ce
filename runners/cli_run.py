"""Spec commands of the nanorun CLI: validate, plan, apply."""

import json
import os
import re
import sys

import click

from runners.cli import main
from specs.errors import NanorunError, SpecError


def _load(spec_path):
    import specs
    return specs.load(spec_path)


def _make_plan(spec_path):
    """make_plan, with a plan-time problem ('NAME: train.device_batch_size: ...') pointed at its line in the spec."""
    from runners.execute import _position
    from runners.plan import make_plan
    spec = _load(spec_path)
    try:
        return make_plan(spec)
    except SpecError as e:
        located = []
        for problem in e.problems:
            m = re.match(rf"{re.escape(spec.name)}: ([a-z_]+(?:\.[a-z_]+)+): (.*)", problem, re.S)
            located.append(f"{_position(spec_path, m.group(1).split('.'))}: {m.group(1)}: {m.group(2)}" if m
                           else problem)
        raise SpecError(located) from None


def _fmt_num(x):
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def plan_report(plan, home=None, spec_path=None, launcher=None):
    """Plan as JSON-able dict plus the state of each stage on disk (done / partial / pending). `launcher`: "local"
    instead of hardware.launcher (apply --launcher local)."""
    from nanochat.rundir import stage_state
    from runners.plan import stage_available
    from runners.slurm import launcher_report
    out = plan.to_json()
    for s, js in zip(plan.stages, out["stages"]):
        js["state"] = stage_state(s.stage_dir(home)) if stage_available(s) else "n/a"
        js["dir"] = s.stage_dir(home)
    launcher = launcher or plan.spec.hardware.launcher
    if launcher == "skypilot":
        from runners import skypilot
        out["launcher"] = skypilot.launcher_report(plan, spec_path)
    else:
        out["launcher"] = launcher_report(plan, home) if launcher != "local" else {"kind": "local", "jobs": []}
    return out


def render_launcher(launcher):
    """The `launcher` lines of `plan`: where the stages run and, for slurm, the job's #SBATCH and stage lines."""
    kind = launcher["kind"]
    if kind == "local":
        return []
    if kind == "skypilot":
        from runners.skypilot import render_lines
        return render_lines(launcher)
    if not launcher["jobs"]:
        return ["", f"launcher {kind}: nothing to submit (all stages done)"]
    lines = ["", f"launcher {kind}: {len(launcher['jobs'])} batch job ({launcher['submit']}; the full script is in "
                 f"plan --json under launcher.jobs)"]
    for job in launcher["jobs"]:
        lines += [f"         {line}" for line in job["script"].splitlines()
                  if line.startswith("#SBATCH") or line.startswith("stage ")]
    return lines


def render_hardware(hw):
    """The device lines of `plan`: what the spec's `auto` fields resolved to on which device, and why."""
    if not hw:
        return []
    dev, dt = hw["device"], hw["dtype"]
    if dev.get("device_type") == "cpu":
        mem = f", {dev['memory_bytes'] / 2**30:.1f} GiB" if dev.get("memory_bytes") else ""
        what = f"cpu {dev.get('name')} ({dev.get('cores')} cores{mem}; flags {' '.join(dev.get('flags') or []) or '-'})"
    else:
        cc = dev.get("compute_capability")
        mem = f", {dev['memory_bytes'] / 2**30:.0f} GiB" if dev.get("memory_bytes") else ""
        what = (f"{dev.get('device_type')} {dev.get('name')} ({'sm_%d%d' % tuple(cc) if cc else 'compute capability unknown'}"
                f"{mem}; {'this machine' if dev.get('source') == 'probed' else 'from the tables, not this machine'})")
    lines = ["", f"device   {what}"]
    peaks = dev.get("matmul_flops") or {}
    if peaks:
        lines.append("         measured matmul " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in peaks.items()) + " GFLOP/s")
    lines.append(f"dtype    {dt['dtype']} ({dt['reason']})")
    if dt.get("warning"):
        lines.append(f"         warning: {dt['warning']}")
    lines.append(f"mfu      peak {hw['peak_flops']:.3g} FLOP/s per device ({hw['peak_source']})" if hw.get("peak_flops")
                 else f"mfu      no peak known ({hw.get('peak_source')}): MFU reads 0")
    return lines


def _fmt_memory(m):
    """'1.1/23.5 GiB' (estimate / capacity per device), '!' when over the margin, '-' for stages without one."""
    if not m:
        return "-"
    cap = m.get("device_capacity_bytes")
    text = f"{m['per_device_bytes'] / 2**30:.1f}/{cap / 2**30:.0f} GiB" if cap else f"{m['per_device_bytes'] / 2**30:.1f} GiB"
    return text + (" !" if m.get("fits") is False else "")


def render_plan(report):
    from runners.plan import fmt_seconds
    lines = [f"run {report['run_id']}  (spec {report['spec_name']}, hash {report['spec_hash'][:12]})"]
    d = report["derived"]
    if d:
        p = d["params"]
        lines += [
            "",
            "model    n_layer={n_layer} n_embd={n_embd} n_head={n_head} head_dim={head_dim} "
            "sequence_len={sequence_len} vocab={vocab_size} (padded {padded_vocab_size})".format(**d),
            "         windows " + ",".join(str(w) for w in d["window_sizes"]),
            "params   " + "  ".join(f"{k}={_fmt_num(v)}" for k, v in p.items()),
            f"         scaling params (transformer_matrices + lm_head) = {_fmt_num(d['scaling_params'])}",
            f"compute  flops/token={d['flops_per_token']:.4g}  total_flops={d['total_flops']:.4g}",
            f"horizon  {d['horizon']}: target_tokens={_fmt_num(d['target_tokens'])} "
            f"num_iterations={_fmt_num(d['num_iterations'])} total_tokens={_fmt_num(d['total_tokens'])} "
            f"(tokens/param {d['tokens_per_param']:.2f})",
            f"batch    total_batch_size={_fmt_num(d['total_batch_size'])} device_batch_size={d['device_batch_size']} "
            f"world_size={d['world_size']} grad_accum_steps={d['grad_accum_steps']}"
            + (f" (device_batch_size {d['device_batch_size_reason']})" if d.get("device_batch_size_reason") else ""),
            f"optim    matrix_lr={d['matrix_lr']:.4g} embedding_lr={d['embedding_lr']:.4g} "
            f"unembedding_lr={d['unembedding_lr']:.4g} scalar_lr={d['scalar_lr']:.4g} "
            f"(batch_lr_scale={d['batch_lr_scale']:.4g}, AdamW dmodel_lr_scale={d['dmodel_lr_scale']:.4g}) "
            f"weight_decay={d['weight_decay_scaled']:.4g}",
        ]
    lines += render_hardware(report.get("hardware") or {})
    lines += render_launcher(report.get("launcher") or {"kind": "local"})
    lines += ["", f"{'stage':<11} {'state':<8} {'procs':<6} {'key':<9} {'estimate':<22} {'memory/device':<16} dir"]
    tight = []
    for s in report["stages"]:
        est = s["estimate"]
        est_s = f"{est['flops']:.3g} FLOPs, {fmt_seconds(est['seconds'])}" if est else "-"
        procs = f"{s['nnodes']}x{s['nproc_per_node']}"
        mem = _fmt_memory(s.get("memory"))
        if (s.get("memory") or {}).get("fits") is False:
            tight.append(s["stage"])
        lines.append(f"{s['stage']:<11} {s['state']:<8} {procs:<6} {s['key'][:8]:<9} {est_s:<22} {mem:<16} {s['dir']}")
    for name in tight:
        m = next(s["memory"] for s in report["stages"] if s["stage"] == name)
        lines.append(f"warning: {name} is estimated at {m['per_device_bytes'] / 2**30:.1f} GiB per device, over "
                     f"{m['margin']:.0%} of {m['device_capacity_bytes'] / 2**30:.1f} GiB: lower its device_batch_size")
    t = report["totals"]
    todo = [s["stage"] for s in report["stages"] if s["state"] != "done"]
    if any(s["state"] == "n/a" for s in report["stages"]):
        lines.append("(n/a: this nanorun has no implementation of that stage yet; apply refuses to start)")
    lines += ["", f"total    {t['flops']:.3g} FLOPs, ~{fmt_seconds(t['seconds'])} of pretraining, ~${t['usd']:.2f}"
                  f" on the spec's hardware (estimate assumes {'CPU' if not t['usd'] else 'GPU'} throughput; "
                  f"real figures land in the registry)",
              "to run:  " + (", ".join(todo) if todo else "nothing (all stages done)")]
    return "\n".join(lines)


@main.command()
@click.argument("spec_path", type=click.Path(dir_okay=False))
def validate(spec_path):
    """Check a spec and list every problem at once (FILE:LINE:COL: field: message); exit 2 if any.

    Example: nanorun validate specs/d12.yaml
    """
    import specs
    problems = specs.validate(spec_path)
    if not problems:
        try:
            from runners.cli_study import validate_study
            # what only the plan can tell (batch divisibility, a device batch that cannot fit): for a study, of every
            # cell (what `plan` and `apply` run; a base value that every cell overrides never runs), else of the spec
            if not validate_study(spec_path):
                _make_plan(spec_path)
        except SpecError as e:
            problems = e.problems
    if problems:
        for p in problems:
            click.echo(p, err=True)
        sys.exit(2)
    click.echo(f"{spec_path}: ok")


@main.command()
@click.argument("spec_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (reference names).")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0 when nothing is left to run, 2 when stages are pending.")
@click.option("--yes", "-y", is_flag=True, help="Plan a study of more than 1,000 cells.")
def plan(spec_path, as_json, detailed_exitcode, yes):
    """Resolve a spec into every number each stage will use, with FLOPs, time and $ estimates and what is done.
    A study (a spec with a `sweep:` block) lists every cell and the totals.

    Example: nanorun plan specs/speedrun_d26.yaml --json
    """
    from runners.cli_study import load_study, plan_study_command
    study = load_study(spec_path, yes)
    if study is not None:
        return plan_study_command(study, as_json, detailed_exitcode)
    from runners.execute import check_device, check_local_data
    plan_ = _make_plan(spec_path)
    remote = plan_.spec.hardware.launcher != "local"   # slurm or skypilot nodes have the spec's devices, not this one
    for check in (check_local_data,) if remote else (check_device, check_local_data):
        try:
            check(plan_, spec_path)
        except SpecError as e:  # the spec may be meant for another machine: plan still shows it
            for p in e.problems:
                click.echo(f"warning: {p} (apply will refuse to start)", err=True)
    warning = plan_.hardware["dtype"].get("warning")
    if warning:
        click.echo(f"warning: train.dtype: {warning}", err=True)
    report = plan_report(plan_, spec_path=spec_path)
    click.echo(json.dumps(report, indent=2) if as_json else render_plan(report))
    if detailed_exitcode and any(s["state"] != "done" for s in report["stages"]):
        sys.exit(2)


def _ingest(record):
    """Record a run in the registry; the run directory stays the source of truth if the DB is busy."""
    try:
        from nanochat import rundir
        from registry import ingest_run
        ingest_run(rundir.run_dir(record["run_id"]))
    except NanorunError as e:
        click.echo(f"warning: registry not updated ({e}); run `nanorun registry rebuild` later", err=True)


@main.command()
@click.argument("spec_path", type=click.Path(dir_okay=False))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--node-rank", default=0, show_default=True, help="This node's rank (multi-node specs).")
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT of node 0 for multi-node torchrun rendezvous.")
@click.option("--quiet", "-q", is_flag=True, help="Do not echo the stages' output (it is still in each stdout.log).")
@click.option("--detach", is_flag=True,
              help="launcher: slurm or skypilot: return once the job is submitted (apply again to follow).")
@click.option("--launcher", "launcher_override", type=click.Choice(["local"]), default=None,
              help="local: run the stages on this machine whatever hardware.launcher says (what a SkyPilot task "
                   "runs on its nodes); the run id stays the same.")
@click.option("--no-registry", is_flag=True,
              help="Leave the DuckDB registry alone (a launcher's nodes on shared storage: `nanorun registry sync` "
                   "ingests the run directory later).")
def apply(spec_path, yes, node_rank, rdzv_endpoint, quiet, detach, launcher_override, no_registry):
    """Show the plan, then run every stage that is not done yet, resuming interrupted ones, and record the run.
    A study (a spec with a `sweep:` block) runs every cell that is not done, side by side where the GPUs allow.
    With `hardware.launcher: slurm` the stages go to Slurm as one batch job, which apply follows (or, with --detach,
    leaves running; a later apply picks it up); with `skypilot` the run goes to rented nodes as one SkyPilot task
    (a managed job with use_spot), followed the same way.

    Example: nanorun apply specs/cpu_demo.yaml --yes
    """
    from runners.cli_study import apply_study_command, load_study
    study = load_study(spec_path, yes)
    if study is not None:
        return apply_study_command(study, yes, node_rank, rdzv_endpoint, detach)
    from runners.execute import apply_plan, check_device, check_local_data, check_node_rank, run_dir
    from specs.errors import LaunchError
    plan_ = _make_plan(spec_path)
    launcher = launcher_override or plan_.spec.hardware.launcher
    if detach and launcher not in ("slurm", "skypilot"):
        from specs.errors import InputError
        raise InputError(f"--detach: only for hardware.launcher: slurm or skypilot (spec {plan_.spec.name} runs "
                         f"{launcher})")
    if launcher == "slurm":
        from runners.slurm import apply_slurm, check_cluster
        check_cluster(plan_, spec_path)  # no sbatch, an unknown partition: one line, exit 2, nothing submitted
    elif launcher == "skypilot":
        from runners.skypilot import apply_skypilot, load_sky
        load_sky()   # SkyPilot not installed: one line, exit 2, nothing launched
    else:
        check_node_rank(plan_, node_rank)   # a rank the spec has no node for: one line, exit 2
        check_device(plan_, spec_path)      # a CUDA spec on a machine without a GPU fails here, before anything runs
    check_local_data(plan_, spec_path)  # a missing data folder fails here, before anything runs
    report = plan_report(plan_, spec_path=spec_path, launcher=launcher)
    click.echo(render_plan(report))
    missing = [s["stage"] for s in report["stages"] if s["state"] == "n/a"]
    if missing:
        raise LaunchError(f"{spec_path}: stage(s) {', '.join(missing)} have no implementation in this nanorun yet; "
                          f"remove them from `stages:` to run the rest")
    if all(s["state"] == "done" for s in report["stages"]):
        click.echo("\nall stages are done; recording the run")
    elif not yes:
        if not sys.stdin.isatty():
            raise SpecError("refusing to apply without confirmation: pass --yes when not on a terminal")
        click.confirm("\napply this plan?", abort=True)
    click.echo("")
    echo = (lambda line: None) if quiet else click.echo
    ingest = None if no_registry else _ingest
    try:
        if launcher == "slurm":
            record = apply_slurm(plan_, spec_path=spec_path, echo=echo, detach=detach, on_update=ingest)
            if detach:
                return
        elif launcher == "skypilot":
            record = apply_skypilot(plan_, spec_path=spec_path, echo=echo, detach=detach, on_update=ingest)
            if detach:
                return
        else:
            record = apply_plan(plan_, spec_path=spec_path, echo=echo, node_rank=node_rank,
                                rdzv_endpoint=rdzv_endpoint, on_update=ingest)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; nothing is lost: `nanorun apply {spec_path}` continues where it stopped", err=True)
        sys.exit(130)
    click.echo("")
    _summary(record, run_dir(plan_))


def _summary(record, rdir):
    click.echo(f"run {record['run_id']}: {record['status']}")
    from nanochat import rundir
    for s in record["stages"]:
        metrics = rundir.result_metrics(rundir.read_result(s["dir"]))
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        brief = " ".join(f"{k}={_fmt_num(v)}" for k, v in list(shown.items())[:6])
        click.echo(f"  {s['stage']:<11} {s['status']:<8} {s['dir']}  {brief}")
    click.echo(f"run record: {os.path.join(rdir, 'run.json')}")
    click.echo("next: nanorun show " + record["run_id"] + " | nanorun leaderboard | nanorun tui")


@main.command()
@click.argument("run")
def cancel(run):
    """Cancel what is queued or running for a run: its Slurm jobs (scancel), or the local apply running it (it
    records the run as interrupted; apply again to resume). RUN is a run id, a unique prefix or a spec name; or a
    study's name: its Slurm job arrays, or the local apply running its cells.

    Example: nanorun cancel tiny_apply
    """
    from runners.study import read_record
    if read_record(run) is not None:
        from runners.study_apply import cancel_study
        return cancel_study(run, echo=click.echo)
    from runners.execute import cancel_run
    cancel_run(run, echo=click.echo)
