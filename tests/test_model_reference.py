"""Golden tests of nanochat.gpt against reference/nanochat.md section 2, written out independently of the model
code: a plain fp32 forward pass (loops over layers, heads and positions' masks, no shared helpers) that reads the
weights of a small GPT whose every parameter was randomized, the init values of 2.7 and the dtype policy of 2.10.
Run: .venv/bin/pytest tests/test_model_reference.py"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanochat import common
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPTConfig, build_model

# depth 4, GQA 4 query / 2 kv heads of 32 dims, T=256 so S = ceil(256/4/128)*128 = 128 < T actually slides
CONFIG = GPTConfig(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                   window_pattern="SSSL")
WINDOWS = [128, 128, 128, 256]  # SSSL tiled, last layer full
VE_LAYERS = [1, 3]              # i % 2 == (L-1) % 2: alternating, the last layer included
EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default eps for fp32

fp32_only = pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="the golden forward is fp32")


def rms(x):
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS)


def rope(x, base=100_000):
    """x (B,T,H,D). Half-split pairs (x1 = first half, x2 = second half) rotated by -theta:
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos, theta = t * base^(-2j/D)."""
    B, T, H, D = x.shape
    j = torch.arange(D // 2, dtype=torch.float64)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * j / D)    # (T, D/2)
    cos, sin = theta.cos().float()[None, :, None, :], theta.sin().float()[None, :, None, :]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def reference_forward(weights, idx, targets):
    """The section 2.6 forward from a state dict, in fp32. Returns (logits (B,T,V), mean loss)."""
    W = {k: v.float() for k, v in weights.items()}
    B, T = idx.shape
    L, C, H, Hkv, V = CONFIG.n_layer, CONFIG.n_embd, CONFIG.n_head, CONFIG.n_kv_head, CONFIG.vocab_size
    D = C // H

    # embedding, norm, smear: x_t += smear_lambda * sigmoid(w . x_t[:24]) * x_{t-1} (the unsmeared x_{t-1})
    x = rms(W["transformer.wte.weight"][idx])
    smeared = x.clone()
    for t in range(1, T):
        gate = W["smear_lambda"] * torch.sigmoid(x[:, t, :24] @ W["smear_gate.weight"].T)     # (B, 1)
        smeared[:, t] = x[:, t] + gate * x[:, t - 1]
    x = smeared
    x0 = x
    backout = None
    for i in range(L):
        p = f"transformer.h.{i}."
        x = W["resid_lambdas"][i] * x + W["x0_lambdas"][i] * x0
        # attention
        h = rms(x)
        q = (h @ W[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ W[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ W[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if i in VE_LAYERS:
            ve = W[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
            gate = 3 * torch.sigmoid(h[..., :12] @ W[p + "attn.ve_gate.weight"].T)           # (B, T, Hkv)
            v = v + gate[..., None] * ve
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        pos = torch.arange(T)
        allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= WINDOWS[i])  # (query, key)
        heads = []
        for head in range(H):
            kv = head // (H // Hkv)
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)             # (B, T, T)
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, :, kv])                          # (B, T, D)
        x = x + torch.cat(heads, dim=-1) @ W[p + "attn.c_proj.weight"].T
        # MLP
        h = rms(x)
        x = x + torch.relu(h @ W[p + "mlp.c_fc.weight"].T).pow(2) @ W[p + "mlp.c_proj.weight"].T
        if i == L // 2:
            backout = x
    x = x - W["backout_lambda"] * backout
    logits = rms(x) @ W["lm_head.weight"][:V].T          # the padded rows never reach the output
    logits = 15 * torch.tanh(logits / 15)
    # cross entropy, mean over the targets that are not -1
    keep = targets != -1
    log_z = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    loss = (log_z - picked)[keep].sum() / keep.sum()
    return logits, loss


def randomized_model(seed=0):
    """CONFIG with every parameter random, the zero-initialized projections, lambdas and gates included."""
    model = build_model(CONFIG, "cpu")
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale, offset=0.0):
        return torch.randn(shape, generator=g) * scale + offset

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "resid_lambdas":
                p.copy_(rand(p.shape, 0.2, 1.0))
            elif name == "x0_lambdas":
                p.copy_(rand(p.shape, 0.2, 0.5))
            elif name == "smear_lambda":
                p.fill_(0.7)
            elif name == "backout_lambda":
                p.fill_(0.4)
            elif name == "lm_head.weight":
                p.copy_(rand(p.shape, 5 / math.sqrt(CONFIG.n_embd)))  # logits ~5: the softcap bends them
            elif "embed" in name or "wte" in name:
                p.copy_(rand(p.shape, 1.0))
            else:  # every Linear, the gates included: unit-variance outputs for unit-RMS inputs
                p.copy_(rand(p.shape, 1 / math.sqrt(p.shape[1])))
    return model


@fp32_only
def test_config_is_what_the_reference_forward_assumes():
    model = build_model(CONFIG, "cpu")
    assert model.window_sizes == WINDOWS
    assert sorted(int(i) for i in model.value_embeds) == VE_LAYERS
    assert model.lm_head.weight.shape[0] == 320 and model.transformer.wte.weight.shape[0] == 320


@fp32_only
def test_forward_matches_the_written_out_reference():
    model = randomized_model()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.sequence_len), generator=g)
    targets = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.sequence_len), generator=g)
    targets[0, :17] = -1
    targets[1, 100:140] = -1
    want_logits, want_loss = reference_forward(model.state_dict(), idx, targets)
    assert 2.0 < want_logits.std() < 12.0 and want_loss > 1.0   # a regime where every term shows

    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)                              # chunked head + loss (nanochat.loss)
        model.chunked_loss = False
        plain_loss = model(idx, targets)                        # full logits + F.cross_entropy
        per_token = model(idx, targets, loss_reduction="none")
    assert logits.shape == (2, CONFIG.sequence_len, CONFIG.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain_loss, want_loss, rtol=0, atol=1e-5)
    assert (per_token[targets == -1] == 0).all()


def test_init_values():
    L, C = 4, 256
    model = build_model(GPTConfig(sequence_len=64, vocab_size=1000, n_layer=L, n_head=2, n_kv_head=2, n_embd=C), "cpu")
    s = math.sqrt(3) / math.sqrt(C)
    wte, lm_head = model.transformer.wte.weight.float(), model.lm_head.weight
    assert abs(wte.std().item() - 0.8) < 0.01 and abs(wte.mean().item()) < 0.01          # 1024 x 256 samples
    assert abs(lm_head.std().item() - 0.001) < 2e-5 and abs(lm_head.mean().item()) < 2e-5

    def uniform(w, lo, hi):
        """Inside [lo, hi] and spread over it: std (hi - lo)/sqrt(12), extremes near both ends."""
        w = w.float()
        width = hi - lo
        assert lo <= w.min().item() < lo + 0.05 * width and hi - 0.05 * width < w.max().item() <= hi
        assert abs(w.std().item() - width / math.sqrt(12)) < 0.1 * width / math.sqrt(12)

    for block in model.transformer.h:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            uniform(lin.weight, -s, s)
        uniform(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
        if block.attn.ve_gate is not None:
            assert 0 <= block.attn.ve_gate.weight.min() and block.attn.ve_gate.weight.max() <= 0.02
            assert block.attn.ve_gate.weight.std() > 0
    for ve in model.value_embeds.values():
        uniform(ve.weight, -s, s)
    assert 0 <= model.smear_gate.weight.min() and model.smear_gate.weight.max() <= 0.02
    assert model.smear_gate.weight.std() > 0

    ramp = [i / (L - 1) for i in range(L)]
    want_resid = torch.tensor([1.15 - 0.10 * r for r in ramp])     # 1.15 -> 1.05
    want_x0 = torch.tensor([0.20 - 0.15 * r for r in ramp])        # 0.20 -> 0.05
    torch.testing.assert_close(model.resid_lambdas.data, want_resid, rtol=0, atol=2e-7)
    torch.testing.assert_close(model.x0_lambdas.data, want_x0, rtol=0, atol=2e-7)
    assert model.smear_lambda.item() == 0.0
    assert model.backout_lambda.item() == torch.tensor(0.2).item()

    # 2.7: wte and the value embeddings in COMPUTE_DTYPE unless fp16; every other parameter an fp32 master
    embed_dtype = torch.float32 if COMPUTE_DTYPE == torch.float16 else COMPUTE_DTYPE
    for name, p in model.named_parameters():
        embedding = name == "transformer.wte.weight" or name.startswith("value_embeds.")
        assert p.dtype == (embed_dtype if embedding else torch.float32), name
    assert model.cos.dtype == COMPUTE_DTYPE and model.sin.dtype == COMPUTE_DTYPE


# -----------------------------------------------------------------------------
# dtype policy (2.10): NANOCHAT_DTYPE, else bf16 on CUDA with SM >= 8, else fp32


def test_dtype_detection(monkeypatch):
    for name, dtype in [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16),
                        ("fp16", torch.float16), ("float32", torch.float32), ("fp32", torch.float32)]:
        monkeypatch.setenv("NANOCHAT_DTYPE", name)
        assert common._detect_compute_dtype() == dtype, name
    monkeypatch.setenv("NANOCHAT_DTYPE", "float64")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE='float64': expected one of bfloat16, float16, float32"):
        common._detect_compute_dtype()
    ampere = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("NANOCHAT_DTYPE")
        else:
            monkeypatch.setenv("NANOCHAT_DTYPE", unset)
        assert common._detect_compute_dtype() == (torch.bfloat16 if ampere else torch.float32)


PROBE = """
import json, torch
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPTConfig, build_model
m = build_model(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), "cpu")
logits = m(torch.randint(0, 100, (1, 8)))
print(json.dumps({"compute": str(COMPUTE_DTYPE), "wte": str(m.transformer.wte.weight.dtype),
                  "ve": str(m.value_embeds["1"].weight.dtype), "lm_head": str(m.lm_head.weight.dtype),
                  "cos": str(m.cos.dtype), "logits": str(logits.dtype)}))
"""


@pytest.mark.parametrize("env,compute,embeddings", [
    ("bfloat16", "torch.bfloat16", "torch.bfloat16"),
    ("float16", "torch.float16", "torch.float32"),    # fp16: GradScaler needs fp32 embedding grads
    ("float32", "torch.float32", "torch.float32"),
])
def test_dtype_policy_in_a_fresh_process(env, compute, embeddings):
    """COMPUTE_DTYPE is read once at import: each dtype runs in its own interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, "NANOCHAT_DTYPE": env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"compute": compute, "wte": embeddings, "ve": embeddings, "lm_head": "torch.float32",
                   "cos": compute, "logits": "torch.float32"}
