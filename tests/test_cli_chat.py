"""`nanorun chat` with a real tiny checkpoint + tokenizer: one-shot and interactive sessions through the real CLI
in a subprocess (deterministic at -t 0), run/checkpoint resolution (sft preferred, newest run by default), and
one-line errors. Run: .venv/bin/pytest tests/test_cli_chat.py"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from runners.cli import main
from runners.cli_chat import resolve_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(home, run_id, tokenizer_dir, checkpoint_dir, stages=("tok_train", "base_train"), created_at=None):
    """run.json + stage directories whose result.json outputs point at the tokenizer and checkpoint."""
    entries = []
    for stage in stages:
        sdir = os.path.join(home, "stages", f"{stage}-{run_id[-4:]}{len(entries)}")
        os.makedirs(sdir)
        outputs = {"tokenizer_dir": tokenizer_dir} if stage == "tok_train" else {"checkpoint_dir": checkpoint_dir}
        with open(os.path.join(sdir, "result.json"), "w") as f:
            json.dump({"stage": stage, "status": "success", "metrics": {}, "outputs": outputs}, f)
        entries.append({"stage": stage, "key": "k", "dir": sdir, "status": "success"})
    os.makedirs(os.path.join(home, "runs", run_id))
    record = {"run_id": run_id, "name": run_id.split("-")[0], "status": "success", "stages": entries,
              "created_at": created_at if created_at is not None else time.time()}
    with open(os.path.join(home, "runs", run_id, "run.json"), "w") as f:
        json.dump(record, f)


def nanorun(home, *args, stdin=None):
    env = dict(os.environ, NANORUN_HOME=home, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", "from runners.cli import main; main()", *args],
                          input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.fixture
def home_with_runs(nanorun_home, tiny_tokenizer_dir, tiny_checkpoint):
    sft_dir = os.path.join(nanorun_home, "sft_ckpt")
    shutil.copytree(tiny_checkpoint, sft_dir)
    make_run(nanorun_home, "base-aaaa1111", tiny_tokenizer_dir, tiny_checkpoint, created_at=100.0)
    make_run(nanorun_home, "chat-bbbb2222", tiny_tokenizer_dir, sft_dir,
             stages=("tok_train", "base_train", "sft"), created_at=200.0)
    return nanorun_home


def test_one_shot_base_run_streams_and_is_deterministic(home_with_runs):
    first = nanorun(home_with_runs, "chat", "base-aaaa1111", "-p", "hello", "--max-tokens", "8", "-t", "0")
    assert first.returncode == 0, first.stderr
    assert "base model" in first.stderr and "step 5" in first.stderr
    assert first.stdout.endswith("\n") and len(first.stdout) > 1
    again = nanorun(home_with_runs, "chat", "base", "-p", "hello", "--max-tokens", "8", "-t", "0")  # spec name
    assert again.returncode == 0 and again.stdout == first.stdout
    other = nanorun(home_with_runs, "chat", "base-aaaa1111", "-p", "the king walked", "--max-tokens", "8", "-t", "0")
    assert other.returncode == 0 and other.stdout != first.stdout


def test_interactive_chat_session(home_with_runs):
    # no RUN: the newest run with a checkpoint, and its sft checkpoint (a chat model)
    out = nanorun(home_with_runs, "chat", "--max-tokens", "6", "-t", "0", stdin="hello\nclear\nhello\nquit\nnever\n")
    assert out.returncode == 0, out.stderr
    assert "run chat-bbbb2222 sft step 5" in out.stderr and "base model" not in out.stderr
    assert "(conversation cleared)" in out.stderr
    one_shot = nanorun(home_with_runs, "chat", "chat-bbbb", "-p", "hello", "--max-tokens", "6", "-t", "0")
    assert one_shot.returncode == 0 and len(one_shot.stdout) > 1
    # after clear the same prompt answers the same; "never" after quit is not read
    assert out.stdout == one_shot.stdout * 2
    no_clear = nanorun(home_with_runs, "chat", "--max-tokens", "6", "-t", "0", stdin="hello\nhello\n")
    assert no_clear.returncode == 0 and no_clear.stdout.startswith(one_shot.stdout)
    assert no_clear.stdout != out.stdout    # the second turn saw the first in its context


def test_long_interactive_chat_trims_history_instead_of_crashing(home_with_runs):
    """Turns of ~20 tokens with sequence_len 48: without trimming the history passes 10x sequence_len."""
    line = "the king walked to the sea with his people in the morning\n"
    out = nanorun(home_with_runs, "chat", "chat-bbbb2222", "--max-tokens", "16", "-t", "0.9", stdin=line * 30)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("\n") >= 30 and "Traceback" not in out.stderr


def test_resolution_prefers_chat_stage_and_explicit_dirs(home_with_runs, tiny_tokenizer_dir, tiny_checkpoint):
    target = resolve_target(home_with_runs)
    assert target["run_id"] == "chat-bbbb2222" and target["stage"] == "sft" and target["chat"]
    assert target["tokenizer_dir"] == tiny_tokenizer_dir
    target = resolve_target(home_with_runs, "base-aaaa1111")
    assert target["stage"] == "base_train" and not target["chat"]
    target = resolve_target(home_with_runs, checkpoint_dir=tiny_checkpoint, tokenizer_dir=tiny_tokenizer_dir)
    assert target["run_id"] is None and target["checkpoint_dir"] == tiny_checkpoint and not target["chat"]


def test_errors_are_one_line(nanorun_home, home_with_runs, tiny_tokenizer_dir, tmp_path):
    runner = CliRunner()

    def fails(*args, code=2):
        result = runner.invoke(main, ["chat", *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        return lines[0]

    assert "unknown run 'nope'" in fails("nope", "-p", "hi")
    make_run(nanorun_home, "empty-cccc3333", tiny_tokenizer_dir, str(tmp_path / "missing"), created_at=300.0)
    assert "run empty-cccc3333 has no checkpoint yet" in fails("empty-cccc3333", "-p", "hi")
    assert "no checkpoint in" in fails("--checkpoint-dir", str(tmp_path), "--tokenizer-dir", tiny_tokenizer_dir)
    assert "no tokenizer in" in fails("base-aaaa1111", "--tokenizer-dir", str(tmp_path))
    assert "checkpoint step 7 not found" in fails("base-aaaa1111", "--step", "7", "-p", "hi")
    make_run(nanorun_home, "base2-dddd4444", tiny_tokenizer_dir, str(tmp_path / "missing"), created_at=400.0)
    assert "ambiguous run 'bas' matches 2 runs" in fails("bas", "-p", "hi")


@pytest.mark.parametrize("content", ["{broken", "[]", '{"run_id": "base-aaaa1111", "stages": "abc"}',
                                     '{"stages": [{"key": 5}]}', '{"created_at": "yesterday"}'])
def test_a_corrupt_run_json_is_one_line_naming_it(home_with_runs, content):
    path = os.path.join(home_with_runs, "runs", "base-aaaa1111", "run.json")
    with open(path, "w") as f:
        f.write(content)
    for command in ("chat", "serve"):
        for ref in ("base-aaaa1111", "base-aa"):   # its id, or a prefix that only it matches
            result = CliRunner().invoke(main, [command, ref, "-p", "hi"] if command == "chat" else [command, ref],
                                        catch_exceptions=False)
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1, result.output
            assert lines[0].startswith(f"error: {path}: ") and ("not valid JSON" in lines[0] or "malformed" in lines[0])
    # without RUN the broken run is no candidate: the newest good run is chosen
    assert resolve_target(home_with_runs)["run_id"] == "chat-bbbb2222"


def test_no_runs_at_all(nanorun_home):
    result = CliRunner().invoke(main, ["chat", "-p", "hi"], catch_exceptions=False)
    assert result.exit_code == 2 and "no run with a checkpoint" in result.output
