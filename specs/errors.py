"""
The one error family of nanorun. The CLI turns any NanorunError into a single line on stderr and a
non-zero exit (exit_code); any other exception is a bug and keeps its traceback.
Lives in `specs` because it is the bottom layer: registry, runners and tui all import it, nanochat never does.
"""


class NanorunError(Exception):
    exit_code = 1


class SpecError(NanorunError):
    """A spec (YAML) that does not load or validate. `problems` holds every 'FILE:LINE:COL: path: message' line."""
    exit_code = 2

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} problems:\n" + "\n".join(self.problems))


class InputError(NanorunError):
    """A bad value on the command line that click cannot check alone (a --node-rank the spec has no node for)."""
    exit_code = 2


class RegistryError(NanorunError):
    pass


class LaunchError(NanorunError):
    pass


class DataError(NanorunError):
    pass


class MissingToolError(LaunchError):
    """A launcher's tool is not installed or not reachable (no sbatch on PATH, an unknown partition): bad input, exit 2,
    nothing submitted. The message names what is missing and how to get it."""
    exit_code = 2
