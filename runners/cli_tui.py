"""The `nanorun tui` command: the Textual app over $NANORUN_HOME (textual is imported only when it runs)."""

import click

from runners.cli import main


@main.command()
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="nanorun home (default: $NANORUN_HOME or ~/.cache/nanorun).")
@click.option("--refresh", type=float, default=5.0, show_default=True, help="Runs table refresh period, seconds.")
def tui(home, refresh):
    """Browse runs, watch a live run, see the leaderboard and chat with a checkpoint.

    Example: nanorun tui --home /data/nanorun
    """
    from tui.app import NanorunApp

    NanorunApp(home=home, refresh_seconds=refresh or None).run()
