"""
The run-directory contract, torch-free, so every package (stages, runners, registry, tui) reads the same layout.

    $NANORUN_HOME (default ~/.cache/nanorun)
      stages/{stage}-{key8}/   one content-addressed stage: config.json, events.jsonl, checkpoints/, result.json
      runs/{run_id}/run.json   one applied spec
      hardware/                measured device facts (matmul peaks), cached per machine (nanochat.probe)
      registry.duckdb          rebuilt from the directories above at any time
"""

import os


def home():
    """$NANORUN_HOME or ~/.cache/nanorun (not created here)."""
    return os.environ.get("NANORUN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "nanorun")


def hardware_dir(base=None):
    return os.path.join(base or home(), "hardware")
