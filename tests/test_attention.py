"""Attention backends (nanochat.attention): every backend available on this machine gives the same outputs and
gradients as a textbook masked softmax, for full and sliding windows, GQA and KV-cache chunks; the choice is
validated and recorded. On CPU: sdpa (forward + backward) and flex (forward only: PyTorch has no FlexAttention
backward on CPU, so flex is only used without gradients there, and that is checked too)."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat import attention as A
from nanochat.engine import KVCache
from nanochat.gpt import GPTConfig, build_model

CPU_BACKENDS = [b for b in A.available_backends("cpu")]
SHAPES = [  # (T, H, Hkv, window)
    (64, 4, 4, 16), (64, 4, 2, 16), (100, 2, 2, 7), (100, 2, 1, 99), (128, 2, 2, 200), (96, 2, 2, 0),
]


def qkv(T, H, Hkv, D=32, B=2, seed=0, Tq=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq or T, H, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    return q, k, v


def test_cpu_has_sdpa_and_flex_and_auto_picks_sdpa():
    assert CPU_BACKENDS[-1] == "sdpa" and "flex" in CPU_BACKENDS
    assert A.choose_backend("auto", "cpu", torch.float32) == "sdpa"
    assert A.choose_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert A.choose_backend("FLEX", "cpu") == "flex"


@pytest.mark.parametrize("available,dtype,want", [
    # Hopper with both FA builds: FA3 only under bf16 (reference section 3), flash-attn 2 takes fp16
    (["fa3", "flash_attn", "flex", "sdpa"], torch.bfloat16, "fa3"),
    (["fa3", "flash_attn", "flex", "sdpa"], torch.float16, "flash_attn"),
    (["fa3", "flash_attn", "flex", "sdpa"], torch.float32, "flex"),
    (["fa3", "flex", "sdpa"], torch.float16, "flex"),
    (["fa3", "sdpa"], torch.float16, "sdpa"),
    (["flash_attn", "flex", "sdpa"], torch.bfloat16, "flash_attn"),
    (["flex", "sdpa"], torch.bfloat16, "flex"),
])
def test_auto_choice_on_a_gpu_machine(available, dtype, want):
    assert A.choose_backend("auto", "cuda", dtype, available=available) == want
    if "fa3" in available:  # an explicit choice is honoured whatever the dtype
        assert A.choose_backend("fa3", "cuda", torch.float16, available=available) == "fa3"


def test_bad_backend_names_are_one_line_errors():
    with pytest.raises(ValueError, match="expected auto or one of fa3, flash_attn, flex, sdpa"):
        A.choose_backend("flash", "cpu")
    with pytest.raises(ValueError, match=r"fa3: not available on cpu \(available: flex, sdpa\)"):
        A.choose_backend("fa3", "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T,H,Hkv,window", SHAPES)
def test_outputs_match_textbook(backend, T, H, Hkv, window):
    q, k, v = qkv(T, H, Hkv)
    want = A.math_attention(q, k, v, window)
    with torch.no_grad():
        got = A.attention(q, k, v, window, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,H,Hkv,window", SHAPES)
def test_gradients_match_textbook(T, H, Hkv, window):
    """Gradients of every CPU backend that has a backward (flex is forward-only on CPU and falls back to sdpa
    when gradients are on, so its training path is sdpa's: checked by running it with grad enabled)."""
    grads = {}
    for name in ["math"] + CPU_BACKENDS:
        q, k, v = (t.requires_grad_() for t in qkv(T, H, Hkv))
        out = A.math_attention(q, k, v, window) if name == "math" else A.attention(q, k, v, window, backend=name)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = (q.grad, k.grad, v.grad)
    for name in CPU_BACKENDS:
        for got, want in zip(grads[name], grads["math"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flex_really_runs_the_flex_kernel_for_windows():
    """Not silently SDPA: FlexAttention refuses backward on CPU, which only its own kernel would say."""
    q, k, v = (t.requires_grad_() for t in qkv(64, 2, 2))
    with pytest.raises(NotImplementedError, match="FlexAttention does not support backward on CPU"):
        A.flex_attention(q, k, v, 16)
    assert A._flex_block_mask.cache_info().currsize >= 1


@pytest.mark.parametrize("Tq", [1, 5, 32])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_queries_at_the_end_of_longer_keys(Tq, backend):
    """KV-cache chunks: Tq new queries are the last Tq of Tk positions."""
    q, k, v = qkv(80, 2, 1, Tq=Tq)
    for window in (7, 40, 79):
        want = A.math_attention(q, k, v, window)
        with torch.no_grad():
            got = A.flex_attention(q, k, v, window) if backend == "flex" else A.sdpa_attention(q, k, v, window)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_model_logits_and_cached_decode_same_under_every_backend():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=320, vocab_size=200, n_layer=4, n_head=2, n_kv_head=1, n_embd=64,
                                  window_pattern="SSSL"))
    assert model.window_sizes == [128, 128, 128, 320]
    idx = torch.randint(0, 200, (2, 200))
    outs = {}
    for backend in CPU_BACKENDS:
        A.BACKEND, saved = backend, A.BACKEND
        try:
            with torch.no_grad():
                full = model(idx)
                cache = KVCache.for_model(model, 2, 200)
                pieces = [model(idx[:, :150], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache)
                                                                    for t in range(150, 200)]
        finally:
            A.BACKEND = saved
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
        outs[backend] = full
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(outs[backend], outs["sdpa"], rtol=1e-4, atol=1e-4)


def test_env_var_chooses_and_rejects(tmp_path):
    code = "from nanochat.attention import BACKEND; print(BACKEND)"
    env = {**os.environ, "NANOCHAT_ATTENTION": "flex"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "flex", out.stderr[-500:]
    env["NANOCHAT_ATTENTION"] = "fa3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "NANOCHAT_ATTENTION=fa3: not available on cpu" in out.stderr
