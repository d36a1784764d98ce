#!/usr/bin/env bash
# Issue 14 item 3 at full size: 100 generated malformed specs, 100 malformed run directories and kill -9 at 20
# random moments of a tiny spec's apply (the test suite runs a sample of each: tests/test_fault_inputs.py and
# tests/test_fault_kills.py). Prints pytest's summary per part; every case that fails names its seed.
#   bash bench/fault_campaign.sh            # ~15 min on 2 idle cores
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
echo "== 100 malformed specs (validate + plan --json each) and 100 malformed run directories (7 commands each)"
NANORUN_FAULT_CASES=100 $PY -m pytest -q tests/test_fault_inputs.py 2>&1 | tail -3
echo "== kill -9 at 20 random moments (apply alone, its process group, or a stage worker), then apply again"
NANORUN_KILL_MOMENTS=20 $PY -m pytest -q -s tests/test_fault_kills.py 2>&1 | grep -E "kill campaign|passed|failed|Error" | tail -5
