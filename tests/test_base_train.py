"""Pretraining stage end to end on a tiny corpus: a real tokenizer, a real parquet data dir, real subprocesses
(plain python and torchrun with gloo), checking events.jsonl, result.json, checkpoints and that resuming
from a checkpoint reproduces the uninterrupted loss curve exactly. Run: .venv/bin/pytest tests/test_base_train.py"""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest

from nanochat.stages.base_train import lr_multiplier, muon_momentum, muon_weight_decay, parse_args

WORDS = ("the a of and to in is was for on that with as by at from his her it an are were be this which or "
         "king river city music light water stone garden morning winter people story night small great old new "
         "house road ship field fire wind tree bird book door friend letter voice sea mountain").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 512-token tokenizer trained on ~100 KB of generated prose, and a data dir (2 train shards + val)."""
    from nanochat.dataset import write_parquet_shards
    from nanochat.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def doc():
        return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                        for _ in range(rng.randint(2, 12)))
    docs = [doc() for _ in range(600)]
    train_tokenizer(iter(docs), 512).save(str(root / "tok"))
    write_parquet_shards(iter(docs[:500]), str(root / "data"), "shard", 250, row_group_size=25)
    write_parquet_shards(iter(docs[500:]), str(root / "data"), "val", 100, row_group_size=25)
    # a two-task CORE bundle (the DCLM layout: core.yaml, eval_meta_data.csv, eval_data/*.jsonl)
    bundle = root / "bundle"
    (bundle / "eval_data").mkdir(parents=True)
    mc = [{"query": "The king", "choices": ["of the sea.", "river city."], "gold": 0}] * 4
    lm = [{"context": "The old house", "continuation": "of the king."}] * 4
    for name, items in (("copa.jsonl", mc), ("lambada_openai.jsonl", lm)):
        (bundle / "eval_data" / name).write_text("".join(json.dumps(it) + "\n" for it in items))
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n"
        "-\n  label: copa\n  dataset_uri: copa.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
        "-\n  label: lambada_openai\n  dataset_uri: lambada_openai.jsonl\n  num_fewshot: [0]\n"
        "  icl_task_type: language_modeling\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\ncopa,x,50\n"
                                                "lambada_openai,x,0\n")
    return {"data_dir": str(root / "data"), "tokenizer_dir": str(root / "tok"), "home": str(root / "home"),
            "bundle_dir": str(bundle)}


def run_stage(corpus, out_dir, *flags, nproc=1, check=True):
    args = ["--depth", "2", "--head-dim", "64", "--max-seq-len", "64", "--device-batch-size", "2",
            "--total-batch-size", "256", "--eval-tokens", "256", "--core-metric-every", "-1",
            "--matrix-lr", "0.5", "--embedding-lr", "10", "--unembedding-lr", "1", "--warmup-steps", "1",
            "--data-dir", corpus["data_dir"], "--tokenizer-dir", corpus["tokenizer_dir"], "--out-dir", str(out_dir),
            *flags]
    launcher = [sys.executable, "-m", "nanochat.stages.base_train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "nanochat.stages.base_train"]
    env = {**os.environ, "NANORUN_HOME": corpus["home"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_events(out_dir):
    with open(os.path.join(out_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(events):
    return {e["step"]: e["values"]["train/loss"] for e in events
            if e["kind"] == "metric" and "train/loss" in e["values"]}


def val_bpbs(events):
    return {e["step"]: e["values"]["val/bpb"] for e in events if e["kind"] == "metric" and "val/bpb" in e["values"]}


def truncate_to_step(src, dst, step):
    """A copy of a finished stage dir as if it had crashed right after saving checkpoint `step`."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "result.json"))
    os.remove(os.path.join(dst, "events.jsonl"))
    ckpt = os.path.join(dst, "checkpoints")
    for f in os.listdir(ckpt):
        if int(f.split("_")[1].split(".")[0]) > step:
            os.remove(os.path.join(ckpt, f))


@pytest.mark.slow
def test_train_events_result_checkpoints_and_exact_resume(corpus, tmp_path):
    out = tmp_path / "full"
    proc = run_stage(corpus, out, "--num-iterations", "6", "--eval-every", "3", "--sample-every", "6",
                     "--save-every", "3", "--core-metric-every", "6", "--core-bundle-dir", corpus["bundle_dir"])
    assert "num_iterations: 6" in proc.stdout and "attention backend: sdpa" in proc.stdout
    events = read_events(out)
    assert events[0]["kind"] == "status" and events[0]["status"] == "running"
    assert events[-1]["kind"] == "status" and events[-1]["status"] == "done"
    curve = losses(events)
    assert sorted(curve) == list(range(6))
    assert curve[5] < curve[0]
    assert sorted(val_bpbs(events)) == [0, 3, 6]
    metric_keys = {k for e in events if e["kind"] == "metric" for k in e["values"]}
    assert {"train/loss", "train/lrm", "train/dt", "train/tok_per_sec", "train/mfu", "val/bpb", "train/eta_s",
            "train/peak_mem_mib", "train/epoch", "train/total_training_flops"} <= metric_keys
    last = [e["values"] for e in events if e["kind"] == "metric" and e["step"] == 5 and "train/loss" in e["values"]][0]
    assert last["train/eta_s"] == 0 and last["train/peak_mem_mib"] > 50  # peak RSS of a torch process, MiB
    samples = [e for e in events if e["kind"] == "sample"]
    assert len(samples) == 7 and all(e["step"] == 6 for e in samples)
    core_events = [e for e in events if e["kind"] == "eval"]
    assert {(e["task"], e["metric"], e["step"], e["n"]) for e in core_events} == {
        (t, m, 6, 4) for t in ("copa", "lambada_openai") for m in ("accuracy", "centered")}
    result = json.loads((out / "result.json").read_text())
    assert result["stage"] == "base_train" and result["outputs"]["last_step"] == 6
    m = result["metrics"]
    assert m["num_iterations"] == 6 and m["val_bpb"] == val_bpbs(events)[6]
    assert m["min_val_bpb"] == min(val_bpbs(events).values()) and m["params_total"] > 0
    assert m["peak_memory_mib"] >= last["train/peak_mem_mib"]
    assert -1.0 <= m["core_metric"] <= 1.0
    assert math.isfinite(m["mfu"]) and m["total_flops"] == m["flops_per_token"] * 256 * 6
    # the pinned test CPU (conftest: AVX2 only, fp32 peak 1.2e11): auto would pick fp32 and MFU divides by that peak
    assert m["compute_dtype"] == "float32" and m["dtype_reason"].startswith("auto: CPU has no native bf16")
    assert m["peak_flops"] == 1.2e11 and "measured float32 matmul peak 120.0 GFLOP/s" in m["peak_source"]
    device = [e for e in events if e.get("message") == "device"][0]
    assert device["compute_dtype"] == "float32" and device["dtype_warning"] is None
    assert "compute dtype float32 (auto: CPU has no native bf16" in proc.stdout
    ckpt = out / "checkpoints"
    assert {f for f in os.listdir(ckpt) if f.startswith("meta")} == {"meta_000003.json", "meta_000006.json"}

    from nanochat.checkpoint import load_model
    model, meta = load_model(str(ckpt))
    assert meta["step"] == 6 and model.config.vocab_size == 512

    # crash after step 3's checkpoint, resume automatically: the rest of the curve is identical
    resumed = tmp_path / "resumed"
    truncate_to_step(out, resumed, 3)
    run_stage(corpus, resumed, "--num-iterations", "6", "--eval-every", "3", "--sample-every", "6",
              "--save-every", "3", "--resume-from-step", "-2")
    events2 = read_events(resumed)
    curve2 = losses(events2)
    assert sorted(curve2) == [3, 4, 5]
    assert all(curve2[s] == curve[s] for s in (3, 4, 5)), (curve, curve2)
    assert val_bpbs(events2)[6] == val_bpbs(events)[6]

    # a fresh run never trains over another run's checkpoints, and a resume past the planned end is refused
    # (it used to run on forever with a negative learning rate)
    before = sorted(os.listdir(ckpt))
    proc = run_stage(corpus, out, "--num-iterations", "6", check=False)
    assert proc.returncode != 0 and "already holds checkpoints of a run (steps 3, 6)" in proc.stderr
    proc = run_stage(corpus, out, "--num-iterations", "4", "--resume-from-step", "-2", check=False)
    assert proc.returncode != 0 and "checkpoint step 6" in proc.stderr and "past this run's last step" in proc.stderr
    assert sorted(os.listdir(ckpt)) == before
    # resuming a finished run at its last step evaluates again but leaves its checkpoint as it is (a rewrite
    # killed midway would lose the only copy)
    written = os.stat(ckpt / "meta_000006.json").st_mtime_ns
    run_stage(corpus, out, "--num-iterations", "6", "--resume-from-step", "-2", "--sample-every", "-1")
    assert os.stat(ckpt / "meta_000006.json").st_mtime_ns == written and sorted(os.listdir(ckpt)) == before


@pytest.mark.slow
def test_torchrun_two_ranks_and_resume(corpus, tmp_path):
    out = tmp_path / "ddp"
    run_stage(corpus, out, "--num-iterations", "4", "--eval-every", "2", "--sample-every", "-1",
              "--save-every", "2", nproc=2)
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["world_size"] == 2 and result["outputs"]["last_step"] == 4
    files = set(os.listdir(out / "checkpoints"))
    assert {"optim_000002_rank0.pt", "optim_000002_rank1.pt", "state_000004_rank1.pt", "meta_000004.json"} <= files
    curve = losses(read_events(out))
    assert sorted(curve) == [0, 1, 2, 3]

    resumed = tmp_path / "ddp_resumed"
    truncate_to_step(out, resumed, 2)
    run_stage(corpus, resumed, "--num-iterations", "4", "--eval-every", "2", "--sample-every", "-1",
              "--save-every", "2", "--resume-from-step", "2", nproc=2)
    curve2 = losses(read_events(resumed))
    assert curve2 == {2: curve[2], 3: curve[3]}


def test_bad_resume_step_fails_cleanly(corpus, tmp_path):
    env = {**os.environ, "NANORUN_HOME": corpus["home"]}
    proc = subprocess.run([sys.executable, "-m", "nanochat.stages.base_train", "--depth", "1", "--head-dim", "64",
                           "--max-seq-len", "32", "--device-batch-size", "1", "--total-batch-size", "32",
                           "--num-iterations", "2", "--resume-from-step", "5", "--data-dir", corpus["data_dir"],
                           "--tokenizer-dir", corpus["tokenizer_dir"], "--out-dir", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no checkpoint in" in proc.stderr
    events = read_events(tmp_path / "o")
    assert events[-1]["status"] == "failed"


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"depth": 6, "device_batch_size": 4, "data_dir": "/d", "tokenizer_dir": "/t",
                               "out_dir": "/o", "vocab_size": 512, "resume_from_step": -2}))
    args = parse_args(["--config", str(cfg), "--depth", "8"])
    assert (args.depth, args.device_batch_size, args.data_dir, args.resume_from_step) == (8, 4, "/d", -2)
    assert args.warmdown_ratio == 0.65 and args.eval_tokens == 41943040 and args.compile is None
    cfg.write_text(json.dumps({"depht": 6}))
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", str(cfg)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--depth", "4"])       # no data/tokenizer dir


def test_schedules():
    N = 1000  # warmdown = 650 steps, starting after step 350
    assert lr_multiplier(0, N, 40, 0.65, 0.05) == 1 / 40
    assert lr_multiplier(39, N, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(350, N, 40, 0.65, 0.05) == 1.0
    assert abs(lr_multiplier(N, N, 40, 0.65, 0.05) - 0.05) < 1e-12
    assert abs(lr_multiplier(675, N, 40, 0.65, 0.05) - (0.5 + 0.5 * 0.05)) < 1e-12
    assert muon_momentum(0, 10000, 0.65) == 0.85
    assert abs(muon_momentum(200, 10000, 0.65) - 0.91) < 1e-12
    assert muon_momentum(1000, 10000, 0.65) == 0.97
    assert abs(muon_momentum(10000, 10000, 0.65) - 0.90) < 1e-12
    assert muon_weight_decay(0, N, 0.2) == 0.2 and abs(muon_weight_decay(N, N, 0.2)) < 1e-12
    assert abs(muon_weight_decay(N // 2, N, 0.2) - 0.1) < 1e-12


def test_optimizer_compile_default(monkeypatch):
    """--compile-optimizer unset: on with the model's compile; on CPU only for runs long enough to pay for the
    compile, and only where torch.compile works."""
    import torch

    import nanochat.common as common
    from nanochat.stages.base_train import COMPILE_OPTIMIZER_MIN_STEPS, default_compile_optimizer
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_compile_optimizer(True, cuda, 10)[0] and default_compile_optimizer(True, cpu, 10)[0]
    assert not default_compile_optimizer(False, cuda, 10_000)[0]
    on, why = default_compile_optimizer(False, cpu, COMPILE_OPTIMIZER_MIN_STEPS - 1)
    assert not on and "would not pay" in why
    monkeypatch.setitem(common._INDUCTOR_WORKS, "cpu", True)
    assert default_compile_optimizer(False, cpu, COMPILE_OPTIMIZER_MIN_STEPS)[0]
    monkeypatch.setitem(common._INDUCTOR_WORKS, "cpu", False)      # e.g. no C++ compiler: stays eager
    assert default_compile_optimizer(False, cpu, 10_000) == (False, "torch.compile unavailable here")


def test_inductor_preflight_reports_failure_instead_of_raising(monkeypatch, capsys):
    import torch

    import nanochat.common as common
    monkeypatch.delitem(common._INDUCTOR_WORKS, "meta", raising=False)

    def broken(*a, **k):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(torch, "compile", broken)
    assert common.inductor_works("meta") is False
    assert "torch.compile is unavailable on meta (RuntimeError: no working C++ compiler)" in capsys.readouterr().out
    monkeypatch.delitem(common._INDUCTOR_WORKS, "meta")


def test_wandb_run_name_mirrors_metrics_offline(corpus, tmp_path):
    """--run NAME logs to wandb (offline mode: no network); "dummy" keeps it off, as in the reference."""
    pytest.importorskip("wandb")
    env = {**os.environ, "NANORUN_HOME": corpus["home"], "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = [sys.executable, "-m", "nanochat.stages.base_train", "--depth", "1", "--head-dim", "64",
              "--max-seq-len", "32", "--device-batch-size", "1", "--total-batch-size", "32", "--num-iterations", "3",
              "--eval-every", "-1", "--eval-tokens", "256", "--sample-every", "-1", "--core-metric-every", "-1",
              "--data-dir", corpus["data_dir"], "--tokenizer-dir", corpus["tokenizer_dir"]]
    proc = subprocess.run(common + ["--run", "wandb-test", "--out-dir", str(tmp_path / "w")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [d for d in os.listdir(tmp_path / "w" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    files = os.listdir(tmp_path / "w" / "wandb" / runs[0])
    assert any(f.endswith(".wandb") for f in files)
    run_id = (tmp_path / "w" / "wandb" / "run_id").read_text().strip()
    assert runs[0].endswith(run_id)  # kept in the stage dir: a resumed stage continues the same wandb run
    proc = subprocess.run(common + ["--run", "dummy", "--out-dir", str(tmp_path / "d")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not os.path.exists(tmp_path / "d" / "wandb")


def test_fp8_training_evaluates_without_fp8(corpus, tmp_path):
    """--fp8 trains through torchao Float8Linear (it runs on CPU) and the evals switch it off (nanochat.fp8):
    the final val bpb equals a fresh high-precision evaluation of the saved weights."""
    pytest.importorskip("torchao.float8")
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.dataloader import DataLoader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import Tokenizer

    out = tmp_path / "fp8"
    proc = run_stage(corpus, out, "--num-iterations", "3", "--eval-every", "3", "--sample-every", "-1",
                     "--save-every", "-1", "--fp8", "--fp8-recipe", "rowwise")
    assert "FP8 (rowwise) on" in proc.stdout
    events = read_events(out)
    fp8_bpb = val_bpbs(events)[3]
    model, _ = load_model(str(out / "checkpoints"), 3)
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())
    tok = Tokenizer.from_directory(corpus["tokenizer_dir"])
    loader = DataLoader(corpus["data_dir"], tok, 2, 64, split="val", rank=0, world_size=1)
    batches = ((x.contiguous(), y.contiguous()) for x, y in loader)
    with torch.no_grad():
        fresh = evaluate_bpb(model.eval(), batches, 2, tok.token_bytes())
    assert abs(fresh - fp8_bpb) < 1e-6, (fresh, fp8_bpb)


def test_fp16_trains_with_a_grad_scaler(corpus, tmp_path):
    """--dtype float16 (which must reach nanochat.common before it is imported) trains through a GradScaler whose
    scale is logged and checkpointed; the run resumes from its checkpoint with the same losses."""
    out = tmp_path / "fp16"
    flags = ("--dtype", "float16", "--num-iterations", "4", "--eval-every", "-1", "--sample-every", "-1",
             "--save-every", "2")
    proc = run_stage(corpus, out, *flags)
    assert "compute dtype: torch.float16" in proc.stdout
    events = read_events(out)
    scales = [e["values"]["train/loss_scale"] for e in events if e["kind"] == "metric" and "train/loss" in e["values"]]
    curve = losses(events)
    assert len(scales) == 4 and all(s > 1 for s in scales) and all(math.isfinite(v) for v in curve.values())
    with open(out / "checkpoints" / "meta_000002.json") as f:
        assert json.load(f)["loop_state"]["grad_scaler"]["scale"] == scales[1]
    resumed = tmp_path / "fp16_resumed"
    truncate_to_step(out, resumed, 2)
    run_stage(corpus, resumed, *flags, "--resume-from-step", "-2")
    assert losses(read_events(resumed)) == {s: curve[s] for s in (2, 3)}


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    """CPU training asks glibc (mallopt) to keep freed memory for reuse; NANOCHAT_KEEP_MEMORY=0 leaves malloc as is."""
    import platform

    from nanochat.common import keep_freed_memory
    monkeypatch.setenv("NANOCHAT_KEEP_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("NANOCHAT_KEEP_MEMORY")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory() is True
