"""
Tests of the Textual TUI (tui/): runs table, run detail, live monitor, leaderboard and chat, driven with
app.run_test() + Pilot over a run tree built in tmp_path. Run: .venv/bin/pytest tests/test_tui.py -q
"""

import json
import os
import time

import pytest
from textual.widgets import DataTable, Input, Static

from nanochat import rundir
from tui import data
from tui.app import NanorunApp
from tui.chat_screen import ChatScreen
from tui.leaderboard_screen import LeaderboardScreen
from tui.live_monitor import LiveMonitor
from tui.run_detail import RunDetailScreen
from tui.runs_screen import RunsScreen

SPEC_YAML = "name: {name}\nmodel: {{depth: {depth}}}\nstages: [tok_train, base_train, base_eval]\n"


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def append_events(path, events, partial=""):
    with open(path, "a") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
        f.write(partial)


def metric(step, loss, t=None):
    return {"time": t if t is not None else 1000.0 + step, "kind": "metric", "step": step,
            "values": {"train/loss": loss, "train/tok_per_sec": 5000.0 + step, "train/mfu": 1.5}}


def make_run(home, run_id, name="d4", depth=4, status="success", core=0.3, val_bpb=1.25, train_seconds=120.0,
             created_at=1_700_000_000.0, outputs=None):
    """A run directory with tok_train, base_train and base_eval stages, as the runner and stages write them.
    status="running" leaves base_train running (no result.json) and base_eval pending."""
    running = status == "running"
    outputs = outputs or {}
    stages = []
    for stage in ("tok_train", "base_train", "base_eval"):
        key = f"{stage.replace('_', '')}{run_id[-4:]}"
        directory = os.path.join("stages", f"{stage}-{key}")
        stage_status = "success"
        if running:
            stage_status = {"tok_train": "success", "base_train": "running", "base_eval": "pending"}[stage]
        stages.append({"stage": stage, "key": key, "dir": directory, "status": stage_status,
                       "wall_seconds": 130.0 if stage == "base_train" else 5.0, "exit_code": 0, "error": None})
        path = os.path.join(home, directory)
        os.makedirs(path, exist_ok=True)
        if stage == "base_train":
            write_json(os.path.join(path, "config.json"), {"num_iterations": 100, "depth": depth})
            append_events(os.path.join(path, "events.jsonl"),
                          [{"time": 999.0, "kind": "status", "status": "running"}]
                          + [metric(s, 5.0 - s / 10) for s in range(0, 20, 2)]
                          + [{"time": 1020.0, "kind": "sample", "step": 20, "prompt": "The capital", "text": " is"}])
        if stage == "base_eval" and not running:
            append_events(os.path.join(path, "events.jsonl"),
                          [{"time": 1.0, "kind": "eval", "step": 100, "suite": "core", "task": "hellaswag",
                            "metric": "centered", "value": 0.31, "n": 500},
                           {"time": 1.0, "kind": "eval", "step": 100, "suite": "core", "task": "piqa",
                            "metric": "centered", "value": 0.29, "n": 500}])
        if stage_status == "success":
            metrics = {"tok_train": {"vocab_size": 512},
                       "base_train": {"val_bpb": val_bpb, "total_training_time": train_seconds},
                       "base_eval": {"core_metric": core, "core_partial": False, "val_bpb": val_bpb}}[stage]
            write_json(os.path.join(path, "result.json"),
                       {"stage": stage, "status": "success", "metrics": metrics, "outputs": outputs.get(stage, {})})
    plan = {"spec": {"name": name}, "stages": {"base_train": {
        "n_layer": depth, "n_embd": depth * 64, "params": {"total": 123456}, "total_batch_size": 8192,
        "num_iterations": 100, "total_flops": 1.5e15}}}
    write_json(os.path.join(home, "runs", run_id, "run.json"), {
        "run_id": run_id, "name": name, "spec_yaml": SPEC_YAML.format(name=name, depth=depth), "plan": plan,
        "status": status, "created_at": created_at, "started_at": created_at, "finished_at": None,
        "hardware": {"nodes": 1, "gpus_per_node": 8, "gpu": "H100", "usd_per_gpu_hour": 3.0}, "stages": stages})
    return os.path.join(home, "stages", f"base_train-basetrain{run_id[-4:]}")


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = str(tmp_path / "home")
    monkeypatch.setenv("NANORUN_HOME", home)
    make_run(home, "d4-aaaa1111", core=0.30, val_bpb=1.25, train_seconds=120.0, created_at=1_700_000_000.0)
    make_run(home, "d6-bbbb2222", name="d6", depth=6, core=0.27, val_bpb=1.10, train_seconds=60.0,
             created_at=1_700_000_100.0)
    make_run(home, "d8-cccc3333", name="d8", depth=8, status="running", created_at=1_700_000_200.0)
    return home


def cell_texts(table):
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


# -----------------------------------------------------------------------------
# data layer


def test_event_tail_keeps_partial_line_until_complete(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = rundir.EventTail(str(path))
    assert tail.poll() == []  # missing file: nothing yet
    append_events(path, [metric(1, 4.0)], partial='{"time": 2, "kind": "metric", "st')
    assert [e["step"] for e in tail.poll()] == [1]
    append_events(path, [], partial='ep": 2, "values": {"train/loss": 3.5}}\n')
    assert [e["step"] for e in tail.poll()] == [2]
    assert tail.poll() == []


def test_load_runs_summarizes_run_dirs(home):
    rows = {r["run_id"]: r for r in data.load_runs(home)}
    assert set(rows) == {"d4-aaaa1111", "d6-bbbb2222", "d8-cccc3333"}
    d4 = rows["d4-aaaa1111"]
    assert (d4["spec"], d4["depth"], d4["val_bpb"], d4["core"], d4["train_seconds"]) == ("d4", 4, 1.25, 0.30, 120.0)
    assert d4["cost_usd"] == pytest.approx(120.0 / 3600 * 8 * 3.0)
    assert rows["d8-cccc3333"]["status"] == "running" and rows["d8-cccc3333"]["core"] is None
    assert [r["run_id"] for r in data.load_runs(home)][0] == "d8-cccc3333"  # newest first


def test_eta_from_step_rate():
    events = [metric(s, 1.0, t=100.0 + 2 * s) for s in range(10)]  # 2 s per step
    assert data.eta_seconds(events, 100) == pytest.approx((100 - 9) * 2.0)
    assert data.eta_seconds(events[:1], 100) is None and data.eta_seconds(events, None) is None


def test_leaderboard_is_the_registry_s(home):
    """The TUI's leaderboard is the registry's query (real DuckDB file, ingested from the run dirs), not its own."""
    from registry import leaderboard

    columns, rows, source = data.leaderboard(home)
    assert source == "registry"
    table = [dict(zip(columns, r)) for r in rows]
    assert [(r["rank"], r["name"]) for r in table] == [(1, "d6"), (2, "d4"), (None, "d8")]  # 60 s beats 120 s
    assert table[0]["hours"] == pytest.approx(60 / 3600)
    assert [[r[c] for c in columns] for r in leaderboard(home)] == rows


# -----------------------------------------------------------------------------
# the app


async def test_runs_table_lists_runs_and_sorts(home):
    app = NanorunApp(home=home, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        assert isinstance(app.screen, RunsScreen)
        table = app.screen.query_one("#runs-table", DataTable)
        rows = cell_texts(table)
        assert [r[0] for r in rows] == ["d8-cccc3333", "d6-bbbb2222", "d4-aaaa1111"]
        assert rows[2][2:6] == ["success", "4", "1.2500", "0.3000"]
        app.screen.sort_key, app.screen.sort_reverse = "val_bpb", False
        app.screen.populate()
        assert [r[0] for r in cell_texts(table)] == ["d6-bbbb2222", "d4-aaaa1111", "d8-cccc3333"]  # None last
        # a run appearing on disk shows up on refresh (r)
        make_run(home, "d2-dddd4444", name="d2", depth=2)
        await pilot.press("r")
        assert table.row_count == 4


async def test_enter_opens_detail_with_stages_and_metrics(home):
    app = NanorunApp(home=home, refresh_seconds=None, monitor_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("down", "down", "enter")  # third row: d4 (newest first)
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunDetailScreen) and screen.run_id == "d4-aaaa1111"
        stages = cell_texts(screen.query_one("#stages-table", DataTable))
        assert [(r[0], r[1]) for r in stages] == [("tok_train", "success"), ("base_train", "success"),
                                                  ("base_eval", "success")]
        metrics = dict(cell_texts(screen.query_one("#metrics-table", DataTable)))
        assert metrics["core_metric"] == "0.3000" and metrics["val_bpb"] == "1.2500"
        core = cell_texts(screen.query_one("#core-table", DataTable))
        assert [(r[1], r[3]) for r in core] == [("hellaswag", "0.3100"), ("piqa", "0.2900")]
        plan = dict(cell_texts(screen.query_one("#plan-table", DataTable)))
        assert plan["n_layer"] == "4" and plan["params"] == "123,456" and plan["iterations"] == "100"
        assert "depth: 4" in str(screen.query_one("#spec-yaml", Static).render())
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_live_monitor_picks_up_appended_metric(home):
    app = NanorunApp(home=home, refresh_seconds=None, monitor_seconds=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("enter")  # first row: the running d8
        await pilot.pause()
        monitor = app.screen.query_one(LiveMonitor)
        assert monitor.status == "running" and monitor.last_step == 18
        assert monitor.series["loss"][-1] == pytest.approx(3.2)
        assert "is" in str(app.screen.query_one("#monitor-samples", Static).render())
        stage_dir = os.path.join(home, "stages", "base_train-basetrain3333")
        # the runner marks the stage done; the detail re-reads run.json when new metrics arrive
        run_json = os.path.join(home, "runs", "d8-cccc3333", "run.json")
        with open(run_json) as f:
            run = json.load(f)
        run["stages"][1]["status"] = "success"
        write_json(run_json, run)
        # a whole line plus half of the next one, as a writer mid-flush leaves it
        append_events(os.path.join(stage_dir, "events.jsonl"), [metric(20, 2.5, t=time.time())],
                      partial='{"time": 1, "kind": "metric", "step": 22, "val')
        for _ in range(50):
            await pilot.pause(0.05)
            if monitor.last_step == 20:
                break
        assert monitor.last_step == 20 and monitor.series["loss"][-1] == pytest.approx(2.5)
        header = str(app.screen.query_one("#monitor-header", Static).render())
        assert "step 20/100" in header and "ETA" in header
        assert "2.5000" in str(app.screen.query_one("#label-loss", Static).render())
        await pilot.pause()
        stages = cell_texts(app.screen.query_one("#stages-table", DataTable))
        assert stages[1][:2] == ["base_train", "success"]


async def test_leaderboard_screen_shows_rows(home):
    app = NanorunApp(home=home, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("l")
        assert isinstance(app.screen, LeaderboardScreen)
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.screen.query_one("#leaderboard-table", DataTable)
        names = [str(table.get_cell_at((i, list(table.columns).index("name")))) for i in range(table.row_count)]
        assert names == ["d6", "d4", "d8"]
        assert "2 ranked" in str(app.screen.query_one("#leaderboard-status", Static).render())
        await pilot.press("escape")
        assert isinstance(app.screen, RunsScreen)


async def test_chat_without_checkpoint_notifies_instead_of_crashing(home):
    app = NanorunApp(home=home, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("c")
        assert isinstance(app.screen, ChatScreen)
        app.screen.query_one(Input).value = "hello"
        await pilot.press("enter")
        await pilot.pause()
        assert any("no checkpoint" in n.message for n in app._notifications)


@pytest.fixture
def tiny_model(tmp_path):
    """A real tokenizer trained on a few KB of text and a depth-1 GPT checkpoint (random weights)."""
    import dataclasses

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import train_tokenizer

    text = ["The quick brown fox jumps over the lazy dog. " * 20, "Hello world, this is a tiny corpus. " * 20,
            "Numbers 12 34 56 and words again and again. " * 20]
    tokenizer = train_tokenizer(iter(text), vocab_size=300)
    tokenizer_dir, checkpoint_dir = str(tmp_path / "tok"), str(tmp_path / "ckpt")
    tokenizer.save(tokenizer_dir)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64, window_pattern="L")
    model = build_model(config)
    save_checkpoint(checkpoint_dir, 0, model.state_dict(), None, {"step": 0, "model_config": dataclasses.asdict(config)})
    return tokenizer_dir, checkpoint_dir


async def test_chat_streams_tokens_from_real_checkpoint(home, tiny_model):
    tokenizer_dir, checkpoint_dir = tiny_model
    make_run(home, "d1-eeee5555", name="d1", depth=1, created_at=1_800_000_000.0,
             outputs={"tok_train": {"tokenizer_dir": tokenizer_dir}, "base_train": {"checkpoint_dir": checkpoint_dir}})
    # the same weights also registered as an sft checkpoint: the chat renders a conversation for it
    run_json = os.path.join(home, "runs", "d1-eeee5555", "run.json")
    with open(run_json) as f:
        run = json.load(f)
    sft_dir = os.path.join(home, "stages", "sft-eeee5555")
    write_json(os.path.join(sft_dir, "result.json"), {"stage": "sft", "status": "success", "metrics": {},
                                                      "outputs": {"checkpoint_dir": checkpoint_dir}})
    run["stages"].append({"stage": "sft", "key": "sfteeee5555", "dir": sft_dir, "status": "success"})
    write_json(run_json, run)

    app = NanorunApp(home=home, refresh_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("c")  # newest run is highlighted
        screen = app.screen
        assert isinstance(screen, ChatScreen) and [c["stage"] for c in screen.checkpoints] == ["sft", "base_train"]
        screen.sampling["max_tokens"] = 12

        # sft checkpoint first (selected by default): a conversation, kept as history
        screen.query_one(Input).value = "hello"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not [n for n in app._notifications if n.severity == "error"]
        assert [m["role"] for m in screen.history] == ["user", "assistant"]
        assert "tokens" in screen.sub_title and screen.sub_title != "d1-eeee5555  0 tokens"

        # base checkpoint: the reply continues the prompt text
        screen.query_one("#checkpoint").value = 1
        await pilot.pause()
        screen.query_one(Input).value = "The quick"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        text = str(screen.query_one("#chat-text", Static).render())
        assert "> The quick\nThe quick" in text
        reply = text.split("> The quick\n", 1)[1].strip()
        assert len(reply) > len("The quick") and not screen.busy
        assert len(screen.history) == 0  # switching checkpoints started a new conversation


async def test_shared_run_tree_fixture_renders(nanorun_home):
    """Run trees from conftest.make_run_tree (the registry's test data, other metric names) render too."""
    from conftest import make_run_tree

    done = os.path.basename(make_run_tree(nanorun_home, name="demo", seed=0, core_metric=0.3, val_bpb=0.8))
    running = os.path.basename(make_run_tree(nanorun_home, name="demo", seed=1, status="running"))
    rows = {r["run_id"]: r for r in data.load_runs(nanorun_home)}
    assert (rows[done]["core"], rows[done]["val_bpb"], rows[done]["train_seconds"]) == (0.3, 0.8, 3600.0)
    app = NanorunApp(home=nanorun_home, refresh_seconds=None, monitor_seconds=None)
    async with app.run_test(size=(120, 40)) as pilot:
        app.open_run(running)
        await pilot.pause()
        monitor = app.screen.query_one(LiveMonitor)
        assert monitor.last_step == 9 and len(monitor.series["loss"]) == 10 and len(monitor.series["val bpb"]) == 2
        samples = str(app.screen.query_one("#monitor-samples", Static).render())
        assert "step 10: The capital of France is something" in samples and "is The capital" not in samples


async def test_leaderboard_says_registry_busy_while_a_writer_holds_it(home):
    import subprocess
    import sys

    data.leaderboard(home)  # creates and fills registry.duckdb
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", os.path.join(home, "registry.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        columns, rows, status = data.leaderboard(home, timeout=0.3)
        assert rows is None and status.startswith("registry busy")
        app = NanorunApp(home=home, refresh_seconds=None)
        async with app.run_test(size=(120, 40)) as pilot:
            screen = LeaderboardScreen(home)
            await app.push_screen(screen)
            screen.show(columns, rows, status)  # what the worker hands over (its own call waits out the lock)
            await pilot.pause()
            assert str(screen.query_one("#leaderboard-status", Static).render()).startswith("registry busy")
            await app.workers.wait_for_complete()
    finally:
        holder.kill()
        holder.wait()


def test_nanorun_tui_command_is_registered():
    from click.testing import CliRunner

    import runners.cli_tui  # noqa: F401 (registers `tui` on the group)
    from runners.cli import main

    result = CliRunner().invoke(main, ["tui", "--help"], catch_exceptions=False)
    assert result.exit_code == 0 and "--home" in result.output and "Example: nanorun tui" in result.output
