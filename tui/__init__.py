"""
nanorun's Textual TUI: runs table, run detail with a live monitor, leaderboard and chat with a checkpoint.

    python -m tui [--home DIR]      # or: nanorun tui
"""
