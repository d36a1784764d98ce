"""
Studies (issue 12 items 1-3): a spec with a `sweep:` block expands into cells (each an ordinary spec and run),
every problem is reported at the sweep entry, `nanorun plan STUDY [--json]` lists the cells and totals, and
`nanorun apply STUDY` runs them with a scheduler: a real tiny CPU study with a failing cell, a killed apply that
continues where it stopped, a grid value added later (only the new cell runs), and deleted cells marked missing.

    .venv/bin/python -m pytest -q tests/test_study.py
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import specs
from conftest import _tiny_texts
from nanochat.rundir import checkpoint_steps
from runners.cli import main
from runners.plan import make_plan
from runners.study import plan_study
from runners.study_apply import device_groups, next_cells
from specs.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
NANORUN = [sys.executable, "-c", "import sys; sys.argv[0] = 'nanorun'; from runners.cli import main; main()"]

BASE = """\
name: tiny_study
hardware: {{gpu: cpu, device_type: cpu}}
data:
  train:
    - {{source: text, path: {text}}}
tokenizer: {{vocab_size: 300, max_chars: 200000}}
model: {{depth: 1, head_dim: 64, max_seq_len: 64, window_pattern: L}}
train:
  num_iterations: {iterations}
  device_batch_size: 4
  total_batch_size: 256
  warmup_steps: 1
  eval_every: -1
  eval_tokens: 256
  sample_every: -1
  core_metric_every: -1
  save_every: 2
  compile: false
stages: [data, tok_train, base_train]
"""


def write(path, text):
    Path(path).write_text(text)
    return str(path)


def study_text(sweep, text="/nonexistent/text", iterations=8):
    return BASE.format(text=text, iterations=iterations) + "sweep:\n" + sweep


def cli(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home"))


# --- expansion --------------------------------------------------------------------------------------

def test_grid_and_seeds_expand_into_ordinary_cell_specs(tmp_path):
    path = write(tmp_path / "s.yaml", study_text(
        "  grid:\n    model.depth: [1, 2]\n    train.matrix_lr: [0.01, 0.02, 0.04]\n  seeds: 2\n"))
    study = specs.read_study(path)
    assert study.name == "tiny_study" and len(study.cells) == 2 * 3 * 2
    first, last = study.cells[0], study.cells[-1]
    assert first.overrides == {"model.depth": 1, "train.matrix_lr": 0.01, "seed": 0}
    assert last.overrides == {"model.depth": 2, "train.matrix_lr": 0.04, "seed": 1}
    assert [c.overrides["seed"] for c in study.cells[:4]] == [0, 1, 0, 1]   # seeds innermost
    assert last.spec.model.depth == 2 and last.spec.train.matrix_lr == 0.04 and last.spec.seed == 1
    assert last.spec.sweep is None and "study:tiny_study" in last.spec.tags
    # everything else is the base's
    assert last.spec.train.num_iterations == 8 and last.spec.tokenizer.vocab_size == 300
    # named after the study and the values (seeds of one recipe share a name); run ids differ per cell
    assert first.spec.name == "tiny_study.depth1.matrix_lr0.01" and first.label == \
        "model.depth=1 train.matrix_lr=0.01 seed=0"
    plans = [make_plan(c.spec) for c in study.cells]
    assert len({p.run_id for p in plans}) == len(plans)
    # stages the cells share (data, tokenizer) have one content key; training differs per cell
    for stage, n in (("data", 1), ("tok_train", 1), ("base_train", 12)):
        assert len({p.stage(stage).key for p in plans}) == n, stage
    # a cell spec written out (as apply does) loads back to the same run
    again = specs.load_text(specs.dump_yaml(last.spec), "cell.yaml")
    assert make_plan(again).run_id == plans[-1].run_id


def test_max_parallel_and_the_launcher_change_no_run_id(tmp_path):
    """How many cells run at once, and where, is not what a cell computes: the same run ids and study hash."""
    sweep = "  grid:\n    model.depth: [1, 2]\n"
    plain = write(tmp_path / "a.yaml", study_text(sweep))
    slurm = write(tmp_path / "b.yaml", study_text(sweep + "  max_parallel: 1\n").replace(
        "device_type: cpu}", "device_type: cpu, launcher: slurm}"))
    a, b = specs.read_study(plain), specs.read_study(slurm)
    assert b.spec.sweep.max_parallel == 1 and b.spec.hardware.launcher == "slurm"
    assert specs.spec_hash(a.spec) == specs.spec_hash(b.spec)
    runs = [[make_plan(c.spec).run_id for c in study.cells] for study in (a, b)]
    assert runs[0] == runs[1] and len(set(runs[0])) == 2


def test_a_cell_equal_to_the_base_is_the_plain_spec_run(tmp_path):
    """The sweep block changes nothing for specs without one: same stage keys and run id as before studies."""
    plain = write(tmp_path / "plain.yaml", BASE.format(text="/x", iterations=8))
    study = specs.read_study(write(tmp_path / "s.yaml", study_text("  grid:\n    model.depth: [1]\n", "/x")))
    assert specs.read_study(plain) is None
    base = make_plan(specs.load(plain))
    cell = make_plan(study.cells[0].spec)
    assert [s.key for s in cell.stages] == [s.key for s in base.stages]
    assert specs.dump_yaml(specs.load(plain)).count("sweep") == 0
    assert "sweep" not in specs.load(plain).model_dump(exclude_none=True)


def test_list_items_and_stage_options_can_be_swept(tmp_path):
    text = study_text("  grid:\n    data.train.0.weight: [1.0, 2.0]\n    stages.base_eval.max_per_task: [3]\n"
                      "    tokenizer.doc_cap: [500]\n")
    text = text.replace("stages: [data, tok_train, base_train]",
                        "stages: [data, tok_train, base_train, {base_eval: {eval: bpb}}]")
    study = specs.read_study(write(tmp_path / "s.yaml", text))
    cell = study.cells[1]
    assert cell.spec.data.train[0].weight == 2.0 and cell.spec.tokenizer.doc_cap == 500
    assert specs.stage_options(cell.spec, "base_eval") == {**specs.stage_options(cell.spec, "base_eval"),
                                                          "eval": "bpb", "max_per_task": 3}


# --- bad input: every problem at its sweep entry ------------------------------------------------------

BAD_SWEEP = """\
  grid:
    model.depht: [2]
    tokenizer.vocab_size: []
    train.target_flops: [1e9]
    model.head_dim: 64
  seeds: 2
"""


def test_grid_problems_point_at_their_entries(tmp_path):
    path = write(tmp_path / "bad.yaml", study_text(BAD_SWEEP))
    assert specs.validate(path) == [   # all at once, beside the schema's own problems
        f"{path}:22:5: sweep.grid.model.depht: unknown field 'depht' in model (did you mean 'depth'?)",
        f"{path}:23:27: sweep.grid.tokenizer.vocab_size: an empty list: give at least one value",
        f"{path}:25:21: sweep.grid.model.head_dim: expected a list (got 64)",
    ]
    twice = write(tmp_path / "twice.yaml", study_text("  grid:\n    train.warmup_steps: [1, 2, 1]\n"))
    assert specs.validate(twice) == [f"{twice}:22:25: sweep.grid.train.warmup_steps: 1 is listed twice (it would "
                                     f"be the same runs)"]
    with pytest.raises(SpecError) as e:
        specs.load(twice)
    assert e.value.problems == specs.validate(twice)


def test_cell_problems_point_at_the_value_and_name_the_cells(tmp_path):
    path = write(tmp_path / "bad.yaml", study_text(
        "  grid:\n    model.depth: [1, 0]\n    train.target_flops: [1e9, 2e9]\n"))
    assert specs.validate(path) == [
        f"{path}:22:22: sweep.grid.model.depth: model.depth: must be >= 1 (got 0) (cells 3, 4 of 4)",
        f"{path}:23:26: sweep.grid.train.target_flops: conflicting horizons: num_iterations 8 and target_flops 1e9 "
        f"are both set; set one of them to -1 (cell 1 of 4: model.depth=1 train.target_flops=1e9)",
        f"{path}:23:31: sweep.grid.train.target_flops: conflicting horizons: num_iterations 8 and target_flops 2e9 "
        f"are both set; set one of them to -1 (cell 2 of 4: model.depth=1 train.target_flops=2e9)",
    ]
    # plan-time problems (a model that cannot fit the device) are placed the same way
    big = write(tmp_path / "big.yaml", study_text("  grid:\n    model.depth: [1, 400]\n    model.aspect_ratio: [64]\n"))
    code, out, err = cli(["plan", big])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {big}:22:22: sweep.grid.model.depth: ")
    assert lines[0].endswith("(cell 2 of 2: model.depth=400 model.aspect_ratio=64)")
    code, _, err = cli(["validate", big])
    assert code == 2 and err.strip().splitlines() == [lines[0][len("error: "):]]


def test_bad_studies_are_one_line_each_exit_2_and_start_nothing(tmp_path):
    home = os.environ["NANORUN_HOME"]
    unknown = write(tmp_path / "unknown.yaml", study_text("  grid:\n    model.widht: [64]\n"))
    horizons = write(tmp_path / "horizons.yaml", study_text("  grid:\n    train.target_flops: [1e9]\n"))
    huge = write(tmp_path / "huge.yaml", study_text(
        "  grid:\n    train.matrix_lr: [" + ", ".join(f"0.{i:03d}" for i in range(1, 21)) + "]\n"
        "    train.warmup_steps: [" + ", ".join(map(str, range(51))) + "]\n"))
    expected = {
        unknown: f"error: {unknown}:22:5: sweep.grid.model.widht: unknown field 'widht' in model",
        horizons: f"error: {horizons}:22:26: sweep.grid.train.target_flops: conflicting horizons: num_iterations 8 and "
                  f"target_flops 1e9 are both set; set one of them to -1 (cell 1 of 1: train.target_flops=1e9)",
        huge: f"error: {huge}:20:1: sweep: 1,020 cells (20 train.matrix_lr x 51 train.warmup_steps) is over 1,000; "
              f"pass --yes to plan or apply that many",
    }
    for path, line in expected.items():
        # --yes confirms an apply, and so a study of any size: without it, the size is refused before anything else
        for command in (["apply", path] + (["--yes"] if path != huge else []), ["plan", path]):
            code, out, err = cli(command)
            assert (code, out, err.strip().splitlines()) == (2, "", [line]), command
    assert not os.path.exists(home)   # nothing started, nothing written
    code, out, _ = cli(["plan", huge, "--yes", "--json"])   # asked for: planned
    assert code == 0 and len(json.loads(out)["cells"]) == 1020


# --- plan ---------------------------------------------------------------------------------------------

def test_plan_json_lists_every_cell_and_the_totals(tmp_path):
    code, out, _ = cli(["plan", str(ROOT / "specs" / "scaling_laws.yaml"), "--json"])
    assert code == 0
    report = json.loads(out)
    assert report["study"] == "scaling_laws" and len(report["cells"]) == 24
    cell = report["cells"][0]
    assert {"cell", "run_id", "overrides", "derived", "estimate", "state", "stages"} <= set(cell)
    assert cell["overrides"] == {"model.depth": 10, "train.target_flops": 1e18, "seed": 0}
    assert {"depth", "n_embd", "params", "tokens", "total_batch_size", "num_iterations", "matrix_lr",
            "flops"} <= set(cell["derived"])
    assert cell["derived"]["depth"] == 10 and cell["derived"]["n_embd"] == 640 and cell["state"] == "pending"
    depths = sorted({c["derived"]["depth"] for c in report["cells"]})
    budgets = sorted({c["overrides"]["train.target_flops"] for c in report["cells"]})
    assert depths == [10, 12, 14, 16, 18, 20] and budgets == [1e18, 2.15e18, 4.64e18, 1e19]
    for c in report["cells"]:   # the FLOP budget sets each horizon (ratio -1, as the reference runs it)
        assert c["derived"]["horizon"] == "target_flops"
        assert abs(c["derived"]["flops"] - c["overrides"]["train.target_flops"]) / c["derived"]["flops"] < 0.01
    t = report["totals"]
    assert t["cells"] == 24 and t["flops"] == pytest.approx(sum(c["estimate"]["flops"] for c in report["cells"]))
    assert t["usd"] > 0 and t["seconds"] > 0 and t["states"] == {"pending": 24}
    assert {s["stage"] for s in report["shared_stages"] if s["cells"] == 24} == {"data", "tok_train"}
    assert len({c["run_id"] for c in report["cells"]}) == 24

    code, text, _ = cli(["plan", str(ROOT / "specs" / "miniseries.yaml")])
    assert code == 0 and "8 cells = 8 model.depth" in text and "miniseries.depth26-" in text and "total" in text


def test_validate_and_plan_judge_the_cells_not_an_overridden_base_value(tmp_path):
    # found by the full fault campaign: the base's depth 1000 cannot fit in memory, but every cell sets its own depth,
    # so the base's never runs: validate (which planned the base) refused what plan and apply accept
    path = write(tmp_path / "s.yaml", study_text("  grid:\n    model.depth: [1, 2]\n").replace(
        "model: {depth: 1,", "model: {depth: 1000,"))
    assert cli(["validate", path])[:2] == (0, f"{path}: ok\n")
    assert cli(["plan", path])[0] == 0
    # a cell that cannot fit is refused by both, at its sweep value
    big = write(tmp_path / "big.yaml", study_text("  grid:\n    model.depth: [1, 1000]\n"))
    for command in ("validate", "plan"):
        refused = CliRunner().invoke(main, [command, big])
        assert refused.exit_code == 2 and "sweep.grid.model.depth" in refused.stderr, (command, refused.stderr)


def test_shipped_studies_are_the_reference_grids():
    laws = specs.load(ROOT / "specs" / "scaling_laws.yaml")
    assert laws.sweep.grid == {"model.depth": [10, 12, 14, 16, 18, 20],
                               "train.target_flops": [1e18, 2.15e18, 4.64e18, 1e19]}
    assert laws.train.target_param_data_ratio == -1 and laws.hardware.gpus_per_node == 8
    assert "core" in specs.stage_options(laws, "base_eval")["eval"]
    assert specs.stage_options(laws, "base_eval")["max_per_task"] == -1   # full CORE
    series = specs.read_study(ROOT / "specs" / "miniseries.yaml")
    assert [c.spec.model.depth for c in series.cells] == list(range(12, 27, 2))
    # the CPU study (bench/RESULTS.md has its run): offline data, 4 depths x 3 budgets, every cell a CPU run whose
    # horizon is its budget
    demo = specs.read_study(ROOT / "specs" / "scaling_demo.yaml")
    assert [(c.spec.model.depth, c.spec.train.target_flops) for c in demo.cells] == \
        [(d, c) for d in (1, 2, 3, 4) for c in (1.25e12, 2.5e12, 5e12)]
    assert {s.source for s in demo.spec.data.train} == {"demo"} and demo.spec.hardware.gpu == "cpu"
    assert all(c.spec.train.target_param_data_ratio == -1 for c in demo.cells)
    assert specs.stage_names(demo.spec) == ["data", "tok_train", "base_train"]


# --- the scheduler's decisions --------------------------------------------------------------------------

def test_cells_share_the_node_gpus_and_wait_for_shared_stages(tmp_path):
    text = study_text("  grid:\n    model.depth: [1, 2, 3]\n  gpus_per_cell: 2\n").replace(
        "hardware: {gpu: cpu, device_type: cpu}", "hardware: {gpu: H100-SXM, gpus_per_node: 8}").replace(
        "total_batch_size: 256", "total_batch_size: 2048")
    study = specs.read_study(write(tmp_path / "gpu.yaml", text))
    assert all(c.spec.hardware.gpus_per_node == 2 for c in study.cells)   # each cell runs on its 2 GPUs
    assert device_groups(study.spec, {}) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert device_groups(study.spec, {"CUDA_VISIBLE_DEVICES": "4,5,6"}) == [["4", "5"]]
    cpu = specs.read_study(write(tmp_path / "cpu.yaml", study_text("  grid:\n    model.depth: [1, 2]\n")))
    assert device_groups(cpu.spec, {}) == [None]   # CPU: one cell at a time, every core

    keys = {"a": {"data", "tok", "train_a"}, "b": {"data", "tok", "train_b"}, "c": {"train_c"}}
    groups = [["0", "1"], ["2", "3"]]
    # nothing runs: the first cell starts; the second needs the same data/tokenizer stages, so it waits; the third
    # shares nothing and takes the other GPUs
    assert next_cells(["a", "b", "c"], groups, [], keys.get) == [("a", ["0", "1"]), ("c", ["2", "3"])]
    # once a's shared stages are done, b starts beside it
    assert next_cells(["b"], groups[1:], [{"train_a"}], keys.get) == [("b", ["2", "3"])]
    assert next_cells(["b"], [], [{"train_a"}], keys.get) == []   # no free GPUs


# --- a real study on CPU ------------------------------------------------------------------------------

def nanorun(args, home, timeout=600):
    return subprocess.run(NANORUN + list(args), env=dict(os.environ, NANORUN_HOME=home), capture_output=True,
                          text=True, timeout=timeout)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def processes_with_arg(text):
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[-1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if text in cmdline and not zombie:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_apply_runs_cells_survives_a_kill_and_a_failure_and_grows_with_the_grid(tmp_path):
    home = str(tmp_path / "home")
    corpus, empty = tmp_path / "text", tmp_path / "empty"
    corpus.mkdir()
    empty.mkdir()
    for i, doc in enumerate(_tiny_texts(7, 40)):
        (corpus / f"doc_{i:03d}.txt").write_text(doc)
    spec = str(tmp_path / "study.yaml")
    write(spec, study_text(f"  grid:\n    data.train.0.path: [{corpus}, {empty}]\n    model.depth: [1]\n", corpus))
    os.environ["NANORUN_HOME"] = home   # for the planning below (the fixture restores it)
    splan = plan_study(specs.read_study(spec))
    (good, good_plan), (bad, bad_plan) = splan.cells()
    train_dir = good_plan.stage("base_train").stage_dir(home)
    record_path = os.path.join(home, "studies", "tiny_study", "study.json")

    # 1. a killed apply: Ctrl-C while the first cell trains stops that cell's apply and its trainer
    log_path = str(tmp_path / "apply1.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(NANORUN + ["apply", spec, "--yes"], env=dict(os.environ, NANORUN_HOME=home),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ckpt = os.path.join(train_dir, "checkpoints")
    deadline = time.time() + 300
    while not checkpoint_steps(ckpt):  # a complete checkpoint (a meta_*.tmp.PID is a save still under way)
        assert proc.poll() is None, open(log_path).read()[-3000:]
        assert time.time() < deadline, open(log_path).read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, open(log_path).read()[-3000:]
    out = open(log_path).read()
    assert "continues where it stopped" in out and "Traceback" not in out
    assert "[study tiny_study] 0/2 done, 1 running, 0 failed, 1 pending" in out
    record = read_json(record_path)
    assert record["status"] == "interrupted"
    assert [c["status"] for c in record["cells"]] == ["interrupted", "pending"]
    assert read_json(os.path.join(home, "runs", good_plan.run_id, "run.json"))["status"] == "interrupted"
    assert not os.path.exists(os.path.join(train_dir, "result.json"))
    deadline = time.time() + 60
    while processes_with_arg(os.path.join(train_dir, "config.json")) and time.time() < deadline:
        time.sleep(0.1)
    assert processes_with_arg(os.path.join(train_dir, "config.json")) == []

    # 2. apply again: the first cell resumes and finishes, the second fails; the failure stops nothing else
    again = nanorun(["apply", spec, "--yes"], home)
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[cell 1/2] done" in again.stdout and "[cell 2/2] failed (exit 1)" in again.stdout
    assert "need at least 2 non-empty" in again.stdout
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: study tiny_study: 1 of 2 cells failed (cell 2: ")
    assert "resuming from step" in open(os.path.join(train_dir, "stdout.log")).read()
    assert read_json(os.path.join(home, "runs", good_plan.run_id, "run.json"))["status"] == "success"
    assert read_json(os.path.join(home, "runs", bad_plan.run_id, "run.json"))["status"] == "failed"
    report = json.loads(nanorun(["plan", spec, "--json"], home).stdout)
    assert [c["state"] for c in report["cells"]] == ["done", "failed"]
    assert "need at least 2 non-empty" in report["cells"][1]["error"]
    before = {name: os.stat(os.path.join(train_dir, name)).st_mtime_ns for name in os.listdir(train_dir)}

    # 3. the grid grows (and drops the failing value): only the new cell runs
    write(spec, study_text(f"  grid:\n    data.train.0.path: [{corpus}]\n    model.depth: [1, 2]\n", corpus))
    third = nanorun(["apply", spec, "--yes"], home)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "1 of 2 cells are done already, skipping them" in third.stdout
    assert third.stdout.count("starting") == 1
    assert f"[cell 2/2] starting data.train.0.path={corpus} model.depth=2 -> run" in third.stdout
    assert "study tiny_study: 2/2 cells done" in third.stdout
    assert {n: os.stat(os.path.join(train_dir, n)).st_mtime_ns for n in os.listdir(train_dir)} == before
    record = read_json(record_path)
    assert [c["status"] for c in record["cells"]] == ["success", "success"] and record["applies"] == 3
    assert [c["run_id"] for c in record["retired"]] == [bad_plan.run_id]   # kept, not lost
    new_run = record["cells"][1]["run_id"]
    run = read_json(os.path.join(home, "runs", new_run, "run.json"))
    assert run["status"] == "success" and run["name"].endswith(".depth2")
    assert [s["status"] for s in run["stages"]] == ["cached", "cached", "success"]   # data, tokenizer shared

    # 4. a cell deleted from disk still shows, marked missing
    shutil.rmtree(os.path.join(home, "runs", good_plan.run_id))
    report = json.loads(nanorun(["plan", spec, "--json"], home).stdout)
    assert [c["state"] for c in report["cells"]] == ["missing", "done"]
    text = nanorun(["plan", spec], home).stdout
    assert "missing!" in text and "deleted" in text
    status = nanorun(["study", "status", "tiny_study", "--json"], home)
    assert status.returncode == 0, status.stderr
    assert [c["state"] for c in json.loads(status.stdout)["cells"]] == ["missing", "done"]
