"""
Causal (sliding-window) attention in the (B, T, H, D) layout, with an optional KV cache.

One function, `attention(q, k, v, window, kv_cache=None, layer_idx=0)`, dispatches to the backend chosen once
at import (printed by the stages and recorded in their events as `attention_backend`):

- "fa3": FlashAttention 3 (the `flash_attn_interface` module of a local FA3 build), Hopper GPUs. "auto" picks it
  only when COMPUTE_DTYPE is bf16, as the reference (section 3: fp16 and fp32 fall back);
- "flash_attn": flash-attn 2 (`pip install nanorun[gpu]`), CUDA bf16/fp16;
- "flex": PyTorch FlexAttention for the sliding-window layers (a block-sparse mask, no dense (T, T) mask;
  compiled) and SDPA's causal kernel for the full-window layers. The CUDA default when no FA is installed;
- "sdpa": PyTorch SDPA: `is_causal` for full windows, an explicit boolean mask for sliding windows. The CPU
  default: FlexAttention has no backward on CPU (reference/platform-facts.md) and its compile costs seconds.

NANOCHAT_ATTENTION=fa3|flash_attn|flex|sdpa forces one (an unavailable choice is a one-line error at import);
the default "auto" takes the first available of fa3 (bf16 only), flash_attn (bf16/fp16), flex (CUDA only),
sdpa. `available_backends()` lists what this machine can run; tests/test_attention.py checks that every one of
them gives the same outputs (and, where backward exists on CPU, the same gradients) as a textbook masked softmax.

Window convention (as FA's window_size=(left, 0)): query i attends to keys j with i - window <= j <= i, i.e.
window+1 keys; window >= T - 1 means full causal attention.
"""

import functools
import os

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

BACKENDS = ("fa3", "flash_attn", "flex", "sdpa")


def _load_fa3():
    """FA3 from a local build (no network): the `flash_attn_interface` module, Hopper (sm90) only."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        import flash_attn_interface
        return flash_attn_interface
    except Exception:
        return None


def _load_fa2():
    if not torch.cuda.is_available():
        return None
    try:
        import flash_attn
        return flash_attn
    except Exception:
        return None


def _has_flex():
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
        return True
    except Exception:
        return False


_FA3 = _load_fa3()
_FA2 = _load_fa2()
HAS_FLASH = _FA2 is not None


def available_backends(device_type=None):
    """Backends that can run here, best first. On CPU: flex (forward only) and sdpa."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    found = []
    if device_type == "cuda" and _FA3 is not None:
        found.append("fa3")
    if device_type == "cuda" and _FA2 is not None:
        found.append("flash_attn")
    if _has_flex():
        found.append("flex")
    found.append("sdpa")
    return found


def choose_backend(requested=None, device_type=None, dtype=COMPUTE_DTYPE, available=None):
    """The backend for `requested` ("auto" or a name); raises ValueError naming what is available.
    `available` defaults to available_backends(device_type) (tests pass a GPU machine's list)."""
    requested = (requested or "auto").strip().lower()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    avail = available_backends(device_type) if available is None else list(available)
    if requested == "auto":
        if "fa3" in avail and dtype == torch.bfloat16:
            return "fa3"
        if "flash_attn" in avail and dtype in (torch.bfloat16, torch.float16):
            return "flash_attn"
        return "flex" if device_type == "cuda" and "flex" in avail else "sdpa"
    if requested not in BACKENDS:
        raise ValueError(f"NANOCHAT_ATTENTION={requested!r}: expected auto or one of {', '.join(BACKENDS)}")
    if requested not in avail:
        raise ValueError(f"NANOCHAT_ATTENTION={requested}: not available on {device_type} "
                         f"(available: {', '.join(avail)})")
    return requested


BACKEND = choose_backend(os.environ.get("NANOCHAT_ATTENTION"))


# -----------------------------------------------------------------------------
# SDPA (and the textbook reference the tests compare against)

def _window_mask(Tq, Tk, window, device):
    """Bool (Tq, Tk) mask, True = attend. Query i sits at absolute position Tk - Tq + i."""
    rows = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(1)
    cols = torch.arange(Tk, device=device).unsqueeze(0)
    return (cols <= rows) & (rows - cols <= window)


@functools.lru_cache(maxsize=8)
def _additive_mask(Tq, Tk, window, device, dtype):
    """_window_mask as 0 / -inf in the compute dtype, built once per shape: the masked calls (KV-cache chunks in
    CORE's shared-prefix scoring, sliding windows) rebuilt it in every layer of every forward (~4 s of a CPU
    base_eval), and SDPA on CPU runs an additive mask faster than a boolean one (5.8 vs 9.1 ms at 400 x 400).
    No row is fully masked (every query sees itself)."""
    allowed = _window_mask(Tq, Tk, window, device)
    return torch.zeros(Tq, Tk, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def sdpa_attention(q, k, v, window):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D) where the Tq queries are the LAST Tq of the Tk positions."""
    Tq, H = q.size(1), q.size(2)
    Tk = k.size(1)
    gqa = k.size(2) != H
    if Tq == 1:
        # decode: the single query sees the last window+1 keys, no mask needed
        if window < Tk - 1:
            k, v = k[:, Tk - window - 1:], v[:, Tk - window - 1:]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=False, enable_gqa=gqa)
    elif Tq == Tk and window >= Tk - 1:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=gqa)
    else:
        mask = _additive_mask(Tq, Tk, window, q.device, q.dtype)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def math_attention(q, k, v, window):
    """Textbook masked softmax in fp32 (the tests' reference; same signature as sdpa_attention)."""
    H, D = q.size(2), q.size(-1)
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / D ** 0.5
    scores = scores.masked_fill(~_window_mask(q.size(1), k.size(1), window, q.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


# -----------------------------------------------------------------------------
# FlexAttention: block-sparse sliding windows

@functools.lru_cache(maxsize=64)
def _flex_block_mask(Tq, Tk, window, device):
    from torch.nn.attention.flex_attention import create_block_mask
    offset = Tk - Tq  # the queries are the last Tq positions (a KV-cache chunk)

    def sliding_causal(b, h, q_idx, kv_idx):
        q_abs = q_idx + offset
        return (kv_idx <= q_abs) & (q_abs - kv_idx <= window)
    return create_block_mask(sliding_causal, None, None, Tq, Tk, device=device)


@functools.lru_cache(maxsize=1)
def _flex_kernel():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)  # eager flex_attention is a slow reference loop


def flex_attention(q, k, v, window):
    """Same contract as sdpa_attention. Full-window and single-token calls go to SDPA (nothing to skip)."""
    Tq, Tk = q.size(1), k.size(1)
    if Tq == 1 or window >= Tk - 1:
        return sdpa_attention(q, k, v, window)
    mask = _flex_block_mask(Tq, Tk, window, str(q.device))
    y = _flex_kernel()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# dispatch

def _fa_module(backend):
    return _FA3 if backend == "fa3" else _FA2


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp


def attention(q, k, v, window, kv_cache=None, layer_idx=0, backend=None):
    """q (B,T,H,D), k/v (B,T,Hkv,D) for the T new positions -> (B,T,H,D).
    With a kv_cache the new k/v are written at kv_cache.get_pos() (one position for every row) and the
    queries attend over everything cached so far; the caller advances the cache after the last layer.
    `backend` overrides the module's BACKEND (tests)."""
    backend = backend or BACKEND
    T = q.size(1)
    fa = backend in ("fa3", "flash_attn") and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if kv_cache is None:
        if fa:
            left = -1 if window >= T - 1 else window      # -1 = unlimited: the plain causal kernel
            return _first(_fa_module(backend).flash_attn_func(q, k, v, causal=True, window_size=(left, 0)))
        if backend == "flex" and (q.is_cuda or not torch.is_grad_enabled()):
            return flex_attention(q, k, v, window)
        return sdpa_attention(q, k, v, window)

    k_cache, v_cache = kv_cache.get_layer_cache(layer_idx)
    if fa and k_cache.dtype == q.dtype:
        # writes k/v into the cache in place at cache_seqlens and attends over the prefix
        return _first(_fa_module(backend).flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens, causal=True,
            window_size=(window, 0)))
    pos = kv_cache.get_pos()
    if pos + T > k_cache.size(1):
        raise ValueError(f"KV cache overflow: position {pos} + {T} new tokens > cache length {k_cache.size(1)}")
    k_cache[:, pos:pos + T] = k.to(k_cache.dtype)
    v_cache[:, pos:pos + T] = v.to(v_cache.dtype)
    keys = k_cache[:, :pos + T].to(q.dtype)
    values = v_cache[:, :pos + T].to(q.dtype)
    # (no flex here: prompt lengths vary from call to call, and each new shape would recompile its kernel)
    return sdpa_attention(q, keys, values, window)
