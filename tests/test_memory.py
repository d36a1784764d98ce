"""nanochat.memory: hand-computed parts for a small model, the activation count against what autograd really saves,
the optimizer sharding against nanochat.optim's own layout, monotonicity, the device-batch picker and the refusal
of a model that cannot fit. Run: .venv/bin/python -m pytest -q tests/test_memory.py"""

import subprocess
import sys

import pytest

from nanochat import memory, scaling

GiB = 2 ** 30


def small(**kw):
    """d2 at head_dim 64: C=128, 2 heads, vocab 512, T=64, windows [64, 64] (no short window at T=64)."""
    args = dict(vocab_size=512, head_dim=64, max_seq_len=64, num_iterations=1, device_batch_size=1,
                total_batch_size=64 * 4)
    args.update(kw)
    return scaling.resolve_training(2, **args)


def test_module_imports_no_torch():
    code = "import nanochat.memory, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_and_optimizer_bytes_by_hand():
    r = small()
    C, V = 128, 512
    matrices = 2 * (4 * C * C + 8 * C * C) + 1 * 12 * 2          # 2 layers, one ve_gate (2 heads x 12 channels)
    assert matrices == 393240
    scalars = 2 * 2 + 24 + 2
    # fp32: every parameter 4 bytes; rotary cos + sin, 10 * T positions x D/2 = 32 each
    assert memory.model_bytes(r, "float32") == {"params": 4 * (3 * V * C + matrices + scalars),
                                                "buffers": 2 * 640 * 32 * 4}
    # bf16: wte and the one value embedding in 2 bytes, the rest fp32 masters, rotary tables in bf16
    assert memory.model_bytes(r, "bfloat16") == {"params": 2 * 2 * V * C + 4 * (V * C + matrices + scalars),
                                                 "buffers": 2 * 640 * 32 * 2}
    # fp16: the embeddings stay fp32 (GradScaler)
    assert memory.model_bytes(r, "float16")["params"] == 4 * (3 * V * C + matrices + scalars)

    # AdamW: exp_avg + exp_avg_sq of lm_head, wte, value embedding (512 x 128 each) and the 240 bytes of scalars
    adamw = 3 * 2 * V * C * 4 + 2 * 4 * (2 + 2 + 24 + 1 + 1)
    # Muon: (128,128) x 8, (512,128) x 2, (128,512) x 2, (2,12) x 1: fp32 momentum + the second moment along
    # the longer side ((K, m, 1) for m >= n, else (K, 1, n))
    muon = (8 * C * C * 4 + 8 * C * 4) + (2 * 4 * C * C * 4 + 2 * 4 * C * 4) * 2 + (2 * 12 * 4 + 12 * 4)
    assert memory.optimizer_state_bytes(r, "float32", world_size=1) == adamw + muon == 3158400
    # two ranks: half of every big AdamW table's rows, half of each Muon group's matrices; scalars replicated
    adamw2 = 3 * 2 * (V // 2) * C * 4 + 2 * 4 * 30
    muon2 = (4 * C * C * 4 + 4 * C * 4) + (1 * 4 * C * C * 4 + 1 * 4 * C * 4) * 2 + (2 * 12 * 4 + 12 * 4)
    assert memory.optimizer_state_bytes(r, "float32", world_size=2) == adamw2 + muon2 == 1579392

    # one process: the stacked Muon grads of every group (all alive in phase 1), then Polar Express on the biggest
    # group, here the 8 (128, 128) matrices: 8 fp32 copies of the group + its 8 Gram matrices of 128 x 128
    stacked = 4 * (8 * C * C + 2 * 4 * C * C + 2 * 4 * C * C + 2 * 12)
    assert memory.optimizer_step_bytes(r, "float32", 1) == stacked + 4 * 8 * (8 * C * C + C * C)
    # two ranks: per Muon group its reduced chunk, updated chunk and a gather buffer of both chunks (2 + 2 chunks);
    # per 512-row table a reduced half, the updated half's clone, its output, and the full gather buffer
    muon_buffers = 4 * (4 * C * C * 4 + 1 * 4 * C * C * 4 + 1 * 4 * C * C * 4 + 1 * 2 * 12 * 4)
    table_buffers = 3 * (3 * 256 * C * 4 + V * C * 4)
    assert memory.collective_bytes(r, "float32", 2) == muon_buffers + table_buffers == 5112192
    assert memory.collective_bytes(r, "float32", 1) == 0


def test_activation_bytes_by_hand():
    r = small()
    N, C = 64, 128                     # 1 row x 64 tokens
    u = N * C * 4                      # one (N, C) fp32 tensor
    small_terms = 4 * 1 * 2 * 64 + 4 * N * (2 + 2 + 2) + 3 * N * 2 * 4   # lse, rms_norm rstd, ve gate
    # layer 0: attention norm in/out, q/k before and after QK-norm, v, attention out, MLP norm in/out, 2 x (N, 4C)
    layer0 = (2 + 4 + 1 + 1 + 2) * u + 8 * u + small_terms
    # layer 1: also its residual-mix input and its value embedding
    layer1 = layer0 + u + u
    embedding = 3 * u                  # wte output, normed x, x0
    head = 2 * u + u                   # final norm input, hidden state; backout keeps the last output at L=2
    got = memory.activation_bytes(r, 1, "float32", "cpu")
    assert got["per_layer"] == [layer0, layer1]
    assert got["total"] == layer0 + layer1 + embedding + head == 1448960


def test_inference_by_hand():
    r = small()
    assert memory.kv_cache_bytes(r, 4, 64, "bfloat16") == 2 * 2 * 4 * 64 * 2 * 64 * 2   # k+v, L, B, T, Hkv, D, bf16
    # d12 (C 768, 12 heads of 64, 6 value-embedding layers): 24 x 768 cache values per token outweigh one
    # layer's forward, so generation is the peak, beside the weights cast to bf16 and the (C, V) head copy
    d12 = scaling.resolve_training(12, vocab_size=512, head_dim=64, max_seq_len=64, num_iterations=1,
                                   device_batch_size=1, total_batch_size=64)
    matrices = 12 * 12 * 768 * 768 + 6 * 12 * 12
    est = memory.estimate_inference_memory(d12, batch_size=256, dtype="bfloat16", device_type="cuda")
    assert est["peak_at"] == "generate"
    assert est["breakdown"]["kv_cache"] == 2 * 12 * 256 * 64 * 12 * 64 * 2
    assert est["breakdown"]["decode_weights"] == 2 * (matrices + 512 * 768) + 512 * 768 * 2
    # in fp32 the engine's cast is a no-op: only the head copy is new
    est32 = memory.estimate_inference_memory(d12, batch_size=256, dtype="float32", device_type="cuda")
    assert est32["breakdown"]["decode_weights"] == 512 * 768 * 4
    # loading: the checkpoint's copy of the parameters beside the model's
    assert memory.estimate_inference_memory(d12, batch_size=1, dtype="float32", device_type="cuda",
                                            kv_cache=False)["peak_at"] == "load"
    sizes = [memory.estimate_inference_memory(r, batch_size=b, dtype="bfloat16", device_type="cuda")["tensor_bytes"]
             for b in (1, 64, 256)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activations_match_what_autograd_saves(dtype):
    """Every tensor autograd keeps for backward (by storage, parameters excluded) in one real forward of nanochat's
    GPT on CPU, against activation_bytes + the fp32 head gradient nanochat.loss saves. Sliding windows included."""
    code = f"""
import os, sys
os.environ["NANOCHAT_DTYPE"] = "{dtype}"
import torch
from nanochat import memory, scaling
from nanochat.gpt import GPTConfig, build_model
r = scaling.resolve_training(4, vocab_size=512, head_dim=64, max_seq_len=256, num_iterations=1,
                             device_batch_size=2, total_batch_size=512)
assert min(r["window_sizes"]) < 255
m = build_model(GPTConfig(sequence_len=256, vocab_size=512, n_layer=4, n_head=r["n_head"], n_kv_head=r["n_kv_head"],
                          n_embd=r["n_embd"]), "cpu")
own = {{t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}}
saved = {{}}
def pack(t):
    s = t.untyped_storage()
    if s.data_ptr() not in own:
        saved[s.data_ptr()] = s.nbytes()
    return t
idx = torch.randint(0, 512, (2, 256))
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    m(idx, idx)
expected = memory.activation_bytes(r, 2, "{dtype}", "cpu")["total"] + 4 * r["padded_vocab_size"] * r["n_embd"]
print(sum(saved.values()), expected)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured, expected = (int(x) for x in out.stdout.split()[-2:])
    assert abs(expected - measured) <= 0.01 * measured, (expected, measured)


def test_optimizer_sharding_as_the_optimizer_lays_it_out():
    """Per-rank state from nanochat.optim's own param_layout on the real param groups, for several world sizes;
    at world size 1 also the state a real step creates."""
    import torch

    from nanochat.gpt import GPTConfig, build_model
    from nanochat.optim import param_layout
    r = scaling.resolve_training(3, vocab_size=600, head_dim=64, max_seq_len=64, num_iterations=1,
                                 device_batch_size=1, total_batch_size=64)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=600, n_layer=3, n_head=r["n_head"],
                                  n_kv_head=r["n_kv_head"], n_embd=r["n_embd"]), "cpu")
    opt = model.setup_optimizer()

    def per_rank(W):
        total = 0
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                lay = param_layout(group, p, W)
                if lay["kind"] == "muon":
                    if i == 0:   # stacked state lives on the group's first param
                        m, n = p.shape
                        total += 4 * lay["chunk"] * (m * n + (m if m >= n else n))
                else:
                    rows = p.shape[0] if p.dim() else 1
                    total += 2 * p.element_size() * (p.numel() // rows) * lay["chunk"]
        return total

    for W in (1, 2, 3, 8):
        assert memory.optimizer_state_bytes(r, "float32", W) == per_rank(W), W
    assert memory.optimizer_state_bytes(r, "float32", 8) < memory.optimizer_state_bytes(r, "float32", 2)
    model(torch.randint(0, 600, (1, 64)), torch.randint(0, 600, (1, 64))).backward()
    opt.step()
    real = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert memory.optimizer_state_bytes(r, "float32", 1) == real


def test_constants_match_the_torch_side():
    from nanochat import loss, optim
    assert memory.LOSS_CHUNK_ROWS == loss.CHUNK_ROWS
    assert memory.LOSS_GROUP_BYTES == loss.GROUP_BYTES
    assert memory.LOSS_FUSED_MIN_ELEMENTS == loss.FUSED_MIN_ELEMENTS
    assert memory.OPTIM_SMALL_NUMEL == optim.SMALL_NUMEL


@pytest.mark.parametrize("device_type,dtype", [("cpu", "float32"), ("cpu", "bfloat16"), ("cuda", "bfloat16")])
def test_more_rows_or_layers_need_more(device_type, dtype):
    def est(depth, batch, **kw):
        r = scaling.resolve_training(depth, max_seq_len=512, num_iterations=1, device_batch_size=1,
                                     total_batch_size=2 ** 16)
        return memory.estimate_training_memory(r, device_batch_size=batch, dtype=dtype, device_type=device_type,
                                               **kw)["per_device_bytes"]
    for depth in (4, 8, 12):
        sizes = [est(depth, b) for b in (1, 2, 4, 8, 16, 32)]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert est(4, 8) < est(8, 8) < est(12, 8) < est(20, 8)
    # more ranks never need more per device (the optimizer state shards)
    assert est(12, 1, world_size=8) < est(12, 1, world_size=1)


def test_world_size_shrinks_the_optimizer_part():
    r = scaling.resolve_training(20, num_iterations=1, device_batch_size=1, total_batch_size=2 ** 19)
    one = memory.optimizer_state_bytes(r, "bfloat16", 1)
    eight = memory.optimizer_state_bytes(r, "bfloat16", 8)
    # 20 layers: every Muon group splits evenly 8 ways only up to padding (ceil(K/8)); the tables by rows
    assert one / 8 <= eight <= one / 8 * 1.25


def test_pick_device_batch_size_largest_fitting_power_of_two():
    # total 24 rows of 512 per rank: powers of two dividing 24 are 8, 4, 2, 1 (16 does not divide)
    r = scaling.resolve_training(4, max_seq_len=512, num_iterations=1, device_batch_size=1,
                                 total_batch_size=24 * 512)
    assert memory.batch_candidates(r) == [8, 4, 2, 1]
    kw = dict(dtype="float32", device_type="cpu")

    def need(b):
        return memory.estimate_training_memory(r, device_batch_size=b, **kw)["per_device_bytes"]
    assert memory.pick_device_batch_size(r, 10 ** 15, **kw) == 8          # everything fits: the largest divisor
    capacity = (need(4) + 1) / 0.9                                        # 4 fits in 90%, 8 does not
    assert need(8) > 0.9 * capacity
    assert memory.pick_device_batch_size(r, capacity, **kw) == 4
    assert memory.pick_device_batch_size(r, capacity, margin=0.9 * need(2) / need(4), **kw) == 2
    assert memory.pick_device_batch_size(r, need(1) * 0.9, **kw) is None
    # with 2 ranks each sees 12 rows: 4 is still the largest power of two that divides them
    r2 = scaling.resolve_training(4, max_seq_len=512, num_iterations=1, device_batch_size=1,
                                  total_batch_size=24 * 512, world_size=2)
    assert memory.batch_candidates(r2, world_size=2) == [4, 2, 1]
    assert memory.pick_device_batch_size(r2, 10 ** 15, world_size=2, **kw) == 4


def test_d26_on_one_24gb_gpu_is_refused_and_the_reference_recipe_is_not():
    d26 = scaling.resolve_training(26, vocab_size=32768, max_seq_len=2048, num_iterations=1, device_batch_size=1,
                                   total_batch_size=2 ** 19)
    kw = dict(dtype="bfloat16", device_type="cuda", attention_backend="fa3")
    one_row = memory.estimate_training_memory(d26, device_batch_size=1, world_size=1, **kw)
    assert one_row["per_device_bytes"] > 24 * GiB
    assert memory.pick_device_batch_size(d26, 24 * GiB, world_size=1, **kw) is None
    line = memory.memory_refusal(d26, 24 * GiB, device_batch_size=16, world_size=1, **kw)
    assert line.startswith("d26 at device batch 16 x 2048 tokens needs ") and "even device batch 1 needs" in line
    assert "\n" not in line
    # the reference speedrun: d26 at device batch 16 on 8 x H100 80 GB (reference/nanochat.md section 19)
    d26_8 = scaling.resolve_training(26, vocab_size=32768, max_seq_len=2048, num_iterations=1, device_batch_size=16,
                                     total_batch_size=2 ** 19, world_size=8)
    assert memory.pick_device_batch_size(d26_8, 80 * GiB, world_size=8, **kw) >= 16
    assert memory.memory_refusal(d26_8, 80 * GiB, device_batch_size=16, world_size=8, **kw) is None


def test_breakdown_adds_up():
    r = scaling.resolve_training(6, max_seq_len=512, num_iterations=1, device_batch_size=1, total_batch_size=2 ** 14)
    for stage in ("base_train", "sft", "rl"):
        for device_type in ("cpu", "cuda"):
            est = memory.estimate_training_memory(r, device_batch_size=4, dtype="bfloat16", device_type=device_type,
                                                  stage=stage)
            assert sum(est["breakdown"].values()) == est["per_device_bytes"], (stage, device_type)
    est = memory.estimate_inference_memory(r, batch_size=4, dtype="bfloat16", device_type="cpu")
    assert sum(est["breakdown"].values()) == est["per_device_bytes"]


def test_optimizer_step_buffers_as_the_profiler_sees_them():
    """The live bytes one MuonAdamW.step adds over the grads and its state, on one process, from the profiler's
    allocation events (the second step: the state already exists)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nanochat.gpt import GPTConfig, build_model
    r = scaling.resolve_training(4, vocab_size=1024, head_dim=64, max_seq_len=64, num_iterations=1,
                                 device_batch_size=1, total_batch_size=64)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=1024, n_layer=4, n_head=r["n_head"],
                                  n_kv_head=r["n_kv_head"], n_embd=r["n_embd"]), "cpu")
    opt = model.setup_optimizer()
    idx = torch.randint(0, 1024, (1, 64))
    for _ in range(2):
        model(idx, idx).backward()
        if opt.state:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    expected = memory.optimizer_step_bytes(r, "float32", 1)
    assert abs(peak - expected) <= 0.1 * expected, (peak, expected)
