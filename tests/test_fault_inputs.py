"""Issue 14 item 3, the bad-input half of the fault campaign: generated malformed specs and malformed run
directories must never produce a traceback. Every spec gets `validate` and `plan --json`; every broken run
directory gets `runs`, `show`, `leaderboard`, `query` and `registry rebuild` beside a good run, which must stay
listed. An answer is exit 0, or exit 2 with every line of stderr naming the file it is about.

The suite runs a sample (NANORUN_FAULT_CASES, default 16 of each); bench/fault_campaign.sh runs 100 of each and
prints the counts recorded in bench/RESULTS.md. The cases are seeded: a failure names its seed and reproduces with
    NANORUN_FAULT_SEED=<seed> NANORUN_FAULT_CASES=1 .venv/bin/python -m pytest -q tests/test_fault_inputs.py"""

import json
import os
import random
import re
import shutil

import pytest
from click.testing import CliRunner

from conftest import make_run_tree
from runners.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = int(os.environ.get("NANORUN_FAULT_CASES", "16"))
FIRST_SEED = int(os.environ.get("NANORUN_FAULT_SEED", "0"))
SPECS = sorted(os.path.join(ROOT, "specs", f) for f in os.listdir(os.path.join(ROOT, "specs")) if f.endswith(".yaml"))

JUNK_SCALARS = ["-1", "0", "1e400", "-1e400", ".nan", ".inf", "-.inf", "abc", "''", "null", "~", "true", "[]", "{}",
                "[1, [2, [3]]]", "{a: 1}", "0x10", "1_000", "9" * 40, "!!binary aGVsbG8=", "!!python/none ''",
                "&a 1", "*nope", "'\\x00'", '"\\u0000"', "2026-01-01", "1.5", "-0.0", "auto", "AUTO", "H10O-SXM"]


def _scalar_lines(lines):
    return [i for i, line in enumerate(lines) if ":" in line and not line.strip().startswith("#")
            and line.split(":", 1)[1].strip() not in ("", "|", ">")]


def mutate_spec(text, rng):
    """One malformed variant of a spec's text, and what was done to it."""
    lines = text.split("\n")
    kind = rng.choice(["value", "value", "value", "delete", "duplicate", "unknown_key", "indent", "truncate",
                       "bytes", "alias", "tag", "swap", "nest"])
    if kind == "value":
        i = rng.choice(_scalar_lines(lines))
        key, rest = lines[i].split(":", 1)
        comment = "  # " + rest.split("#", 1)[1] if "#" in rest else ""
        lines[i] = f"{key}: {rng.choice(JUNK_SCALARS)}{comment}"
    elif kind == "delete":
        del lines[rng.randrange(len(lines))]
    elif kind == "duplicate":
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif kind == "unknown_key":
        i = rng.choice(_scalar_lines(lines))
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        lines.insert(i, f"{indent}{rng.choice(['depht', 'lr', 'stages2', 'x', 'batch'])}: 1")
    elif kind == "indent":
        i = rng.randrange(len(lines))
        lines[i] = rng.choice(["\t", " ", "   "]) + lines[i]
    elif kind == "truncate":
        return text[:rng.randrange(len(text))], kind
    elif kind == "bytes":
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), kind
    elif kind == "alias":
        lines.insert(0, "x0: &a [1, 2, 3]\nx1: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nx2: [*b, *b, *b, *b, *b, *b, *b]")
    elif kind == "tag":
        i = rng.choice(_scalar_lines(lines))
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: !!python/object/apply:os.getcwd []"
    elif kind == "swap":
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "nest":
        i = rng.choice(_scalar_lines(lines))
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: " + "[" * 200 + "]" * 200
    return "\n".join(lines), kind


def assert_clean(result, path, what):
    """Exit 0, or exit 2 with each stderr line naming `path`; never an exception."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"{what}: {type(exc).__name__}: {exc}\n{result.output}"
    assert result.exit_code in (0, 2), f"{what}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output + result.stderr, f"{what}: traceback\n{result.stderr}"
    if result.exit_code == 2:
        lines = [line for line in result.stderr.split("\n") if line.strip()]
        assert lines, f"{what}: exit 2 without a message"
        if re.fullmatch(r"error: \d+ problems:", lines[0]):  # the header of a list of problems
            lines = lines[1:]
        for line in lines:
            assert path in line, f"{what}: an error line that does not name {path}: {line!r}"


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + CASES))
def test_malformed_spec_is_refused_cleanly(seed, tmp_path, nanorun_home):
    rng = random.Random(seed)
    source = rng.choice(SPECS)
    with open(source) as f:
        text, kind = mutate_spec(f.read(), rng)
    path = str(tmp_path / f"fault_{seed}.yaml")
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    what = f"seed {seed}: {kind} of {os.path.basename(source)}"
    runner = CliRunner()
    validated = runner.invoke(main, ["validate", path])
    assert_clean(validated, path, what + " (validate)")
    planned = runner.invoke(main, ["plan", path, "--json"])
    assert_clean(planned, path, what + " (plan)")
    assert (validated.exit_code == 0) == (planned.exit_code == 0), f"{what}: validate and plan disagree"
    if planned.exit_code == 0:
        json.loads(planned.stdout)


# -----------------------------------------------------------------------------
# Run directories


def break_run(home, run_id, rng):
    """Damage one run's directory the way a crash, a full disk or a hand edit could; returns what was done."""
    run_dir = os.path.join(home, "runs", run_id)
    run_json = os.path.join(run_dir, "run.json")
    with open(run_json) as f:
        run = json.load(f)
    stage = rng.choice(run["stages"])
    target = rng.choice([run_json, os.path.join(stage["dir"], "result.json"),
                         os.path.join(stage["dir"], "events.jsonl"), os.path.join(stage["dir"], "config.json")])
    kind = rng.choice(["truncate", "garbage", "wrong_json", "bytes", "delete", "empty", "field_types",
                       "stage_dir_gone", "huge_line", "symlink_loop"])
    if kind == "stage_dir_gone":
        shutil.rmtree(stage["dir"])
        return f"removed {stage['dir']}"
    if kind == "delete":
        if os.path.exists(target):
            os.remove(target)
        return f"deleted {target}"
    if kind == "symlink_loop":
        if os.path.exists(target):
            os.remove(target)
        os.symlink(target, target)
        return f"symlink loop at {target}"
    if kind == "field_types" and target.endswith(".json"):
        obj = json.load(open(target)) if os.path.exists(target) else {}
        if isinstance(obj, dict) and obj:
            for k in rng.sample(sorted(obj), min(3, len(obj))):
                obj[k] = rng.choice([None, "abc", -1, 1e308, [], {"x": [1]}, True, float("nan")])
        with open(target, "w") as f:
            f.write(json.dumps(obj, allow_nan=True))
        return f"field types in {target}"
    data = open(target, "rb").read() if os.path.exists(target) else b"{}"
    if kind == "truncate":
        data = data[:rng.randrange(max(1, len(data)))]
    elif kind == "garbage":
        data = rng.choice([b"not json", b"[]", b'"abc"', b"42", b"null", b'{"stages": "abc"}', b'{"stages": [1, 2]}',
                           b'{"run_id": 7, "stages": [{"stage": null}]}', b"{" * 10000])
    elif kind == "wrong_json":
        data = json.dumps(rng.choice([[], "x", 3.5, {"stages": {"a": 1}}, {"metrics": "x"}, {"run_id": None}])).encode()
    elif kind == "bytes":
        data = bytearray(data or b"{}")
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    elif kind == "empty":
        data = b""
    elif kind == "huge_line":
        data = data + b'{"time": 1, "kind": "metric", "step": 1, "values": {"x": "' + b"y" * 2_000_000 + b'"}}\n'
    with open(target, "wb") as f:
        f.write(data)
    return f"{kind} of {target}"


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + CASES))
def test_malformed_run_directory_never_breaks_the_registry(seed, nanorun_home):
    rng = random.Random(1000 + seed)
    make_run_tree(nanorun_home, "good", seed=0, run_id="good-0000", real_names=True)
    make_run_tree(nanorun_home, "bad", seed=1, run_id="bad-1111", real_names=rng.random() < 0.5,
                  status=rng.choice(["success", "running", "interrupted"]))
    what = f"seed {seed}: " + break_run(nanorun_home, "bad-1111", rng)
    runner = CliRunner()
    for args in (["registry", "rebuild"], ["runs", "--json"], ["show", "bad-1111"], ["show", "good-0000"],
                 ["leaderboard"], ["query", "select run_id from runs order by run_id"], ["runs"]):
        result = runner.invoke(main, args)
        exc = result.exception
        assert exc is None or isinstance(exc, SystemExit), f"{what}: {args}: {type(exc).__name__}: {exc}"
        assert result.exit_code in (0, 2), f"{what}: {args}: exit {result.exit_code}\n{result.output}"
        assert "Traceback" not in result.output + result.stderr, f"{what}: {args}\n{result.stderr}"
        if args == ["runs", "--json"]:
            assert "good-0000" in [r["run_id"] for r in json.loads(result.stdout)], f"{what}: the good run is gone"
        if args == ["show", "good-0000"]:
            assert result.exit_code == 0, f"{what}: {args}\n{result.output}"
        if args[0] == "show" and result.exit_code == 2:
            assert "bad-1111" in result.stderr, f"{what}: {args}: the error does not name the run\n{result.stderr}"
