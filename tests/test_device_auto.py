"""dtype: auto and honest MFU (issue 11): decisions are pure functions of a capability record, tested with injected
records of real machines; the probe, its cache and the plan/apply wiring on top of them."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nanochat import probe
from nanochat.hardware import gpu_facts, mfu_peak_flops, resolve_dtype
from runners.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 1e9

# Records as nanochat.probe writes them, with the figures of real parts (CPU peaks: 2-core VMs, as measured on them)
EPYC_AVX2 = {"device_type": "cpu", "name": "AMD EPYC 7B12", "flags": ["avx2", "fma"], "cores": 2,
             "matmul_flops": {"float32": 130 * G, "bfloat16": 0.6 * G}}
SAPPHIRE_RAPIDS = {"device_type": "cpu", "name": "Intel Xeon Platinum 8480+",
                   "flags": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16"], "cores": 2,
                   "matmul_flops": {"float32": 190 * G, "bfloat16": 1900 * G}}
ZEN4_BF16 = {"device_type": "cpu", "name": "AMD EPYC 9B14", "flags": ["avx2", "avx512f", "avx512_bf16"], "cores": 2,
             "matmul_flops": {"float32": 180 * G, "bfloat16": 420 * G}}
APPLE_M2_CPU = {"device_type": "cpu", "name": "Apple M2 Pro", "arch": "arm64", "flags": ["bf16", "fp16", "neon"],
                "cores": 10, "matmul_flops": {"float32": 600 * G, "bfloat16": 300 * G}}
APPLE_M2_MPS = {"device_type": "mps", "name": "Apple M2 Pro"}
V100 = {"device_type": "cuda", "name": "Tesla V100-SXM2-16GB", "compute_capability": [7, 0]}
T4 = {"device_type": "cuda", "name": "Tesla T4", "compute_capability": [7, 5]}
A100 = {"device_type": "cuda", "name": "NVIDIA A100-SXM4-80GB", "compute_capability": [8, 0]}
H100 = {"device_type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
P100 = {"device_type": "cuda", "name": "Tesla P100-PCIE-16GB", "compute_capability": [6, 0]}


@pytest.mark.parametrize("caps,dtype,reason", [
    (EPYC_AVX2, "float32", "auto: CPU has no native bf16 (no avx512_bf16/amx_bf16)"),
    (SAPPHIRE_RAPIDS, "bfloat16", "auto: CPU has native bf16, measured 10.0x fp32 (1900 vs 190 GFLOP/s)"),
    (ZEN4_BF16, "bfloat16", "auto: CPU has native bf16, measured 2.3x fp32 (420 vs 180 GFLOP/s)"),
    (APPLE_M2_CPU, "float32", "auto: CPU has native bf16 but measured bf16 matmul is not faster (300 vs 600 GFLOP/s)"),
    (APPLE_M2_MPS, "float32", "auto: MPS runs bf16 about 17% slower per step than fp32 (reference)"),
    (V100, "float16", "auto: sm_70 has no bf16; fp16 tensor cores with loss scaling"),
    (T4, "float16", "auto: sm_75 has no bf16; fp16 tensor cores with loss scaling"),
    (A100, "bfloat16", "auto: sm_80 has bf16 tensor cores"),
    (H100, "bfloat16", "auto: sm_90 has bf16 tensor cores"),
    (P100, "float32", "auto: sm_60 has no tensor cores"),
])
def test_auto_dtype_per_machine(caps, dtype, reason):
    assert resolve_dtype("auto", caps) == {"dtype": dtype, "reason": reason, "warning": None}


def test_auto_needs_a_measurement_to_pick_bf16_on_cpu():
    unmeasured = {**ZEN4_BF16, "matmul_flops": {}}
    assert resolve_dtype("auto", unmeasured)["dtype"] == "float32"
    assert "no matmul was measured" in resolve_dtype("auto", unmeasured)["reason"]
    # a flag alone is not enough, and no flag means no bf16 however fast a measurement looked
    assert resolve_dtype("auto", {**EPYC_AVX2, "matmul_flops": {"float32": 1 * G, "bfloat16": 9 * G}})["dtype"] == "float32"


@pytest.mark.parametrize("caps,requested,warned", [
    (EPYC_AVX2, "bfloat16", "dtype bfloat16 is 217x slower than float32 on this cpu (measured matmul 0.6 vs 130.0 GFLOP/s)"),
    (EPYC_AVX2, "float32", None),
    (SAPPHIRE_RAPIDS, "float32", "dtype float32 is 10x slower than bfloat16 on this cpu"),
    (ZEN4_BF16, "float32", None),          # 2.3x: slower, but not pathological
    (T4, "float32", "dtype float32 is 8x slower than float16 on this cuda (sm_75)"),
    (V100, "bfloat16", "dtype bfloat16 is 16x slower than float16 on this cuda (sm_70)"),
    (A100, "float32", None),               # TF32: 2x
    (H100, "float16", None),
])
def test_explicit_dtype_is_kept_and_warned_when_pathologically_slow(caps, requested, warned):
    got = resolve_dtype(requested, caps)
    assert got["dtype"] == requested and got["reason"] == "explicit"
    if warned is None:
        assert got["warning"] is None
    else:
        assert got["warning"].startswith(warned)


def test_explicit_dtype_without_a_measurement_on_a_cpu_without_it():
    got = resolve_dtype("float16", {**EPYC_AVX2, "matmul_flops": {"float32": 130 * G}})
    assert "not native on this CPU" in got["warning"]
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", EPYC_AVX2)


def test_unknown_gpu_assumes_bf16_and_says_so():
    got = resolve_dtype("auto", {"device_type": "cuda", "name": "NVIDIA Future 9000", "compute_capability": None})
    assert got["dtype"] == "bfloat16" and "unknown GPU" in got["warning"]


def test_gpu_table_facts():
    assert gpu_facts("H100-SXM") == ((9, 0), 80 * 2**30)
    assert gpu_facts("NVIDIA A100-SXM4-40GB") == ((8, 0), 40 * 2**30)
    assert gpu_facts("Tesla T4") == ((7, 5), 16 * 2**30)
    assert gpu_facts("NVIDIA L40S")[0] == (8, 9) and gpu_facts("NVIDIA L4")[1] == 24 * 2**30
    assert gpu_facts("cpu") == (None, None)


# -----------------------------------------------------------------------------
# MFU denominator: never below what the run can reach


def test_mfu_peak_is_the_best_of_the_dtypes_the_run_computes_in():
    # bf16 on an AVX2 CPU: the matmuls that are fast there are fp32 ones (master weights, loss), so the peak is fp32's
    peak, source = mfu_peak_flops(EPYC_AVX2, "bfloat16")
    assert peak == 130 * G and source == "measured float32 matmul peak 130.0 GFLOP/s"
    assert mfu_peak_flops(SAPPHIRE_RAPIDS, "bfloat16")[0] == 1900 * G
    assert mfu_peak_flops(SAPPHIRE_RAPIDS, "float32")[0] == 190 * G
    # two processes on one CPU each get half of it
    peak, source = mfu_peak_flops(EPYC_AVX2, "float32", processes_per_device=2)
    assert peak == 65 * G and source.endswith("/ 2 processes")
    # GPUs keep the reference's table value
    assert mfu_peak_flops(H100, "bfloat16") == (989e12, "table peak 989 TFLOP/s (dense bf16) for NVIDIA H100 80GB HBM3")
    assert mfu_peak_flops({"device_type": "cpu", "matmul_flops": {}}, "float32")[0] == float("inf")


def test_an_avx2_bf16_run_reads_an_honest_mfu():
    # the figures: ~70 tok/s at ~31.4 MFLOP/token logged MFU 235% against the bf16 matmul peak
    achieved = 70 * 31.4e6
    assert achieved / EPYC_AVX2["matmul_flops"]["bfloat16"] > 1
    assert achieved / mfu_peak_flops(EPYC_AVX2, "bfloat16")[0] < 0.02


# -----------------------------------------------------------------------------
# The probe: torch-free reading, cached measurement, injected records


def test_cpu_record_reads_this_machine_and_hides_flags(monkeypatch):
    monkeypatch.delenv("NANORUN_CAPS", raising=False)
    rec = probe.cpu_record()
    assert rec["device_type"] == "cpu" and rec["cores"] >= 1 and rec["memory_bytes"] > 2**28
    assert set(rec["flags"]) <= set(probe.CPU_FLAGS)
    monkeypatch.setenv("NANORUN_HIDE_CPU_FLAGS", "avx512_bf16,amx_bf16,bf16")
    hidden = probe.cpu_record()
    assert not {"avx512_bf16", "amx_bf16", "bf16"} & set(hidden["flags"])
    assert resolve_dtype("auto", {**hidden, "matmul_flops": {"float32": 1e11, "bfloat16": 1e12}})["dtype"] == "float32"


def test_measured_peaks_are_cached_per_machine(tmp_path, monkeypatch):
    record = {**probe.cpu_record(), "flags": ["avx2"]}
    calls = []

    def fake_measure(device_type, dtypes):
        calls.append(list(dtypes))
        return {d: 1e11 for d in dtypes}
    monkeypatch.setattr(probe, "measure_matmul_peaks", fake_measure)
    monkeypatch.setattr(probe, "_load_average", lambda: 0.0)
    import torch  # noqa: F401  (measure in-process)
    assert probe.measured_peaks(record, ["float32"], home=str(tmp_path)) == {"float32": 1e11}
    assert probe.measured_peaks(record, ["float32"], home=str(tmp_path)) == {"float32": 1e11}
    assert calls == [["float32"]]                  # the second call read the cache
    assert probe.measured_peaks(record, ["float32", "bfloat16"], home=str(tmp_path))["bfloat16"] == 1e11
    assert calls == [["float32"], ["bfloat16"]]    # only the missing dtype was measured
    files = os.listdir(tmp_path / "hardware")
    assert len(files) == 1 and files[0].startswith("cpu-")
    # another CPU (or flags, or torch) is another machine
    other = {**record, "name": "Other CPU"}
    probe.measured_peaks(other, ["float32"], home=str(tmp_path))
    assert len(os.listdir(tmp_path / "hardware")) == 2
    # a measurement taken under load is used but not kept
    monkeypatch.setattr(probe, "_load_average", lambda: 99.0)
    probe.measured_peaks({**record, "name": "Busy CPU"}, ["float32"], home=str(tmp_path))
    assert len(os.listdir(tmp_path / "hardware")) == 2


def test_a_real_matmul_measurement_is_positive_and_bounded():
    peaks = probe.measure_matmul_peaks("cpu", ["float32"], sizes=(128, 256), rounds=1, budget_s=0.02)
    assert 1e6 < peaks["float32"] < 1e14   # loose: a loaded 2-core CI machine is slow


def test_injected_record_replaces_the_probe(pinned_capabilities):
    assert probe.local_caps("cpu")["name"] == "Test CPU (AVX2 only)"
    assert probe.local_caps("cpu")["source"] == "injected"


# -----------------------------------------------------------------------------
# plan / apply


def _plan(spec_path, caps):
    import specs
    from runners.plan import make_plan
    return make_plan(specs.load(spec_path), caps=caps)


def test_plan_resolves_auto_per_machine_and_keys_follow_the_dtype():
    demo = os.path.join(ROOT, "specs", "cpu_demo.yaml")
    avx2, spr = _plan(demo, EPYC_AVX2), _plan(demo, SAPPHIRE_RAPIDS)
    assert avx2.hardware["dtype"]["dtype"] == "float32" and spr.hardware["dtype"]["dtype"] == "bfloat16"
    for p, dtype in ((avx2, "float32"), (spr, "bfloat16")):
        assert p.stage("base_train").params["dtype"] == dtype
        assert all(s.env == {"NANOCHAT_DTYPE": dtype} for s in p.stages if s.name not in ("data", "tok_train"))
    # the data and tokenizer are shared; everything computed in a dtype is not
    assert avx2.stage("tok_train").key == spr.stage("tok_train").key
    assert avx2.stage("base_train").key != spr.stage("base_train").key
    # time estimate from the measured peak of the resolved dtype
    assert avx2.stage("base_train").estimate["seconds"] > 5 * spr.stage("base_train").estimate["seconds"]


def test_plan_of_a_gpu_spec_on_a_cpu_machine_uses_the_tables():
    p = _plan(os.path.join(ROOT, "specs", "speedrun_d26.yaml"), None)
    dev = p.hardware["device"]
    assert dev["source"] == "table" and dev["compute_capability"] == [9, 0]
    assert p.hardware["dtype"]["dtype"] == "bfloat16" and p.hardware["peak_flops"] == 989e12


def test_plan_cli_shows_the_dtype_and_why(nanorun_home):
    out = CliRunner().invoke(main, ["plan", os.path.join(ROOT, "specs", "cpu_demo.yaml")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "dtype    float32 (auto: CPU has no native bf16 (no avx512_bf16/amx_bf16))" in out.output
    assert "mfu      peak 1.2e+11 FLOP/s per device (measured float32 matmul peak 120.0 GFLOP/s)" in out.output
    js = json.loads(CliRunner().invoke(main, ["plan", os.path.join(ROOT, "specs", "cpu_demo.yaml"), "--json"]).stdout)
    assert js["hardware"]["dtype"]["dtype"] == "float32"


def test_plan_warns_about_a_pathologically_slow_explicit_dtype(nanorun_home, tmp_path):
    spec = tmp_path / "slow.yaml"
    text = open(os.path.join(ROOT, "specs", "cpu_demo.yaml")).read().replace("  dtype: auto", "  dtype: bfloat16")
    assert "dtype: bfloat16" in text
    spec.write_text(text)
    out = CliRunner().invoke(main, ["plan", str(spec)], catch_exceptions=False)
    assert out.exit_code == 0
    assert "warning: train.dtype: dtype bfloat16 is 120x slower than float32 on this cpu" in out.output


def test_apply_refuses_a_cuda_spec_on_a_machine_without_a_gpu(nanorun_home, tmp_path):
    if probe.gpu_records():
        pytest.skip("this machine has a GPU")
    spec = tmp_path / "gpu.yaml"
    spec.write_text("name: gpu_here\nhardware:\n  gpu: H100-SXM\nmodel: {depth: 4}\n"
                    "tokenizer: {vocab_size: 512}\ndata:\n  train:\n    - {source: demo}\n")
    out = CliRunner().invoke(main, ["apply", str(spec), "--yes"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines()[-1] == (
        f"error: {spec}:3:8: hardware.gpu: 'H100-SXM' needs a CUDA GPU and this machine has none (nvidia-smi "
        "lists no GPU); use gpu: cpu here, or apply the spec on a GPU node")
    assert not os.path.exists(os.path.join(nanorun_home, "runs"))


def test_plan_measures_in_a_subprocess_and_stays_torch_free(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NANORUN_CAPS"}
    env["NANORUN_HOME"] = str(tmp_path)
    code = ("import sys, specs\nfrom runners.plan import make_plan\n"
            "p = make_plan(specs.load('specs/cpu_demo.yaml'))\n"
            "assert 'torch' not in sys.modules\n"
            "print(p.hardware['dtype']['dtype'], sorted(p.hardware['device']['matmul_flops']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    dtype, measured = out.stdout.split(" ", 1)
    assert dtype in ("float32", "bfloat16") and "float32" in measured


def test_fingerprint_separates_thread_counts(monkeypatch):
    record = {"device_type": "cpu", "name": "X", "flags": ["avx2"], "cores": 2}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    full = probe.fingerprint(record)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert probe.fingerprint(record) != full
    assert probe.fingerprint({**record, "flags": ["avx2", "avx512_bf16"]}) != probe.fingerprint(record)


def test_apply_refuses_mps_off_a_mac(nanorun_home, tmp_path):
    if sys.platform == "darwin":
        pytest.skip("this machine may have MPS")
    spec = tmp_path / "mps.yaml"
    spec.write_text("name: mps_here\nhardware:\n  gpu: M2\n  device_type: mps\nmodel: {depth: 4}\n"
                    "tokenizer: {vocab_size: 512}\ndata:\n  train:\n    - {source: demo}\n")
    plan = CliRunner().invoke(main, ["plan", str(spec)])
    assert plan.exit_code == 0 and "dtype    float32 (auto: MPS" in plan.stdout
    out = CliRunner().invoke(main, ["apply", str(spec), "--yes"])
    assert out.exit_code == 2 and out.output.strip().splitlines()[-1] == (
        f"error: {spec}:4:16: hardware.device_type: 'mps' needs an Apple-silicon Mac and this machine is not one; "
        "use device_type: cpu here")
