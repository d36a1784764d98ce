"""
Run the nanorun TUI: `python -m tui [--home DIR] [--refresh SECONDS]` (same as `nanorun tui`).
"""

import argparse

from tui.app import NanorunApp


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tui", description="Browse runs, watch live runs, chat.")
    parser.add_argument("--home", default=None, help="nanorun home (default: $NANORUN_HOME or ~/.cache/nanorun)")
    parser.add_argument("--refresh", type=float, default=5.0, help="runs table refresh period in seconds")
    args = parser.parse_args(argv)
    NanorunApp(home=args.home, refresh_seconds=args.refresh or None).run()


if __name__ == "__main__":
    main()
