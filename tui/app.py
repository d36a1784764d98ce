"""
The nanorun terminal app: runs table -> run detail with live monitor, leaderboard, studies, chat with a checkpoint.

    python -m tui [--home DIR]          # or: nanorun tui
    NanorunApp(home=tmp_path, refresh_seconds=None).run_test()   # in tests: no timers

The app only routes: each screen lives in its own module and reads the run directories itself (tui/data.py).
"""

import os

from textual.app import App

from nanochat import rundir
from tui.chat_screen import ChatScreen
from tui.leaderboard_screen import LeaderboardScreen
from tui.run_detail import RunDetailScreen
from tui.runs_screen import RunSelected, RunsScreen
from tui.studies_screen import StudiesScreen


class NanorunApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "nanorun"
    BINDINGS = [
        ("q", "quit", "Quit"),
        ("r", "reload", "Refresh"),
        ("l", "leaderboard", "Leaderboard"),
        ("s", "studies", "Studies"),
        ("c", "chat", "Chat"),
    ]

    def __init__(self, home=None, refresh_seconds=5.0, monitor_seconds=1.0):
        """refresh_seconds: runs table refresh period (None disables the timer, for tests);
        monitor_seconds: live monitor poll period of events.jsonl."""
        super().__init__()
        self.home = os.path.abspath(home or rundir.home())
        self.refresh_seconds = refresh_seconds
        self.monitor_seconds = monitor_seconds

    def get_default_screen(self):
        return RunsScreen(self.home, self.refresh_seconds)

    def on_run_selected(self, event: RunSelected):
        self.open_run(event.run_id)

    def open_run(self, run_id):
        try:
            self.push_screen(RunDetailScreen(self.home, run_id, self.monitor_seconds))
        except rundir.RunDirError as e:  # the run directory vanished or broke between refreshes
            self.notify(str(e), severity="error")

    def action_reload(self):
        reload = getattr(self.screen, "reload", None)
        if reload is not None:
            reload()

    def action_leaderboard(self):
        if not isinstance(self.screen, LeaderboardScreen):
            self.push_screen(LeaderboardScreen(self.home))

    def action_studies(self):
        if not isinstance(self.screen, StudiesScreen):
            self.push_screen(StudiesScreen(self.home))

    def action_chat(self):
        run_id = getattr(self.screen, "run_id", None)
        if isinstance(self.screen, ChatScreen):
            return
        if run_id is None:
            self.notify("select a run first", severity="warning")
            return
        try:
            self.push_screen(ChatScreen(self.home, run_id))
        except rundir.RunDirError as e:
            self.notify(str(e), severity="error")

    def action_back(self):
        if len(self.screen_stack) > 1:
            self.pop_screen()
