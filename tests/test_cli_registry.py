"""CLI tests for the registry commands (runs, show, leaderboard, query, registry rebuild|sync|path) via click's
CliRunner on real run trees and a real DuckDB file. Run: .venv/bin/pytest tests/test_cli_registry.py -q"""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import make_run_tree
from runners.cli import main


def cli(*args, code=0, columns=100):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False, env={"COLUMNS": str(columns)})
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def home(nanorun_home):
    make_run_tree(nanorun_home, "speedrun", seed=0, total_training_time=7200, core_metric=0.26, run_id="speedrun-0000")
    make_run_tree(nanorun_home, "speedrun", seed=1, total_training_time=7560, core_metric=0.27, run_id="speedrun-1111")
    make_run_tree(nanorun_home, "cpu_demo", core_metric=0.08, run_id="cpu_demo-2222")
    return nanorun_home


def test_runs_syncs_new_run_dirs_first(home):
    runs = json.loads(cli("runs", "--json").output)
    assert sorted(r["run_id"] for r in runs) == ["cpu_demo-2222", "speedrun-0000", "speedrun-1111"]
    make_run_tree(home, "live", status="running", run_id="live-3333")
    text = cli("runs").output
    assert "live-3333" in text and "running" in text
    header = text.splitlines()[0].split()
    assert header[:3] == ["run", "status", "stages"]
    assert len(json.loads(cli("runs", "--json", "-n", "2").output)) == 2


def test_show(home):
    detail = json.loads(cli("show", "speedrun-1", "--json").output)
    assert detail["run"]["run_id"] == "speedrun-1111"
    assert detail["summary"]["qualified"] is True
    assert len(detail["core"]) == 22
    text = cli("show", "cpu_demo").output
    assert "cpu_demo-2222" in text and "CORE 0.0800 < 0.2565" in text and "base_eval" in text
    assert '[base_train step 20] "The capital of France is"\n    something\n' in text


def test_show_errors_are_one_line(home):
    """A run reference that names no run (or several) is bad input: exit 2, as from eval, chat and serve."""
    result = cli("show", "speedrun-", code=2)
    assert result.output.strip() == "error: ambiguous run 'speedrun-' matches 2 runs: speedrun-1111, speedrun-0000"
    assert cli("show", "zzz", code=2).output.strip() == \
        f"error: unknown run 'zzz' (no run directory in {os.path.join(home, 'runs')}; see `nanorun runs`)"


def test_leaderboard(home):
    rows = json.loads(cli("leaderboard", "--json").output)
    assert [(r["rank"], r["name"], r["n"]) for r in rows] == [(1, "speedrun", 2), (None, "cpu_demo", 1)]
    assert rows[0]["hours"] == pytest.approx(2.05) and rows[0]["hours_std"] == pytest.approx(0.1 / 2**0.5)
    assert rows[0]["run_ids"] == ["speedrun-0000", "speedrun-1111"]
    assert len(json.loads(cli("leaderboard", "--json", "--qualified").output)) == 1
    lines = cli("leaderboard").output.splitlines()
    assert lines[0].split()[:3] == ["#", "spec", "hardware"]
    assert lines[2].startswith("1  speedrun  8xH100-SXM  2  2.05 +- 0.07")
    assert lines[3].startswith("x  cpu_demo") and lines[3].endswith("CORE 0.0800 < 0.2565")


def test_query_formats(home):
    sql = "SELECT run_id, core_metric FROM run_summary ORDER BY run_id"
    assert json.loads(cli("query", sql, "--json").output) == [
        {"run_id": "cpu_demo-2222", "core_metric": 0.08}, {"run_id": "speedrun-0000", "core_metric": 0.26},
        {"run_id": "speedrun-1111", "core_metric": 0.27}]
    assert cli("query", sql, "--csv").output.splitlines() == [
        "run_id,core_metric", "cpu_demo-2222,0.08", "speedrun-0000,0.26", "speedrun-1111,0.27"]
    assert cli("query", sql).output.splitlines() == [
        "run_id         core_metric", "-------------  -----------",
        "cpu_demo-2222         0.08", "speedrun-0000         0.26", "speedrun-1111         0.27"]


def test_bad_sql_exits_2_with_one_line(home):
    result = cli("query", "SELEC 1", code=2)
    assert result.output.startswith("error: Parser Error: syntax error") and result.output.count("\n") == 1
    assert "read-only" in cli("query", "DROP TABLE runs", code=2).output


def test_sql_is_read_only_for_real(home, tmp_path):
    # no file system access: COPY ... TO, read_csv of any file, ATTACH; and the setting cannot be switched back
    target = tmp_path / "x.csv"
    for sql in (f"COPY (select 42) TO '{target}'", "select * from read_csv('/etc/hostname')",
                f"ATTACH '{tmp_path / 'y.duckdb'}'", "SET enable_external_access = true"):
        out = cli("query", sql, code=2).output
        assert out.startswith("error: ") and out.count("\n") == 1, (sql, out)
    assert not target.exists() and not (tmp_path / "y.duckdb").exists()


def test_empty_sql_and_non_finite_json(home):
    for sql in ("", "  ", ";", " ; ;"):
        assert cli("query", sql, code=2).output.startswith("error: empty SQL")
    rows = json.loads(cli("query", "select 'nan'::double as a, 'inf'::double as b, 1.5 as c", "--json").output)
    assert rows == [{"a": None, "b": None, "c": 1.5}]


def test_counts_must_be_sensible(home):
    for args in (["runs", "-n", "0"], ["runs", "-n", "-1"], ["show", "speedrun-0000", "--samples", "-1"]):
        out = cli(*args, code=2).output
        assert "Invalid value" in out and "Traceback" not in out
    assert len(json.loads(cli("runs", "-n", "1", "--json").output)) == 1
    cli("show", "speedrun-0000", "--samples", "0")


def test_registry_rebuild_and_path(home):
    path = cli("registry", "path").output.strip()
    assert path == os.path.join(home, "registry.duckdb") and not os.path.exists(path)
    assert cli("registry", "rebuild").output.strip() == f"rebuilt {path} from 3 runs"
    assert cli("registry", "sync").output.strip() == "ingested 0 runs"
    assert json.loads(cli("query", "SELECT count(*) AS n FROM runs", "--json").output) == [{"n": 3}]


CPU = {"nodes": 1, "gpus_per_node": 1, "gpu": "cpu", "usd_per_gpu_hour": 0.0, "device_type": "cpu"}


@pytest.fixture
def tiny(nanorun_home):
    """Like the first real CPU run: 14 of 22 CORE tasks, slash metric names, no $ price; its last sample
    has a newline and an ESC (models emit any byte)."""
    run_dir = make_run_tree(nanorun_home, "tiny_demo", core_tasks=14, core_metric=0.054, hardware=CPU,
                            real_names=True, total_training_time=0.0, num_steps=10, run_id="tiny_demo-8095")
    stage_dir = json.load(open(os.path.join(run_dir, "run.json")))["stages"][2]["dir"]
    with open(os.path.join(stage_dir, "events.jsonl"), "a") as f:
        f.write(json.dumps({"time": 2e9, "kind": "sample", "step": 10, "prompt": "",
                            "text": "\x1b[31mred\n" + "word " * 200}) + "\n")
    return nanorun_home


def test_show_fits_100_columns_and_keeps_json_complete(tiny):
    text = cli("show", "tiny_demo", "--samples", "3").output
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert "\x1b" not in text and "\\x1b[31mred" in text  # control characters are shown escaped
    missing_row = next(line for line in lines if "core_missing" in line)
    assert '["task14", "task15"' in missing_row and "..." in missing_row
    assert "CORE 0.0540 over 14/22 tasks (partial); missing 8: task14, task15," in text
    assert "partial CORE (14/22)" in text and "no $/GPU-h set" in text and "(wall 0:01:30)" in text
    core_rows = [line.split()[0] for line in lines if line.startswith("task")]
    assert core_rows == [f"task{i:02d}" for i in range(14)]  # no aggregate 'CORE' row among the tasks
    # the long unconditional sample is wrapped and cut; the prompted ones show prompt and continuation
    assert "(unconditional)\n    \\x1b[31mred word word" in text and text.count("\n    word word") == 2
    assert "word ...\n" in text
    assert '"If yesterday was Friday, then"\n    something' in text
    detail = json.loads(cli("show", "tiny_demo", "--json").output)
    assert detail["stages"][2]["result"]["core_missing"] == [f"task{i}" for i in range(14, 22)]
    assert detail["samples"][-1]["text"] == "\x1b[31mred\n" + "word " * 200


def test_runs_shows_train_wall_time(tiny):
    lines = cli("runs").output.splitlines()
    header = lines[0]
    assert "train time" in header and "wall" in header
    row = lines[2]
    assert row.startswith("tiny_demo-8095") and "1xcpu" in row and "0.0540 (partial)" in row
    assert "0:00:00" in row and "0:01:30" in row and row.endswith("-")  # no cost without a $ price
    assert json.loads(cli("runs", "--json").output)[0]["train_wall_seconds"] == 90.0


def test_leaderboard_cpu_partial_row(tiny):
    make_run_tree(tiny, "speedrun", core_metric=0.26, run_id="speedrun-0000")
    lines = cli("leaderboard").output.splitlines()
    assert lines[2].startswith("1  speedrun")
    assert lines[3].split() == ["x", "tiny_demo", "1xcpu", "1", "0.00", "0.8000", "0.0540", "-",
                                lines[3].split()[8], "abc1234", "partial", "CORE", "(14/22)"]


NO_TORCH = """
import sys
from click.testing import CliRunner
from runners.cli import main
for args in (["runs"], ["show", "cpu_demo"], ["leaderboard"], ["query", "select 1"], ["registry", "rebuild"]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
pure = ("nanochat", "nanochat.scaling", "nanochat.hardware", "nanochat.probe", "nanochat.rundir", "nanochat.memory")  # torch-free by design
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "textual", "nanochat") and m not in pure)
print("HEAVY", heavy)
"""


def test_registry_commands_do_not_import_torch(home):
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, env=dict(os.environ),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize("content", ["[]", '"text"', '{"run_id": "bad", "stages": "abc"}', '{"stages": [1, 2]}',
                                     '{"stages": [{"key": 5}]}', '{"hardware": [1]}', '{"tags": "x"}', "{broken"])
def test_a_malformed_run_dir_is_skipped_and_named(home, content):
    bad = os.path.join(home, "runs", "zz-malformed")
    os.makedirs(bad)
    with open(os.path.join(bad, "run.json"), "w") as f:
        f.write(content)
    for args in (["registry", "rebuild"], ["runs"], ["leaderboard"], ["show", "speedrun-0000"],
                 ["query", "select count(*) from runs"]):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
    rebuilt = CliRunner().invoke(main, ["registry", "rebuild"], catch_exceptions=False)
    assert f"warning: skipped {bad}/run.json: " in rebuilt.output and "rebuilt" in rebuilt.output
    assert "speedrun-0000" in CliRunner().invoke(main, ["runs"], catch_exceptions=False).stdout
