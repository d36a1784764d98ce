"""
Issue 14 item 3, the concurrency part: applies and readers on one $NANORUN_HOME at the same time.

A sample of bench/concurrency_campaign.py (full size: 4 applies; figures in bench/RESULTS.md): 2 concurrent applies
of different tiny specs sharing a data and a tokenizer stage, while `runs`, `leaderboard`, `query`, `show` and a
headless TUI poll the home; zero failures, and the registry equals the run directories after sync and after
rebuild. Plus the regression test of what the campaign found: a writer starved by overlapping readers.

    .venv/bin/python -m pytest -q tests/test_concurrency.py
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from registry.db import connect, registry_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a reader that keeps a read-only connection open `hold` seconds, closes it and opens the next one at once; started
# `offset` seconds into its cycle, so that the connections of several readers overlap
READER = """
import sys, time
from registry.db import connect
path, hold, offset, until = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
con = connect(path, read_only=True)
print("reading", flush=True)
time.sleep(offset)
while time.time() < until:
    con.close()
    con = connect(path, read_only=True)
    time.sleep(hold)
con.close()
"""


def test_a_writer_is_not_starved_by_overlapping_readers(nanorun_home):
    """Readers whose connections overlap never leave DuckDB's file unlocked; retrying alone, a writer gave up after
    its timeout (`warning: registry not updated` from an apply in the campaign). Holding the gate while it waits,
    it makes new readers wait behind it and waits only for the connections open when it arrived."""
    path = registry_path(nanorun_home)
    connect(path).close()
    n, hold = 5, 1.0
    until = time.time() + 60
    readers = [subprocess.Popen([sys.executable, "-c", READER, path, str(hold), str(i * hold / n), str(until)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT) for i in range(n)]
    try:
        for reader in readers:
            assert reader.stdout.readline().strip() == "reading"
        time.sleep(hold)
        t0 = time.monotonic()
        connect(path, timeout=5.0).close()
        assert time.monotonic() - t0 < 5.0
        for reader in readers:
            assert reader.poll() is None   # still reading: none gave up on the lock
    finally:
        for reader in readers:
            reader.kill()
            reader.wait()


@pytest.mark.slow
def test_concurrency_campaign_sample():
    """2 applies at once (they race for the shared data and tokenizer stages: one runs each, the other is refused
    with the documented one-line message and applies again) with every reader polling: no failures, no lost rows."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "concurrency_campaign.py"), "--applies", "2", "--steps", "4",
           "--pause", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the campaign and every apply and reader it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"the campaign did not finish in 600 s:\n{stdout[-3000:]}")
    assert proc.returncode == 0 and "result: PASS" in stdout, stdout[-4000:] + stderr[-3000:]
    assert "failures: 0" in stdout
    assert "2 of 2 succeeded" in stdout
    assert "data 1" in stdout and "tok_train 1" in stdout   # each shared stage ran once
