"""
Study commands of the nanorun CLI. `nanorun plan` and `nanorun apply` hand a spec with a `sweep:` block here
(cli_run); `nanorun study status NAME` lists a study's cells from its record, even when the spec has changed.

    nanorun plan specs/scaling_laws.yaml [--json]
    nanorun apply specs/scaling_laws.yaml --yes
    nanorun study status scaling_laws [--json]
    nanorun study show scaling_laws [--params scaling|all|matrices] [--json] [--no-plots]
    nanorun study predict scaling_laws --flops 1e20 [--json]
"""

import json
import sys

import click

from runners.cli import main
from specs.errors import SpecError


def load_study(spec_path, yes=False):
    """The Study in `spec_path`, or None for a plain spec. Over specs.MAX_CELLS cells needs --yes (exit 2 without)."""
    import specs
    return specs.read_study(spec_path, max_cells=None if yes else specs.MAX_CELLS)


def plan_study_command(study, as_json, detailed_exitcode):
    """`nanorun plan STUDY`: every cell, its derived numbers and estimates, and the totals."""
    from runners.slurm_study import refresh_study
    from runners.study import plan_study, preflight, render_study, study_report
    splan = plan_study(study)
    refresh_study(study.name)   # cells on Slurm: their jobs' state, written back
    try:
        preflight(splan, devices=study.spec.hardware.launcher != "slurm")
    except SpecError as e:   # the study may be meant for another machine: plan still shows it
        for p in e.problems:
            click.echo(f"warning: {p} (apply will refuse to start)", err=True)
    report = study_report(splan)
    click.echo(json.dumps(report, indent=2) if as_json else render_study(report))
    if detailed_exitcode and any(c["state"] != "done" for c in report["cells"]):
        sys.exit(2)


def validate_study(spec_path):
    """Plan-time problems of a study's cells (a batch that does not divide, a model that cannot fit), as SpecError.
    Returns whether `spec_path` is a study (False: a plain spec, for the caller to plan); a study too large to plan
    here is not planned (`plan --yes` plans it)."""
    import specs
    from runners.study import plan_study
    try:
        study = specs.read_study(spec_path)
    except SpecError:
        return True   # over MAX_CELLS (read_study raises nothing else for a spec that validated)
    if study is not None:
        plan_study(study)
    return study is not None


def apply_study_command(study, yes, node_rank=0, rdzv_endpoint=None, detach=False):
    """`nanorun apply STUDY`: everything is checked for every cell before anything starts; then the scheduler (local),
    or a Slurm job array (`hardware.launcher: slurm`; --detach returns once it is submitted)."""
    from runners.execute import _position
    from runners.study import plan_study, preflight, render_study, study_report
    from runners.study_apply import apply_study, device_groups
    from specs.errors import InputError, LaunchError
    launcher = study.spec.hardware.launcher
    if node_rank or rdzv_endpoint or (study.spec.hardware.nodes > 1 and launcher != "slurm"):
        raise SpecError(f"{_position(study.path, ['hardware', 'nodes'])}: hardware.nodes: a study runs its cells on "
                        f"one node; apply each cell's spec on its nodes instead (or use launcher: slurm)")
    if launcher == "skypilot":
        raise LaunchError(f"{study.path}: hardware.launcher: skypilot does not run studies yet; use local or slurm")
    if detach and launcher != "slurm":
        raise InputError(f"--detach: only for hardware.launcher: slurm (study {study.name} runs {launcher})")
    splan = plan_study(study)
    if launcher == "slurm":
        from runners.slurm import check_cluster
        check_cluster(splan.plans[0], study.path)   # no sbatch, an unknown partition: one line, exit 2
        preflight(splan, devices=False)             # the cells run on the cluster's nodes, not here
    else:
        preflight(splan)
        device_groups(study.spec)
    report = study_report(splan)
    click.echo(render_study(report))
    if all(c["state"] == "done" for c in report["cells"]):
        click.echo("\nall cells are done")
    elif not yes:
        if not sys.stdin.isatty():
            raise SpecError("refusing to apply without confirmation: pass --yes when not on a terminal")
        click.confirm(f"\napply these {report['totals']['cells']} cells?", abort=True)
    click.echo("")
    try:
        if launcher == "slurm":
            from runners.cli_run import _ingest
            from runners.slurm_study import apply_study_slurm
            record = apply_study_slurm(splan, echo=click.echo, detach=detach, on_update=_ingest)
            if detach:
                return
        else:
            record = apply_study(splan, echo=click.echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; nothing is lost: `nanorun apply {study.path}` continues where it stopped", err=True)
        sys.exit(130)
    done = sum(c["status"] == "success" for c in record["cells"])
    click.echo(f"\nstudy {study.name}: {done}/{len(record['cells'])} cells done")
    click.echo(f"next: nanorun study status {study.name} | nanorun runs")


@main.group()
def study():
    """Studies: specs with a `sweep:` block (plan and apply them with `nanorun plan` / `nanorun apply`)."""


@study.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the cells as JSON.")
def status(name, as_json):
    """List a study's cells from its record, each with its run's state; cells deleted from disk are marked missing.

    Example: nanorun study status scaling_laws
    """
    from runners.slurm_study import refresh_study
    from runners.study import render_status, study_status
    refresh_study(name)   # cells on Slurm: their jobs' state, written back
    report = study_status(name)
    click.echo(json.dumps(report, indent=2) if as_json else render_status(report))


def echo_with_plots(report, render, as_json, no_plots, write):
    """Print a report and the PNGs `write()` made (report["plots"]), or one line saying why there are none."""
    from runners.plots import render_paths, skipped
    note = skipped(no_plots)
    report["plots"] = []
    if note is None:
        try:
            report["plots"] = write()
        except OSError as e:
            note = f"warning: plots not written: {e}"
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if note or not as_json:
        click.echo(note or render_paths(report["plots"]), err=as_json)


NO_PLOTS_OPTION = click.option("--no-plots", is_flag=True, help="Do not write the PNG plots (they need matplotlib: "
                                                                  "pip install 'nanorun[plots]').")
PARAMS_OPTION = click.option("--params", "convention", type=click.Choice(["scaling", "all", "matrices"]),
                             default="scaling", show_default=True,
                             help="Parameter count N: scaling = transformer matrices + lm_head (the reference's), "
                                  "all, or transformer matrices only.")


@study.command("show")
@click.argument("name")
@PARAMS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the fits as JSON.")
@NO_PLOTS_OPTION
def show(name, convention, as_json, no_plots):
    """The isoFLOP fit of a study: per FLOP budget, a quadratic of val bpb (and CORE) in log N whose vertex is the
    compute-optimal N* (with D* and the tokens:params ratio), then N* ~ C^a and D* ~ C^b with bootstrap intervals.
    The fit is also written to the registry (tables scaling_optima, scaling_fits), and drawn as PNGs under the
    study's directory: plots/isoflop.png (the curves per budget) and plots/fits.png (N* and D* against C).

    Example: nanorun study show scaling_laws --params scaling
    """
    from registry.studies import fit_report
    from runners.plots import write_study_plots
    from runners.slurm_study import refresh_study
    from runners.study_fit import record_fit, render_fit
    refresh_study(name)   # cells on Slurm: finished ones recorded before the fit reads them
    report = fit_report(name, convention)
    problem = record_fit(name, convention)
    if problem:
        click.echo(f"warning: the fit was not recorded in the registry: {problem}", err=True)
    echo_with_plots(report, render_fit, as_json, no_plots, lambda: write_study_plots(report))


@study.command("predict")
@click.argument("name")
@click.option("--flops", required=True, help="The compute budget C in FLOPs, e.g. 1e20.")
@PARAMS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the prediction as JSON.")
def predict(name, flops, convention, as_json):
    """What a study's laws imply for a budget: N*, D*, the tokens:params ratio and the val bpb at the optimum, and
    the depth nearest N* (nanochat.scaling) with the tokens it would train on at that budget.

    Example: nanorun study predict scaling_laws --flops 1e20
    """
    from registry.studies import predict_report
    from runners.study_fit import parse_flops, render_predict
    report = predict_report(name, parse_flops(flops), convention)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_predict(report))


@main.command("compare")
@click.argument("baseline")
@click.argument("variant")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--plot", "plot_path", metavar="OUT.png", help="Write the val-bpb-vs-FLOPs plot here (default: "
                                                            "$NANORUN_HOME/compare/A_vs_B.png).")
@NO_PLOTS_OPTION
def compare(baseline, variant, as_json, plot_path, no_plots):
    """Compare variant B with baseline A (runs or studies; a run stands for all the seeds of its recipe): the spec
    diff, final val bpb mean +- std per side with Welch's t-test, and the compute multiplier (the FLOPs the
    baseline needs to reach B's final val bpb, interpolated in log-log on its curve, over B's FLOPs). The val bpb
    curves of both sides (each seed thin, the mean bold) are drawn to a PNG.

    Example: nanorun compare d12 d12_muon_wd --plot d12_vs_wd.png
    """
    from runners.compare import compare as do_compare, render_compare
    from runners.plots import write_compare_plot
    report = do_compare(baseline, variant)
    echo_with_plots(report, render_compare, as_json, no_plots, lambda: [write_compare_plot(report, plot_path)])
