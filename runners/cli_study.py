"""
Study commands of the nanorun CLI. `nanorun plan` and `nanorun apply` hand a spec with a `sweep:` block here
(cli_run); `nanorun study status NAME` lists a study's cells from its record, even when the spec has changed.

    nanorun plan specs/scaling_laws.yaml [--json]
    nanorun apply specs/scaling_laws.yaml --yes
    nanorun study status scaling_laws [--json]
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
    from runners.study import plan_study, preflight, render_study, study_report
    splan = plan_study(study)
    try:
        preflight(splan)
    except SpecError as e:   # the study may be meant for another machine: plan still shows it
        for p in e.problems:
            click.echo(f"warning: {p} (apply will refuse to start)", err=True)
    report = study_report(splan)
    click.echo(json.dumps(report, indent=2) if as_json else render_study(report))
    if detailed_exitcode and any(c["state"] != "done" for c in report["cells"]):
        sys.exit(2)


def validate_study(spec_path):
    """Plan-time problems of a study's cells (a batch that does not divide, a model that cannot fit), as SpecError;
    nothing for a plain spec or a study too large to plan here."""
    import specs
    from runners.study import plan_study
    try:
        study = specs.read_study(spec_path)
    except SpecError:
        return   # over MAX_CELLS: `plan --yes` plans it
    if study is not None:
        plan_study(study)


def apply_study_command(study, yes, node_rank=0, rdzv_endpoint=None):
    """`nanorun apply STUDY`: everything is checked for every cell before anything starts; then the scheduler."""
    from runners.execute import _position
    from runners.study import plan_study, preflight, render_study, study_report
    from runners.study_apply import apply_study, device_groups
    if study.spec.hardware.nodes > 1 or node_rank or rdzv_endpoint:
        raise SpecError(f"{_position(study.path, ['hardware', 'nodes'])}: hardware.nodes: a study runs its cells on "
                        f"one node; apply each cell's spec on its nodes instead")
    splan = plan_study(study)
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
    from runners.study import render_status, study_status
    report = study_status(name)
    click.echo(json.dumps(report, indent=2) if as_json else render_status(report))
