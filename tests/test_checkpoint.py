"""Checkpoint atomicity at the file level: overwriting a step, a save killed midway, leftovers of killed writers,
and the event log's torn last line. Run: .venv/bin/pytest tests/test_checkpoint.py"""

import json
import os

import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import list_steps, load_checkpoint, remove_partial_files, save_checkpoint
from nanochat.common import EventLog


def save(ckpt, step, value):
    save_checkpoint(str(ckpt), step, {"w": torch.full((2,), float(value))}, {"opt": value}, {"tag": value},
                    rank_state={"loader": value})


def test_a_step_overwritten_by_a_killed_save_is_no_longer_complete(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    save(ckpt, 2, 1)
    save(ckpt, 4, 1)
    calls = []

    def dies_on_the_optimizer_file(obj, path):
        calls.append(path)
        if "optim_" in path:
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, path)
    real_save = checkpoint.atomic_torch_save
    monkeypatch.setattr(checkpoint, "atomic_torch_save", dies_on_the_optimizer_file)
    with pytest.raises(KeyboardInterrupt):
        save(ckpt, 4, 2)  # the new model file is written, then the kill
    assert any("model_000004" in p for p in calls)
    # step 4 now mixes a new model with the old optimizer: it must not count, and step 2 is the last complete one
    assert list_steps(str(ckpt)) == [2]
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real_save)
    save(ckpt, 4, 3)
    model_state, optim_state, meta, rank_state = load_checkpoint(str(ckpt), 4)
    assert (model_state["w"][0].item(), optim_state["opt"], meta["tag"], rank_state["loader"]) == (3, 3, 3, 3)


def test_remove_partial_files_deletes_only_temporaries(tmp_path):
    ckpt = tmp_path / "ckpt"
    save(ckpt, 1, 1)
    (ckpt / "model_000002.pt.tmp.12345").write_bytes(b"half a file")
    (ckpt / "notes.tmp").write_text("not ours")
    assert remove_partial_files(str(ckpt)) == ["model_000002.pt.tmp.12345"]
    assert sorted(os.listdir(ckpt)) == sorted(["model_000001.pt", "optim_000001_rank0.pt", "state_000001_rank0.pt",
                                               "meta_000001.json", "notes.tmp"])
    assert remove_partial_files(str(tmp_path / "absent")) == []


def test_event_log_starts_a_new_line_after_a_torn_one(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"kind": "log", "message": "whole"}) + "\n" + '{"kind": "metric", "step": 3, "val')
    events = EventLog(str(path))
    events.log("status", status="running")
    events.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["status"] == "running"
    events = EventLog(str(path))  # a clean end gets no blank line
    events.log("status", status="done")
    events.close()
    assert len(path.read_text().splitlines()) == 4
