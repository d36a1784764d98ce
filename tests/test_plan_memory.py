"""Memory planned before spend (issue 11): plan estimates each stage's peak per device against the device,
device_batch_size auto picks the largest power of two that fits, and a batch that cannot fit is refused."""

import json
import os

from click.testing import CliRunner

import specs
from runners.cli import main
from runners.plan import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
DEMO = os.path.join(ROOT, "specs", "cpu_demo.yaml")


def _cpu(memory_bytes):
    return {"device_type": "cpu", "name": "Small CPU", "flags": ["avx2"], "cores": 2, "memory_bytes": memory_bytes,
            "matmul_flops": {"float32": 1e11}}


def test_plan_json_carries_memory_for_every_torch_stage(nanorun_home):
    out = CliRunner().invoke(main, ["plan", DEMO, "--json"], catch_exceptions=False)
    assert out.exit_code == 0
    stages = {s["stage"]: s for s in json.loads(out.stdout)["stages"]}
    for name in ("base_train", "base_eval", "sft", "chat_eval"):
        m = stages[name]["memory"]
        assert set(m) >= {"per_device_bytes", "device_capacity_bytes", "fits", "breakdown"}
        assert m["device_capacity_bytes"] == 24 * GiB and m["fits"] is True   # the pinned test CPU
        assert m["per_device_bytes"] == sum(m["breakdown"].values())
    train = stages["base_train"]["memory"]["breakdown"]
    assert {"params", "optimizer", "activations", "loss", "runtime"} <= set(train)
    assert stages["data"]["memory"] == {} and stages["tok_train"]["memory"] == {}


def test_auto_device_batch_follows_the_memory_and_keeps_the_total_batch():
    spec = specs.load(DEMO)
    roomy = make_plan(spec, caps=_cpu(24 * GiB))
    assert roomy.derived["device_batch_size"] == 8 and roomy.derived["grad_accum_steps"] == 1   # 4096 / 512
    # a machine with little memory: fewer rows per micro-step, more accumulation, the same optimizer step
    base = roomy.stage("base_train").memory
    small = make_plan(spec, caps=_cpu(int(base["per_device_bytes"] * 0.8 / 0.9)))
    assert small.derived["device_batch_size"] < 8 and small.derived["total_batch_size"] == 4096
    assert small.derived["grad_accum_steps"] == 8 // small.derived["device_batch_size"]
    assert small.stage("base_train").params["device_batch_size"] == small.derived["device_batch_size"]
    assert small.stage("base_train").key != roomy.stage("base_train").key
    assert small.stage("base_train").memory["fits"] is True


def test_explicit_device_batch_that_cannot_fit_is_refused_with_the_numbers(nanorun_home, tmp_path):
    spec = tmp_path / "big.yaml"
    text = open(DEMO).read().replace("device_batch_size: auto", "device_batch_size: 64") \
        .replace("total_batch_size: 4096", "total_batch_size: 32768")
    spec.write_text(text)
    line_no = next(i for i, line in enumerate(text.splitlines(), 1) if "device_batch_size: 64" in line)
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"cpu": _cpu(int(1.5 * GiB))}))
    for command in ("plan", "validate", "apply"):
        out = CliRunner(env={"NANORUN_CAPS": str(caps)}).invoke(main, [command, str(spec)])
        assert out.exit_code == 2, (command, out.output)
        line = out.output.strip().splitlines()[-1]
        assert line.startswith(f"error: {spec}:{line_no}:22: train.device_batch_size: d4 at device batch 64 x 512 tokens "
                               "needs ") if command != "validate" else line.startswith(f"{spec}:{line_no}:22: ")
        assert "over 90% of 1.5 GiB; device batch" in line and "fits" in line
    assert not os.path.exists(os.path.join(nanorun_home, "runs"))


def test_a_model_that_cannot_fit_at_batch_one_is_refused(nanorun_home, tmp_path):
    spec = tmp_path / "l4.yaml"
    spec.write_text("name: d26_on_l4\nhardware: {nodes: 1, gpus_per_node: 1, gpu: NVIDIA L4}\n"
                    "data:\n  train:\n    - {source: demo}\nmodel: {depth: 26}\n")
    out = CliRunner().invoke(main, ["plan", str(spec)])
    assert out.exit_code == 2
    line = out.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {spec}: train.device_batch_size: d26 at device batch 1 x 2048 tokens needs ")
    assert "over 90% of 24.0 GiB" in line and "use more devices" in line


def test_shipped_gpu_specs_fit_their_gpus():
    # the reference's guidance: dbs 32 fits up to d20 and 16 at d24-d26 on 80 GB; 32 at d26 does not
    d26 = make_plan(specs.load(os.path.join(ROOT, "specs", "speedrun_d26.yaml")))
    assert d26.derived["device_batch_size"] == 16
    assert all(s.memory["fits"] for s in d26.stages if s.memory)
    for name in ("d12", "d20", "d24"):
        plan = make_plan(specs.load(os.path.join(ROOT, "specs", f"{name}.yaml")))
        assert all(s.memory["fits"] for s in plan.stages if s.memory), name


def test_an_unknown_gpu_name_is_refused_with_a_suggestion(nanorun_home, tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text(open(os.path.join(ROOT, "specs", "d12.yaml")).read().replace("gpu: H100-SXM", "gpu: H10O-SXM"))
    for command in ("plan", "validate"):
        out = CliRunner().invoke(main, [command, str(spec)])
        assert out.exit_code == 2
        assert out.output.strip().splitlines()[-1].endswith(
            "hardware.gpu: unknown GPU 'H10O-SXM' (did you mean 'H100'?)")
    for name in ("AMD Instinct MI300X", "NVIDIA A100-SXM4-40GB", "Tesla T4", "NVIDIA GeForce RTX 4090"):
        spec.write_text(f"name: g\nhardware: {{gpu: {name}}}\ndata: {{train: [{{source: demo}}]}}\nmodel: {{depth: 4}}\n")
        assert CliRunner().invoke(main, ["plan", str(spec)]).exit_code == 0, name
