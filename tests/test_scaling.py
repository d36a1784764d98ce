"""Scaling laws and optimizer groups against the reference's derived tables (reference/nanochat.md 2.9, 4.1, 5.2):
auto batch size, step count and scaled weight decay per depth, the target_flops horizon, and the effective d24
learning rates of every group. Run: .venv/bin/pytest tests/test_scaling.py"""

import math

import pytest
import torch

from nanochat import scaling
from nanochat.gpt import GPT, GPTConfig

# depth -> (log2 auto B, num_iterations, weight_decay_scaled), V=32768, T=2048, SSSL, ratio 12 (table of 2.9)
TABLE = {8: (18, 1920, 0.520), 12: (19, 2520, 0.280), 16: (19, 5376, 0.131), 20: (20, 4980, 0.100),
         24: (20, 8352, 0.060), 26: (20, 10510, 0.048), 32: (21, 9600, 0.037)}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_auto_batch_steps_and_weight_decay_match_the_table(depth):
    log2_b, iters, wd = TABLE[depth]
    r = scaling.resolve_training(depth, device_batch_size=8)
    assert r["total_batch_size"] == 2 ** log2_b
    assert r["num_iterations"] == iters and r["horizon"] == "target_param_data_ratio"
    assert r["weight_decay_scaled"] == pytest.approx(wd, abs=1e-3)  # the table rounds (d26: 0.04747 -> 0.048)
    assert r["batch_lr_scale"] == pytest.approx(math.sqrt(2 ** log2_b / 2 ** 19))
    assert r["dmodel_lr_scale"] == pytest.approx((64 * depth / 768) ** -0.5)


def test_auto_batch_size_bands():
    # 5.2 item 4: d8 2^18; d10-16 2^19; d18-26 2^20; d32-50 2^21
    bands = {18: [8], 19: [10, 12, 14, 16], 20: [18, 20, 22, 24, 26], 21: [32, 40, 50]}
    for log2_b, depths in bands.items():
        for depth in depths:
            assert scaling.resolve_training(depth, device_batch_size=1)["total_batch_size"] == 2 ** log2_b, depth


def test_speedrun_ratio_8_keeps_batch_and_weight_decay():
    r = scaling.resolve_training(24, target_param_data_ratio=8)
    assert (r["total_batch_size"], r["num_iterations"], round(r["weight_decay_scaled"], 3)) == (2 ** 20, 5568, 0.060)


@pytest.mark.parametrize("ratio", [12.0, -1.0])
def test_target_flops_sets_only_the_step_count(ratio):
    # 5.2 items 2, 4, 6, 7: B and WD come from ratio * scaling_params (the ratio cancels, so the scaling sweep's
    # --target-param-data-ratio=-1 gives the same); target_flops sets num_iterations alone
    for depth in (10, 12, 20):
        by_ratio = scaling.resolve_training(depth)
        r = scaling.resolve_training(depth, target_flops=1e19, target_param_data_ratio=ratio)
        assert r["horizon"] == "target_flops"
        assert r["total_batch_size"] == by_ratio["total_batch_size"]
        assert r["weight_decay_scaled"] == pytest.approx(by_ratio["weight_decay_scaled"])
        assert r["num_iterations"] == round(1e19 / (r["flops_per_token"] * r["total_batch_size"]))
    assert scaling.resolve_training(12, target_flops=1e19)["num_iterations"] == 25107


def test_num_iterations_wins_over_other_horizons():
    r = scaling.resolve_training(12, num_iterations=77, target_flops=1e19)
    assert (r["num_iterations"], r["horizon"]) == (77, "num_iterations")
    with pytest.raises(ValueError, match="no training horizon"):
        scaling.resolve_training(12, target_param_data_ratio=-1)
    with pytest.raises(ValueError, match="not divisible"):
        scaling.resolve_training(12, total_batch_size=3 * 2048, device_batch_size=2)


def test_d24_effective_learning_rates_and_group_table():
    # 4.1: lm_head 0.008, wte 0.30, VE 0.15, resid 0.00707, x0 0.707, smear 0.2, Muon 0.0283 (dmodel and batch
    # scales cancel for AdamW at d24); betas/eps/wd per the table; Muon groups by shape include the ve_gates
    r = scaling.resolve_training(24, device_batch_size=16, world_size=8)
    config = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=24, n_head=r["n_head"],
                       n_kv_head=r["n_kv_head"], n_embd=r["n_embd"], window_pattern="SSSL")
    with torch.device("meta"):
        model = GPT(config)
    opt = model.setup_optimizer(unembedding_lr=r["unembedding_lr"], embedding_lr=r["embedding_lr"],
                                matrix_lr=r["matrix_lr"], weight_decay=r["weight_decay_scaled"],
                                scalar_lr=r["scalar_lr"])
    groups = {g["name"]: g for g in opt.param_groups}
    expect = {  # name: (lr, betas, wd)
        "lm_head": (0.008, (0.8, 0.96), 0.01), "embedding": (0.30, (0.8, 0.995), 0.001),
        "value_embeds": (0.15, (0.8, 0.995), 0.01), "resid": (0.00707, (0.8, 0.95), 0.05),
        "x0": (0.707, (0.96, 0.95), 0.0), "smear": (0.2, (0.8, 0.95), 0.0)}
    for name, (lr, betas, wd) in expect.items():
        g = groups[name]
        assert g["kind"] == "adamw" and g["eps"] == 1e-10, name
        assert g["lr"] == pytest.approx(lr, rel=2e-3) and tuple(g["betas"]) == betas and g["weight_decay"] == wd, name
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    shapes = {tuple(p.shape) for g in muon for p in g["params"]}
    assert (r["n_kv_head"], 12) in shapes  # ve_gate
    for g in muon:
        assert len({tuple(p.shape) for p in g["params"]}) == 1
        assert g["lr"] == pytest.approx(0.0283, rel=2e-3) and (g["momentum"], g["beta2"], g["ns_steps"]) == (0.95, 0.9, 5)
        assert g["weight_decay"] == pytest.approx(r["weight_decay_scaled"])
    assert all("initial_lr" in g for g in opt.param_groups)
