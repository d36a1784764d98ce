"""Spec -> plan: every shipped spec plans, the resolved numbers match the reference, stage keys hash both ways."""

import glob
import json
import os

import pytest
from click.testing import CliRunner

import specs
from runners.cli import main
from runners.plan import make_plan, stage_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "specs", "*.yaml")))


def test_the_required_specs_ship():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"speedrun_d26.yaml", "d12.yaml", "d20.yaml", "d24.yaml", "cpu_demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_spec_validates_and_plans(path, tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path))
    assert specs.validate(path) == []
    plan = make_plan(specs.load(path))
    assert plan.stages and plan.stages[0].name == "data"
    assert len({s.key for s in plan.stages}) == len(plan.stages)
    if "base_train" in [s.name for s in plan.stages]:
        d = plan.derived
        assert d["total_batch_size"] % (d["device_batch_size"] * d["sequence_len"] * d["world_size"]) == 0
        assert d["num_iterations"] >= 1


def test_speedrun_plan_matches_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["plan", os.path.join(ROOT, "specs", "speedrun_d26.yaml"), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)["derived"]
    # reference/nanochat.md 2.1 and 2.9: d26 -> C=1664, 13 heads; B auto = 2^20; 8 GPUs x dbs 16 x 2048 -> accum 4
    assert (d["n_layer"], d["n_embd"], d["n_head"]) == (26, 1664, 13)
    assert d["total_batch_size"] == 2**20 and d["grad_accum_steps"] == 4
    assert d["params"]["total"] == 1_681_786_938
    assert set(d["params"]) == {"wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total"}
    assert d["num_iterations"] == int(8.25 * d["scaling_params"]) // 2**20
    assert abs(d["flops_per_token"] - 5.99e9) / 5.99e9 < 0.01


def test_plan_text_shows_stages_estimates_and_state(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["plan", os.path.join(ROOT, "specs", "speedrun_d26.yaml")],
                                catch_exceptions=False)
    assert result.exit_code == 0
    for word in ("n_layer=26", "total_batch_size=1,048,576", "base_train", "pending", "$"):
        assert word in result.output


def test_stage_key_changes_with_any_input_and_only_then():
    base = stage_key("base_train", {"depth": 4, "matrix_lr": 0.02}, ["aaa"])
    assert base == stage_key("base_train", {"matrix_lr": 0.02, "depth": 4}, ["aaa"])
    assert base != stage_key("base_train", {"depth": 5, "matrix_lr": 0.02}, ["aaa"])
    assert base != stage_key("base_train", {"depth": 4, "matrix_lr": 0.021}, ["aaa"])
    assert base != stage_key("base_train", {"depth": 4, "matrix_lr": 0.02}, ["aab"])
    assert base != stage_key("base_eval", {"depth": 4, "matrix_lr": 0.02}, ["aaa"])


def test_upstream_change_propagates_and_unrelated_stages_are_shared(tmp_path):
    src = open(os.path.join(ROOT, "specs", "cpu_demo.yaml")).read()
    a = make_plan(specs.load_text(src, "a.yaml"))
    # a different learning rate: data and tokenizer are shared, training and eval are new
    doc = specs.load_text(src, "b.yaml").model_dump(mode="json")
    doc["train"]["matrix_lr"] = doc["train"]["matrix_lr"] * 2
    import yaml
    b = make_plan(specs.load_text(yaml.safe_dump(doc), "b.yaml"))
    ka = {s.name: s.key for s in a.stages}
    kb = {s.name: s.key for s in b.stages}
    assert ka["data"] == kb["data"] and ka["tok_train"] == kb["tok_train"]
    assert ka["base_train"] != kb["base_train"] and ka["base_eval"] != kb["base_eval"]
    assert a.run_id != b.run_id
