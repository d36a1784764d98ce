"""
Causal (sliding-window) attention in the (B, T, H, D) layout, with an optional KV cache.

One function, `attention(q, k, v, window, kv_cache=None, layer_idx=0)`, dispatches to:
- flash-attn (the `flash_attn` package) when it is installed and the tensors are CUDA bf16/fp16;
- PyTorch SDPA otherwise: `is_causal` fast path for full windows, an explicit boolean mask for
  sliding windows (slow, no flash kernel), a sliced-key path for single-token decode.

`BACKEND` names the backend the training stage will use ("flash_attn" or "sdpa"); it is printed and
recorded in the stage's events. Window convention (as FA's window_size=(left, 0)): query i attends
to keys j with i - window <= j <= i, i.e. window+1 keys; window >= T means full causal attention.

Run the tests: .venv/bin/pytest tests/test_model.py -k attention
"""

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

try:  # flash-attn 2 (CUDA only; pip install nanorun[gpu]). Anything going wrong means SDPA.
    if not torch.cuda.is_available():
        raise ImportError("no CUDA")
    from flash_attn import flash_attn_func, flash_attn_with_kvcache
    HAS_FLASH = True
except Exception:
    flash_attn_func = flash_attn_with_kvcache = None
    HAS_FLASH = False

BACKEND = "flash_attn" if HAS_FLASH and COMPUTE_DTYPE in (torch.bfloat16, torch.float16) else "sdpa"


def _use_flash(q):
    return HAS_FLASH and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _window_mask(Tq, Tk, window, device):
    """Bool (Tq, Tk) mask, True = attend. Query i sits at absolute position Tk - Tq + i."""
    rows = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(1)
    cols = torch.arange(Tk, device=device).unsqueeze(0)
    return (cols <= rows) & (rows - cols <= window)


def sdpa_attention(q, k, v, window):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D) where the Tq queries are the LAST Tq of the Tk positions."""
    B, Tq, H, D = q.shape
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
        mask = _window_mask(Tq, Tk, window, q.device)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def attention(q, k, v, window, kv_cache=None, layer_idx=0):
    """q (B,T,H,D), k/v (B,T,Hkv,D) for the T new positions -> (B,T,H,D).
    With a kv_cache the new k/v are written at kv_cache.get_pos() (one position for every row) and the
    queries attend over everything cached so far; the caller advances the cache after the last layer."""
    B, T = q.shape[:2]
    if kv_cache is None:
        if _use_flash(q):
            left = -1 if window >= T - 1 else window      # -1 = unlimited: the plain causal kernel
            return flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
        return sdpa_attention(q, k, v, window)

    k_cache, v_cache = kv_cache.get_layer_cache(layer_idx)
    if _use_flash(q) and k_cache.dtype == q.dtype:
        # writes k/v into the cache in place at cache_seqlens and attends over the prefix
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                       causal=True, window_size=(window, 0))
    pos = kv_cache.get_pos()
    if pos + T > k_cache.size(1):
        raise ValueError(f"KV cache overflow: position {pos} + {T} new tokens > cache length {k_cache.size(1)}")
    k_cache[:, pos:pos + T] = k.to(k_cache.dtype)
    v_cache[:, pos:pos + T] = v.to(v_cache.dtype)
    keys = k_cache[:, :pos + T].to(q.dtype)
    values = v_cache[:, :pos + T].to(q.dtype)
    return sdpa_attention(q, keys, values, window)
