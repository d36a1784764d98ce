"""
The `nanorun` command line. Each command is a thin shell over a library function; heavy modules
(torch, duckdb, textual) are imported inside the command that needs them so `nanorun --help` stays instant.

    nanorun validate specs/cpu_demo.yaml
    nanorun plan specs/speedrun_d26.yaml [--json]
    nanorun apply specs/cpu_demo.yaml --yes
    nanorun runs | show RUN | leaderboard | query "select ..." | registry rebuild
    nanorun tui
    nanorun doctor [--json]
"""

import sys

import click

from nanochat.rundir import RunDirError
from specs.errors import NanorunError


class NanorunGroup(click.Group):
    """Turns a NanorunError into one line on stderr and its exit code, and a RunDirError (an unusable file of the run
    tree, an unknown or ambiguous run: nanochat's error, it cannot import specs) into one line and exit 2 (bad
    input); anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NanorunError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except RunDirError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=NanorunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nanorun")
def main():
    """nanorun: train ChatGPT-style models end to end from YAML specs, and keep every run in a DuckDB registry."""


def _register():
    # command modules register themselves on `main`; imported here so each stays a small file
    from runners import cli_registry, cli_run, cli_tui  # noqa: F401
    from runners import cli_chat  # noqa: F401
    from runners import cli_data, cli_eval  # noqa: F401
    from runners import cli_serve  # noqa: F401
    from runners import cli_doctor  # noqa: F401
    from runners import cli_study  # noqa: F401
    from runners import cli_interop  # noqa: F401


_register()
