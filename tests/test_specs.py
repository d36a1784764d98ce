"""
Tests of the spec layer: shipped specs load, bad specs give golden FILE:LINE:COL messages, every problem is
reported at once, models are frozen, spec_hash is stable and sensitive, dump_yaml round-trips.

    .venv/bin/pytest -q tests/test_specs.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

import specs
from specs.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "bad_specs"
SHIPPED = sorted((ROOT / "specs").glob("*.yaml"))

MINIMAL = "name: mini\ndata:\n  train:\n    - {source: demo}\nmodel:\n  depth: 4\n"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home"))


# --- shipped specs ----------------------------------------------------------------------------------

def test_the_expected_specs_ship():
    names = {p.name for p in SHIPPED}
    assert {"speedrun_d26.yaml", "d12.yaml", "d20.yaml", "d24.yaml", "cpu_demo.yaml"} <= names
    assert [p.name for p in specs.shipped_specs()] == [p.name for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_loads(path):
    assert specs.validate(path) == []
    spec = specs.load(path)
    assert spec.name == path.stem
    assert specs.stage_names(spec)[0] == "data"
    assert specs.load_text(specs.dump_yaml(spec), "dumped.yaml") == spec
    path.read_text(encoding="ascii")   # ASCII only, like the code


def test_speedrun_matches_the_reference():
    spec = specs.load(ROOT / "specs" / "speedrun_d26.yaml")
    assert spec.model.depth == 26 and spec.train.target_param_data_ratio == 8.25
    assert spec.train.device_batch_size == 16 and spec.train.fp8 is True
    assert (spec.hardware.nodes, spec.hardware.gpus_per_node, spec.hardware.usd_per_gpu_hour) == (1, 8, 3.0)
    assert spec.hardware.world_size == 8
    assert spec.data.train[0].source == "climbmix" and spec.data.train[0].shards == 170
    assert specs.vocab_size(spec) == 32768 and spec.tokenizer.max_chars == 2_000_000_000
    assert specs.stage_names(spec) == ["data", "tok_train", "base_train", "base_eval", "sft", "chat_eval"]
    # fields left out keep the reference defaults
    assert spec.train.matrix_lr == 0.02 and spec.train.warmdown_ratio == 0.65 and spec.model.window_pattern == "SSSL"


def test_cpu_demo_is_offline_and_small():
    spec = specs.load(ROOT / "specs" / "cpu_demo.yaml")
    assert spec.hardware.gpu == "cpu" and spec.hardware.device_type == "cpu"
    assert [s.source for s in spec.data.train] == ["demo"]
    assert 4096 <= specs.vocab_size(spec) <= 8192 and spec.model.depth == 4 and spec.model.window_pattern == "L"
    assert spec.train.num_iterations > 0 and spec.train.save_every > 0 and spec.train.core_metric_every == -1
    opts = specs.stage_options(spec, "base_eval")
    assert opts["bundle"] == "offline" and opts["max_per_task"] > 0
    assert opts["device_batch_size"] == spec.train.device_batch_size   # inherited from train


# --- golden bad specs -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_spec_golden_messages(path):
    expected = [f"{path}:{line}" for line in path.with_suffix(".txt").read_text().splitlines()]
    assert expected, "a golden file must list at least one problem"
    assert specs.validate(path) == expected
    with pytest.raises(SpecError) as e:
        specs.load(path)
    assert e.value.problems == expected and e.value.exit_code == 2


def test_golden_spot_checks():
    # spelled out here so the golden files cannot silently drift to wrong positions
    assert specs.validate_text("name: a\ndata: {train: [{source: demo}]}\nmodel:\n  depth: 0\n", "f.yaml") == \
        ["f.yaml:4:10: model.depth: must be >= 1 (got 0)"]
    assert specs.validate_text("name: a\ndata: {train: [{source: demo}]}\nmodel: {depth: 4, depht: 4}\n", "f.yaml") == \
        ["f.yaml:3:19: model.depht: unknown field 'depht' (did you mean 'depth'?)"]
    assert specs.validate_text("name: a\ndata: {train: [{source: demo}]}\nmodel: {depth: 4}\n"
                               "train: {num_iterations: abc}\n", "f.yaml") == \
        ["f.yaml:4:25: train.num_iterations: expected an integer (got 'abc')"]


def test_validate_reports_every_problem_at_once():
    problems = specs.validate(BAD / "many_problems.yaml")
    assert len(problems) == 8
    assert len({p.split(": ")[1] for p in problems}) == 8   # eight different fields
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines)


def test_missing_file_and_not_a_file(tmp_path):
    assert specs.validate(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: spec file not found"]
    with pytest.raises(SpecError, match="spec file not found"):
        specs.load(tmp_path / "nope.yaml")
    assert specs.validate(tmp_path) == [f"{tmp_path}: not a file"]


def test_duplicate_key_reported_with_other_problems():
    text = "name: a\nname: b\ndata: {train: [{source: demo}]}\nmodel: {depth: -3}\n"
    assert specs.validate_text(text, "f.yaml") == [
        "f.yaml:2:1: name: duplicate key 'name' (first defined at line 1)",
        "f.yaml:4:16: model.depth: must be >= 1 (got -3)"]


# --- YAML number handling ---------------------------------------------------------------------------

def test_scientific_notation_and_underscores():
    spec = specs.load_text(MINIMAL + "train:\n  target_flops: 1e18\n  eval_tokens: 2_000_000\n"
                           "  adam_beta1: 8.0e-1\n  matrix_lr: 2E-2\ntokenizer: {max_chars: 2_000_000_000}\n")
    assert spec.train.target_flops == 1e18 and isinstance(spec.train.target_flops, float)
    assert spec.train.eval_tokens == 2_000_000 and spec.tokenizer.max_chars == 2_000_000_000
    assert spec.train.adam_beta1 == 0.8 and spec.train.matrix_lr == 0.02
    # strings stay strings when they only look a little like numbers
    assert specs.load_text(MINIMAL + "train: {wandb_run: e18}\n").train.wandb_run == "e18"


def test_strict_types_do_not_coerce():
    problems = specs.validate_text(MINIMAL + "train: {device_batch_size: '16', num_iterations: 2.5, fp8: 1}\n", "f")
    assert problems == ["f:7:28: train.device_batch_size: must be auto or an integer >= 1 (got '16')",
                        "f:7:50: train.num_iterations: expected an integer (got 2.5)",
                        "f:7:60: train.fp8: expected true or false (got 1)"]


# --- schema rules -----------------------------------------------------------------------------------

def test_data_source_cross_field_rules():
    def check(item):
        return specs.validate_text(f"name: a\ndata:\n  train:\n    - {item}\nmodel: {{depth: 4}}\n", "f")
    assert check("{source: climbmix, shards: 8}") == []
    assert check("{source: text, path: /data/*.txt, weight: 2}") == []
    assert check("{source: climbmix}") == ["f:4:7: data.train.0: source 'climbmix' needs 'shards' (how many shards to download)"]
    assert check("{source: parquet}") == ["f:4:7: data.train.0: source 'parquet' needs 'path' (the local files)"]
    assert check("{source: demo, path: x}") == \
        ["f:4:28: data.train.0.path: source 'demo' is the packaged offline corpus and takes no 'path'"]
    assert check("{source: demo, weight: 0}") == ["f:4:30: data.train.0.weight: must be > 0 (got 0)"]
    assert specs.validate_text("name: a\ndata: {train: []}\nmodel: {depth: 4}\n", "f") == \
        ["f:2:15: data.train: must have at least 1 item(s)"]


def test_stage_rules():
    def stages(s):
        return specs.validate_text(MINIMAL + f"stages: {s}\n", "f")
    assert stages("[data, tok_train, base_train, base_eval, sft, rl, chat_eval]") == []
    assert stages("[tok_train, base_train, {chat_eval: {source: rl}}]") == \
        ["f:7:33: stages.2: stage 'chat_eval' needs 'rl' before it ('rl' is missing)"]
    assert stages("[tok_train, sft]") == ["f:7:21: stages.1: stage 'sft' needs 'base_train' before it ('base_train' is missing)"]
    assert stages("[tok_train, data]") == ["f:7:10: stages.0: stage 'tok_train' needs 'data' before it ('data' comes after it)"]
    assert stages("[tok_train, {a: 1, b: 2}]") == ["f:7:21: stages.1: a stage is a name or a one-key mapping 'name: {options}'"]
    assert stages("[{base_train: {lr: 1}}]") == ["f:7:24: stages.0.base_train.lr: unknown field 'lr' (this stage takes no options)"]
    assert stages("[]") == ["f:7:9: stages: must have at least 1 item(s)"]


def test_cross_section_batch_check():
    problems = specs.validate_text(MINIMAL + "train: {total_batch_size: 1000, device_batch_size: 2}\n", "f")
    assert problems == ["f:7:27: train.total_batch_size: must be a multiple of device_batch_size * max_seq_len * "
                        "world_size = 2 * 2048 * 1 = 4096 (got 1000)"]
    assert specs.validate_text(MINIMAL + "train: {total_batch_size: 8192, device_batch_size: 2}\n", "f") == []


def test_hardware_and_train_rules():
    assert specs.validate_text(MINIMAL + "hardware: {gpu: cpu, device_type: cuda}\n", "f") == \
        ["f:7:35: hardware.device_type: device_type 'cuda' does not run on gpu 'cpu'"]
    assert specs.validate_text(MINIMAL + "train: {num_iterations: -1, target_flops: -1, target_param_data_ratio: -1}\n",
                               "f") == ["f:7:72: train.target_param_data_ratio: no training horizon: set "
                                        "num_iterations, target_flops or target_param_data_ratio"]
    assert specs.validate_text(MINIMAL + "train: {dtype: bf16}\n", "f") == \
        ["f:7:16: train.dtype: must be one of 'auto', 'bfloat16', 'float16', 'float32' (got 'bf16') (did you mean 'bfloat16'?)"]


def test_implied_data_stage_and_defaults():
    spec = specs.load_text(MINIMAL)
    assert specs.stage_names(spec) == ["data", "tok_train", "base_train", "base_eval"]
    explicit = specs.load_text(MINIMAL + "stages: [data, tok_train, base_train, base_eval]\n")
    assert explicit == spec and specs.spec_hash(explicit) == specs.spec_hash(spec)
    assert spec.seed == 42 and spec.train.eval_tokens == 41943040 and spec.hardware.gpus_per_node == 1


def test_stage_options_inherit_and_override():
    spec = specs.load_text(MINIMAL + "tokenizer: {vocab_size: 8192}\n"
                           "stages: [{tok_train: {max_chars: 1000}}, base_train, base_eval:, sft, rl, chat_eval]\n")
    assert specs.stage_options(spec, "tok_train") == {"vocab_size": 8192, "max_chars": 1000, "doc_cap": 10_000}
    assert specs.stage_options(spec, "base_eval")["device_batch_size"] == "auto"   # resolved by the plan (the device batch train gets)
    assert specs.stage_options(spec, "chat_eval")["source"] == "rl"
    assert specs.stage_options(spec, "data") == {}
    with pytest.raises(KeyError, match="did you mean 'base_eval'"):
        specs.stage_options(spec, "base_evl")
    spec = specs.load_text(MINIMAL + "stages: [{tok_train: {vocab_size: 4096}}]\n")
    assert specs.vocab_size(spec) == 4096 and specs.stage_names(spec) == ["data", "tok_train"]


def test_models_are_frozen():
    spec = specs.load_text(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        spec.model.depth = 5
    with pytest.raises(pydantic.ValidationError):
        spec.name = "other"
    with pytest.raises(pydantic.ValidationError):
        spec.stages[0].options = None
    assert isinstance(spec.data.train, tuple) and isinstance(spec.stages, tuple)


# --- hashing and dumping ----------------------------------------------------------------------------

def test_spec_hash_stable_and_sensitive():
    base = specs.load_text(MINIMAL)
    h = specs.spec_hash(base)
    assert len(h) == 64 and h == specs.spec_hash(specs.load_text(MINIMAL, "elsewhere.yaml"))
    # defaults written out, reordered keys, description and tags: same spec, same hash
    same = ("model: {depth: 4, head_dim: 128}\nname: mini\ndescription: words\ntags: [x]\n"
            "data: {train: [{source: demo, weight: 1.0}]}\ntrain: {matrix_lr: 0.02}\n")
    assert specs.spec_hash(specs.load_text(same)) == h
    for change in ["train: {matrix_lr: 0.021}\n", "seed: 1\n", "model_x", "hardware: {gpus_per_node: 2}\n",
                   "stages: [tok_train]\n", "tokenizer: {doc_cap: 10001}\n"]:
        text = MINIMAL.replace("depth: 4", "depth: 5") if change == "model_x" else MINIMAL + change
        assert specs.spec_hash(specs.load_text(text)) != h, change
    # the dumped YAML is the same spec
    assert h == specs.spec_hash(specs.load_text(specs.dump_yaml(base)))


def test_dump_yaml_round_trips_and_compacts():
    spec = specs.load(ROOT / "specs" / "cpu_demo.yaml")
    full, short = specs.dump_yaml(spec), specs.dump_yaml(spec, exclude_defaults=True)
    assert specs.load_text(full) == spec and specs.load_text(short) == spec
    assert "adam_beta2" in full and "adam_beta2" not in short  # cpu_demo leaves it at the default
    assert "- data\n" in full and "bundle: offline" in full


def test_import_specs_is_light():
    code = "import sys, specs; bad = [m for m in ('torch', 'duckdb', 'numpy', 'textual') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NANORUN_HOME": "/nonexistent"})
    assert out.stdout.strip() == "[]"


def test_yaml_edge_cases():
    # a section with every line commented out is null in YAML: it means "all defaults"
    assert specs.load_text(MINIMAL + "tokenizer:\n  # vocab_size: 4096\n").tokenizer.vocab_size == 32768
    assert specs.validate_text("name: a\ndata: {train: [{source: demo}]}\nmodel:\n", "f") == \
        ["f:3:1: model.depth: required field is missing"]
    assert specs.validate_text(MINIMAL + "1: x\n", "f") == ["f:7:1: 1: field names must be strings (got 1)"]
    assert specs.validate_text("name: a\ndata:\n  train:\n    - {weight: 2}\nmodel: {depth: 4}\n", "f") == \
        ["f:4:7: data.train.0.source: required field is missing"]
    assert specs.validate_text(MINIMAL + "tags: foo\n", "f") == ["f:7:7: tags: expected a list (got 'foo')"]
    assert specs.validate_text(MINIMAL + "x: &a 3\ny: *a\n", "f") == ["f:7:1: x: unknown field 'x'",
                                                                      "f:8:1: y: unknown field 'y'"]


def test_non_finite_numbers_and_unbuildable_shapes_are_refused():
    M = "name: x\ndata: {train: [{source: demo}]}\n"
    assert specs.validate_text(M + "model: {depth: 4}\ntrain: {target_flops: .inf}\n", "f") == \
        ["f:4:23: train.target_flops: must be a finite number (got inf)"]
    assert specs.validate_text(M + "model: {depth: 4}\ntrain: {target_flops: .nan}\n", "f") == \
        ["f:4:23: train.target_flops: must be a finite number (got nan)"]
    assert specs.validate_text(M + "model: {depth: 4, head_dim: 63}\n", "f") == \
        ["f:3:29: model.head_dim: must be even: rotary embeddings rotate pairs of channels (got 63)"]
    assert specs.validate_text(M + "model: {depth: 2, aspect_ratio: 4, head_dim: 8}\n", "f") == \
        ["f:3:33: model.aspect_ratio: width 8 (depth 2 x aspect_ratio 4, in heads of 8) is under the 24 channels "
         "the smear gate reads; raise aspect_ratio"]


def test_recursive_aliases_and_alias_bombs_are_one_line():
    assert specs.validate_text("name: x\ndata: &a\n  train: [*a]\n", "f") == \
        ["f:2:7: a YAML alias refers to a node that contains it (recursive alias)"]
    bomb = "name: x\na: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(9))
    assert specs.validate_text(bomb, "f") == ["f:1:1: the spec expands to over 100,000 YAML nodes through aliases"]
    # ordinary anchors still work
    ok = "name: x\nmodel: {depth: 4}\ndata: {train: [&src {source: demo}], val: *src}\n"
    assert specs.validate_text(ok, "f") == []
