"""`nanorun doctor`: this machine as nanorun sees it (a thin shell over runners.doctor)."""

import json

import click

from runners.cli import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-measure", is_flag=True, help="Skip the matmul timing (then nothing imports torch).")
@click.option("--remeasure", is_flag=True, help="Time the matmuls again instead of reading the cached peaks.")
def doctor(as_json, no_measure, remeasure):
    """Devices, CPU flags, native dtypes, measured matmul peaks, memory, attention backends, versions, and what
    every `auto` in a spec resolves to on this machine.

    Example: nanorun doctor --json
    """
    from runners.doctor import doctor_report, render_doctor
    report = doctor_report(measure=not no_measure, refresh=remeasure)
    click.echo(json.dumps(report, indent=2) if as_json else render_doctor(report))
