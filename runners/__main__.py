"""`python -m runners ARGS` is `nanorun ARGS` (how `nanorun apply STUDY` launches each cell's apply)."""

from runners.cli import main

main(prog_name="nanorun")
