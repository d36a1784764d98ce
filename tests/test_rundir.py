"""The run-directory contract (nanochat/rundir.py): names, the moved-home rule, JSON reads and their one-line errors,
run-reference resolution, checkpoint completeness and the event log. Run: .venv/bin/pytest tests/test_rundir.py -q"""

import json
import os
import re

import pytest

from nanochat import rundir
from nanochat.rundir import RunDirError


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_home_and_names(monkeypatch, tmp_path):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path))
    assert rundir.home() == str(tmp_path)
    assert rundir.run_dir("d12-1a2b3c4d") == os.path.join(str(tmp_path), "runs", "d12-1a2b3c4d")
    assert rundir.stage_dir("base_train", "0123456789abcdef") == os.path.join(str(tmp_path), "stages",
                                                                               "base_train-01234567")
    monkeypatch.delenv("NANORUN_HOME")
    assert rundir.home() == os.path.join(os.path.expanduser("~"), ".cache", "nanorun")


def test_moved_home_finds_stage_dirs_by_name(tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    os.makedirs(os.path.join(new, "stages", "sft-aaaa1111"))
    recorded = os.path.join(old, "stages", "sft-aaaa1111")
    assert rundir.locate_stage_dir(recorded, new) == os.path.join(new, "stages", "sft-aaaa1111")
    assert rundir.locate_stage_dir("stages/sft-aaaa1111", new) == os.path.join(new, "stages", "sft-aaaa1111")
    assert rundir.locate_stage_dir(os.path.join(old, "stages", "rl-bbbb2222"), new) == \
        os.path.join(old, "stages", "rl-bbbb2222")  # nowhere: as recorded, for the error message
    os.makedirs(recorded)
    assert rundir.locate_stage_dir(recorded, new) == recorded  # it exists where recorded: that one


def test_read_json_errors_name_the_file(tmp_path):
    path = str(tmp_path / "x.json")
    assert rundir.read_json(path, None) is None
    with pytest.raises(RunDirError, match=f"^{path}: no such file$"):
        rundir.read_json(path)
    for text, message in (("{broken", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                          ("[1]", "a JSON array, not an object")):
        with open(path, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(RunDirError, match=f"^{path}: {message}"):
            rundir.read_json(path)
    assert rundir.read_json(path, shape=None) == [1]  # the check is the caller's choice
    rundir.atomic_write_json(path, {"a": [1, 2]})
    assert rundir.read_json(path) == {"a": [1, 2]} and os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("record, message", [
    ([], "a JSON array, not an object"), ({"stages": "abc"}, "'stages' is a JSON string, not an array"),
    ({"stages": [1]}, "stages[0] is a JSON number, not an object"),
    ({"stages": [{"dir": 3}]}, "stages[0].dir is a JSON number, not a string"),
    ({"hardware": [1]}, "'hardware' is a JSON array, not an object"),
    ({"created_at": "today"}, "'created_at' is a JSON string, not a number")])
def test_a_run_record_of_the_wrong_shape_is_named(tmp_path, record, message):
    write(str(tmp_path / "r" / "run.json"), json.dumps(record))
    with pytest.raises(RunDirError, match=re.escape(f"/r/run.json: malformed run.json ({message}")):
        rundir.read_run(str(tmp_path / "r"))


def test_run_references(tmp_path):
    home = str(tmp_path)
    for run_id, name, created in (("d12-aaaa1111", "d12", 1.0), ("d12-aaab2222", "d12", 2.0),
                                  ("d12x-cccc3333", "d12x", 3.0)):
        write(os.path.join(home, "runs", run_id, "run.json"), json.dumps({"run_id": run_id, "name": name,
                                                                          "created_at": created}))
    assert rundir.run_ids(home) == ["d12-aaaa1111", "d12-aaab2222", "d12x-cccc3333"]
    assert rundir.find_run("d12-aaaa1111", home)[0] == "d12-aaaa1111"       # exact id
    assert rundir.find_run("d12", home)[0] == "d12-aaab2222"                # spec name: its newest run
    assert rundir.find_run("d12x-c", home)[0] == "d12x-cccc3333"            # a unique prefix
    with pytest.raises(RunDirError, match=r"^ambiguous run 'd12-aaa' matches 2 runs: d12-aaab2222, d12-aaaa1111$"):
        rundir.find_run("d12-aaa", home)
    with pytest.raises(RunDirError, match=r"^unknown run 'zz' \(no run directory in .*runs; see `nanorun runs`\)$"):
        rundir.find_run("zz", home)
    write(os.path.join(home, "runs", "d12x-cccc3333", "run.json"), "{torn")
    with pytest.raises(RunDirError, match="d12x-cccc3333/run.json: not valid JSON"):
        rundir.find_run("d12x", home)   # only that (unreadable) run's id starts so: its error, not "unknown"
    assert rundir.find_run("d12", home)[0] == "d12-aaab2222"   # the others still resolve


def test_checkpoint_completeness_and_stage_state(tmp_path):
    sdir = str(tmp_path / "base_train-aaaa1111")
    ckpt = os.path.join(sdir, "checkpoints")
    assert rundir.checkpoint_steps(ckpt) == [] and rundir.stage_state(sdir) == "pending"
    for name in ("model_000002.pt", "meta_000002.json", "model_000004.pt", "meta_000006.json"):
        write(os.path.join(ckpt, name), "{}")
    assert rundir.checkpoint_steps(ckpt) == [2]   # 4 has no meta yet, 6 no model
    assert rundir.stage_state(sdir) == "partial"
    rundir.write_result(sdir, "base_train", {"val_bpb": 1.5}, {"checkpoint_dir": ckpt})
    assert rundir.stage_state(sdir) == "done"
    result = rundir.read_result(sdir)
    assert rundir.result_metrics(result) == {"val_bpb": 1.5} and rundir.result_outputs(result)["checkpoint_dir"] == ckpt


def test_event_log_appends_and_tail_reads_whole_lines(tmp_path):
    path = str(tmp_path / "events.jsonl")
    tail = rundir.EventTail(path)
    log = rundir.EventLog(path)
    log.metric(1, loss=2.0)
    log.close()
    with open(path, "a") as f:
        f.write('{"kind": "metric", "st')   # a writer killed mid-line
    assert [e["values"] for e in tail.poll()] == [{"loss": 2.0}]
    log = rundir.EventLog(path)   # the next writer starts on a fresh line
    log.log("status", status="done")
    log.close()
    assert [e["kind"] for _, e in rundir.read_events(path)] == ["metric", "status"]
    assert [e["kind"] for e in tail.poll()] == ["status"]
    assert rundir.EventLog(path, rank=1).enabled is False
