"""Model, attention and checkpoint tests: accounting vs nanochat.scaling, shapes, training signal, windows,
KV-cache consistency, checkpoint round trip and "meta last" semantics. Run: .venv/bin/pytest tests/test_model.py"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from nanochat import scaling
from nanochat.attention import BACKEND, attention, available_backends, choose_backend
from nanochat.checkpoint import find_last_step, list_steps, load_checkpoint, load_model, save_checkpoint
from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, build_model


def config_for(depth, vocab_size=32768, aspect_ratio=64, head_dim=128, sequence_len=2048, window_pattern="SSSL"):
    d = scaling.model_dims(depth, aspect_ratio, head_dim)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=d["n_head"],
                     n_kv_head=d["n_kv_head"], n_embd=d["n_embd"], window_pattern=window_pattern)


def tiny_config(**kw):
    base = dict(sequence_len=64, vocab_size=300, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("depth", range(2, 27))
def test_counts_and_flops_match_scaling(depth):
    with torch.device("meta"):
        model = GPT(config_for(depth))
    assert model.num_scaling_params() == scaling.param_counts(depth)
    assert model.estimate_flops() == scaling.flops_per_token(depth)


@pytest.mark.parametrize("depth,vocab,aspect,head_dim,seq,pattern", [
    (4, 50257, 64, 64, 512, "L"),
    (6, 8192, 96, 128, 1024, "SSL"),
    (9, 1000, 48, 64, 256, "SSSL"),
    (3, 65, 128, 32, 128, "S"),
])
def test_counts_and_flops_other_shapes(depth, vocab, aspect, head_dim, seq, pattern):
    with torch.device("meta"):
        model = GPT(config_for(depth, vocab, aspect, head_dim, seq, pattern))
    assert model.num_scaling_params() == scaling.param_counts(depth, vocab, aspect, head_dim)
    assert model.estimate_flops() == scaling.flops_per_token(depth, vocab, aspect, head_dim, seq, pattern)
    assert model.transformer.wte.weight.shape[0] == scaling.padded_vocab_size(vocab)


def test_estimate_flops_survives_fp8_conversion():
    torchao_float8 = pytest.importorskip("torchao.float8")
    model = build_model(tiny_config(vocab_size=320), "cpu")
    before = model.estimate_flops()
    torchao_float8.convert_to_float8_training(
        model, module_filter_fn=lambda m, fqn: min(m.in_features, m.out_features) >= 128)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Float8Linear"
    assert model.estimate_flops() == before


def test_inference_accounting_by_hand():
    """reference 2.9 on a GQA model with windows [128, 128, 128, 256] (T=256, SSSL) and H*D = 4*32 = 128."""
    with torch.device("meta"):
        model = GPT(tiny_config(sequence_len=256, n_head=4, n_kv_head=2))
    assert model.window_sizes == [128, 128, 128, 256]
    # per layer c_q 128x128, c_k/c_v 128x64, c_proj 128x128, c_fc/mlp c_proj 128x512 = 180,224 (x4 layers);
    # ve_gate 12x2 on layers 1 and 3; smear_gate 24; lm_head 320x128 (vocab 300 padded to 320)
    assert model.num_matmul_params() == 4 * 180_224 + 2 * 24 + 24 + 40_960 == 761_928
    # decode: 2 * 761,928 = 1,523,856 plus 4*128 = 512 FLOPs per attended key
    assert model.estimate_decode_flops(100) == 1_523_856 + 512 * 400             # every layer sees 100 keys
    assert model.estimate_decode_flops(200) == 1_523_856 + 512 * (3 * 128 + 200)
    assert model.estimate_decode_flops(1000) == 1_523_856 + 512 * (3 * 128 + 256)  # the full window counts as T
    # prefill 200: S layers (w=128) 128*129/2 + 72*128 = 17,472 pairs each; L layer (w=200) 200*201/2 = 20,100
    assert model.estimate_prefill_flops(200) == 1_523_856 * 200 + 512 * (3 * 17_472 + 20_100) == 341_899_392
    assert model.estimate_prefill_flops(1) == model.estimate_decode_flops(1)
    assert model.estimate_prefill_flops(300) == sum(model.estimate_decode_flops(c) for c in range(1, 301))
    assert model.estimate_flops() == 3 * model.estimate_decode_flops(256)   # training = 3x the forward at T
    # KV cache: k and v, 2 kv heads x 32 dims per layer
    size = COMPUTE_DTYPE.itemsize
    assert model.kv_bytes_per_token() == 4 * 2 * 2 * 32 * size == 512 * size
    assert model.kv_read_bytes(100) == 4 * 100 * 128 * size
    assert model.kv_read_bytes(200) == (3 * 128 + 200) * 128 * size
    assert model.kv_read_bytes(10_000) == (3 * 128 + 256) * 128 * size


def test_init_values():
    model = build_model(tiny_config(n_layer=5), "cpu")
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    assert model.smear_lambda.item() == 0.0 and abs(model.backout_lambda.item() - 0.2) < 1e-7
    assert model.transformer.h[0].attn.c_proj.weight.abs().sum() == 0
    s = math.sqrt(3) / math.sqrt(128)
    assert model.transformer.h[0].attn.c_q.weight.abs().max() <= s
    assert model.transformer.h[0].mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert 0.7 < model.transformer.wte.weight.float().std() < 0.9
    assert sorted(model.value_embeds.keys()) == ["0", "2", "4"]  # alternating, last layer included
    assert model.cos.shape == (1, 640, 1, 32) and "cos" not in model.state_dict()


def test_forward_shapes_and_softcap():
    model = build_model(tiny_config(), "cpu")
    idx = torch.randint(0, 300, (3, 40))
    logits = model(idx)
    assert logits.shape == (3, 40, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    targets = idx.clone()
    targets[:, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 40)
    assert (per_token[:, :5] == 0).all()
    mean = model(idx, targets)
    assert torch.allclose(mean, per_token[:, 5:].mean(), atol=1e-5)


def test_loss_decreases_on_overfit_batch():
    torch.manual_seed(0)
    model = build_model(tiny_config(), "cpu")
    opt = model.setup_optimizer(matrix_lr=0.02, weight_decay=0.1)
    idx = torch.randint(0, 300, (2, 64))
    losses = []
    for _ in range(20):
        loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def naive_attention(q, k, v, window):
    """Textbook masked softmax over (B,T,H,D) inputs, offset queries at the end of the keys."""
    Tq, Tk, D = q.size(1), k.size(1), q.size(-1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    rows = torch.arange(Tk - Tq, Tk).unsqueeze(1)
    cols = torch.arange(Tk).unsqueeze(0)
    allowed = (cols <= rows) & (rows - cols <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", F.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("window", [3, 8, 100])
def test_attention_windows_match_naive(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 16) for _ in range(3))
    with torch.no_grad():  # flex runs its own kernel on CPU only without gradients
        got = attention(q, k, v, window)   # the active backend (CPU tensors: FA backends fall back to sdpa)
    assert torch.allclose(got, naive_attention(q, k, v, window), atol=1e-5)
    # whichever backend is active (auto, or NANOCHAT_ATTENTION) is the selection rule's answer and runs here
    assert BACKEND == choose_backend(os.environ.get("NANOCHAT_ATTENTION")) and BACKEND in available_backends()


def test_kv_cache_decode_matches_full_forward():
    torch.manual_seed(0)
    # every window is 16 tokens (S is capped at T): 30 positions exercise the sliding-window paths
    model = build_model(tiny_config(sequence_len=16), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    idx = torch.randint(0, 300, (2, 30))   # longer than sequence_len and the short window
    full = model(idx)
    cache = KVCache.for_model(model, 2, 30)
    pieces = [model(idx[:, :11], kv_cache=cache)]
    for t in range(11, 30):
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)


# -----------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = build_model(tiny_config(), "cpu")
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
    opt = model.setup_optimizer()
    model(torch.randint(0, 300, (1, 8)), torch.randint(0, 300, (1, 8))).backward()
    opt.step()
    meta = {"model_config": vars(model.config), "val_bpb": 1.5}
    save_checkpoint(str(tmp_path), 7, model.state_dict(), opt.state_dict(), meta, rank=0, rank_state={"pos": 3})
    assert sorted(os.listdir(tmp_path)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt",
                                            "state_000007_rank0.pt"]
    assert find_last_step(str(tmp_path)) == 7
    loaded, meta2 = load_model(str(tmp_path))
    assert meta2["step"] == 7 and meta2["val_bpb"] == 1.5
    idx = torch.randint(0, 300, (2, 20))
    assert torch.equal(loaded(idx), model(idx))
    _, optim_state, _, rank_state = load_checkpoint(str(tmp_path), 7)
    assert rank_state == {"pos": 3} and optim_state["state"]


def test_checkpoint_meta_last_and_errors(tmp_path):
    d = str(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        find_last_step(d)
    model = build_model(tiny_config(), "cpu")
    meta = {"model_config": vars(model.config)}
    save_checkpoint(d, 5, model.state_dict(), None, meta)
    save_checkpoint(d, 10, model.state_dict(), None, meta)
    # a crash between the model file and the meta file: step 15 must not count
    torch.save(model.state_dict(), os.path.join(d, "model_000015.pt"))
    assert list_steps(d) == [5, 10] and find_last_step(d) == 10
    with pytest.raises(FileNotFoundError, match=r"checkpoint step 15 not found in .* \(have: 5, 10\)"):
        load_model(d, step=15)
    with pytest.raises(FileNotFoundError, match="optimizer file for rank 0"):
        load_checkpoint(d, 10)


def test_load_model_from_bf16_compiled_state(tmp_path):
    model = build_model(tiny_config(), "cpu")
    state = {"_orig_mod." + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_checkpoint(str(tmp_path), 1, state, None, {"model_config": vars(model.config)})
    loaded, _ = load_model(str(tmp_path), step=1)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.allclose(loaded.lm_head.weight, model.lm_head.weight, atol=1e-2 * 0.01)
