"""
The lm_head + softcap + cross-entropy of nanochat.gpt, computed a chunk of rows at a time so that the
(tokens, vocab) logits never exist in full.

At the reference shape (8 x 512 tokens, vocab 32768) the plain path builds five fp32 tensors of 537 MB each
(logits, logits/15, tanh, softcap, log-softmax) and as many again in backward. On a CPU that traffic, not the
matmul, dominated the step. Here every chunk of `chunk_rows` rows computes its logits, loss and -- when
gradients are wanted -- its share of the gradients of the hidden states and of the head weight right away, while
the chunk is still in cache. Backward then only scales those gradients by the incoming scalar. Same math as

    logits = 15 * tanh((h @ W[:V].T).float() / 15)
    loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)

up to float rounding (tests/test_loss.py compares values and gradients with that expression).

    from nanochat.loss import softcap_cross_entropy
    loss = softcap_cross_entropy(h, lm_head.weight, targets, vocab_size=V, softcap=15.0)   # h (N, C)

reduction "mean" or "sum" with gradients, or any reduction ("none" too) without them. A per-token loss that
needs gradients (RL) takes the plain path in gpt.py; so does a compiled model on GPU. On CPU a compiled model
runs this function eagerly after its compiled trunk (torch.compiler.disable: a graph break).

One pass over each chunk's logits z. With t = tanh(z / cap), e = exp(cap * t), S = sum_j e (|cap * t| <= cap, so
no max-subtraction is needed in fp32) and a row weight k (1/N for a mean, 1 for a sum, 0 for ignored rows):

    loss_i       = log S_i - cap * t_i,target
    dL/dz_ij     = k_i * (e_ij / S_i - [j = target_i]) * (1 - t_ij^2)
                 = (k_i / S_i) * u_ij  -  c_i * [j = target_i],   u = e * (1 - t^2),  c_i = k_i * (1 - t_i,target^2)

so the pass only has to produce S and u; the row scale k/S is applied to the (n, C) side of the two gradient
matmuls (u @ W and u^T @ h), and the one-hot term is a gather/index_add of N rows at the end. On CPU that pass
is one torch.compile'd kernel (`_pass`) reading z once in the compute dtype and writing u in it (no fp32 copy of
a bf16 chunk, no temporaries); tanh is computed as 1 - 2 / (exp(2z/cap) + 1), within 3e-7 of torch.tanh and
cheaper in the generated code. Chunks too small to pay for a compile, devices other than CPU (not yet measured
there), NANOCHAT_FUSED_LOSS=0 and any compile failure use the same math with stock ops.

Layouts (chosen by measurement, bench/RESULTS.md): in fp32 the logits are computed as (V, n) (the head matmul
writes that layout faster on the measured CPU) and the weight gradient is accumulated per chunk with an fp32
addmm; in bf16/fp16 they are (n, V) and u of several chunks is buffered for one weight-gradient matmul, because a
bf16 matmul cannot write fp32 on CPU and converting a (V, C) product per chunk cost more than the matmul itself.
"""

import os
import warnings

import torch

CHUNK_ROWS = 256             # 256 x 32768 logits per chunk: the fastest of 128/256/512 on the measured CPU
FUSED_MIN_ELEMENTS = 1 << 19  # rows x vocab of a chunk from which the compiled kernel is used
GROUP_BYTES = 64 << 20       # bf16/fp16: gradient rows buffered per weight-gradient matmul


# -----------------------------------------------------------------------------
# The elementwise pass over one chunk. z holds the chunk's logits before the softcap, in the compute dtype, with
# the vocabulary along `dim`: (n, V) with dim=1, or (V, n) with dim=0.


def _tanh_cap(z, cap: float):
    """tanh(z / cap) in fp32 through one exp; exact to fp32 rounding for any z (the clamp saturates)."""
    u = (z.float() * (2.0 / cap)).clamp(-30.0, 30.0)
    return 1.0 - 2.0 / (torch.exp(u) + 1.0)


def _sumexp(z, cap: float, dim: int):
    """S: the sum over the vocabulary of exp(softcapped logit), fp32, keepdim."""
    return torch.exp(_tanh_cap(z, cap) * cap).sum(dim=dim, keepdim=True)


def _pass(z, cap: float, dim: int, out):
    """Returns S (as _sumexp) and writes u = exp(softcapped logit) * (1 - tanh^2) into out (out's dtype)."""
    t = _tanh_cap(z, cap)
    e = torch.exp(t * cap)
    out.copy_(e * (1.0 - t * t))
    return e.sum(dim=dim, keepdim=True)


def _pass_eager(z, cap, dim, out):
    """_sumexp / _pass with stock ops (overwrites z when it is fp32)."""
    t = z.float().div_(cap).tanh_()
    e = t.mul(cap).exp_()
    S = e.sum(dim=dim, keepdim=True)
    if out is not None:
        out.copy_(e.addcmul_(e, t.mul_(t), value=-1.0))                       # e * (1 - t^2)
    return S


_compiled = {}  # device type -> (sumexp, pass) compiled, or None when compiling is off or failed there


def _kernels(device):
    """The compiled (sumexp, pass) pair for this device type, or None for the eager path."""
    key = device.type
    if key not in _compiled:
        on = os.environ.get("NANOCHAT_FUSED_LOSS", "1" if key == "cpu" else "0") != "0"
        _compiled[key] = ((torch.compile(_sumexp, dynamic=False, fullgraph=True),
                           torch.compile(_pass, dynamic=False, fullgraph=True)) if on else None)
    return _compiled[key]


def _row_sums(z, cap, dim, fused, out):
    """S of one chunk, flattened to (n,); writes u into out when out is given."""
    if fused is not None:
        try:
            return (fused[0](z, cap, dim) if out is None else fused[1](z, cap, dim, out)).flatten()
        except Exception as e:  # no C++ compiler, an inductor bug...: the eager path from now on
            warnings.warn(f"nanochat.loss: compiled loss kernel unavailable on {z.device.type} "
                          f"({type(e).__name__}: {str(e)[:200]}); using the eager path")
            _compiled[z.device.type] = None
    return _pass_eager(z, cap, dim, out).flatten()


class _SoftcapCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, cap, reduction, chunk_rows, want_grad):
        N, dtype = h.size(0), h.dtype
        w = weight[:vocab_size].to(dtype)                # (V, C) in the compute dtype, as nanochat.gpt.Linear
        valid = targets != -1
        tgt = targets.clamp(min=0)
        n_valid = valid.sum()
        # row weights of the gradient: the mean's 1/N goes in here, so nothing is rescaled afterwards
        k = valid.to(torch.float32)
        if reduction == "mean":
            k = k / n_valid.clamp(min=1)
        # every target's softcapped logit from N gathered dot products (no chunk needs to be searched for it)
        t_tgt = torch.tanh((h.float() * w[tgt].float()).sum(dim=1) / cap)
        S = torch.empty(N, dtype=torch.float32, device=h.device)
        fused = _kernels(h.device) if chunk_rows * vocab_size >= FUSED_MIN_ELEMENTS else None
        cols = dtype == torch.float32  # fp32: (V, n) logits, weight gradient by addmm per chunk
        if want_grad:
            hu = torch.empty_like(h)                                   # rows of u @ W, scaled at the end
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            group = N if cols else max(chunk_rows, GROUP_BYTES // (vocab_size * h.element_size()))
            group = min(-(-group // chunk_rows) * chunk_rows, N)
            ubuf = torch.empty((vocab_size, chunk_rows) if cols else (group, vocab_size), dtype=dtype, device=h.device)
            hsbuf = None if cols else torch.empty(group, h.size(1), dtype=dtype, device=h.device)
        else:
            group = N
        for g0 in range(0, N, group):
            g1 = min(g0 + group, N)
            for s in range(g0, g1, chunk_rows):
                e = min(s + chunk_rows, g1)
                hc = h[s:e]
                # the compiled kernel is specialized to one shape: a short last chunk runs eagerly
                f = fused if e - s == chunk_rows else None
                if cols:
                    z = w @ hc.t()                                                    # (V, n)
                    u = ubuf[:, :e - s] if want_grad else None
                else:
                    z = hc @ w.t()                                                    # (n, V)
                    u = ubuf[s - g0:e - g0] if want_grad else None
                S[s:e] = _row_sums(z, cap, 0 if cols else 1, f, u)
                if not want_grad:
                    continue
                a = (k[s:e] / S[s:e])[:, None]                                        # (n, 1) fp32
                if cols:
                    torch.mm(u.t(), w, out=hu[s:e])
                    grad_w[:vocab_size].addmm_(u, hc * a)
                else:
                    torch.mm(u, w, out=hu[s:e])
                    hsbuf[s - g0:e - g0] = hc.float() * a
            if want_grad and not cols:
                grad_w[:vocab_size] += (ubuf[:g1 - g0].t() @ hsbuf[:g1 - g0]).float()
        losses = (S.log() - cap * t_tgt) * valid
        if want_grad:
            # the one-hot term: -c_i at (i, target_i), c = k * (1 - tanh(target logit)^2)
            c = (k * (1.0 - t_tgt * t_tgt))[:, None]
            hf = h.float()
            grad_h = (hu.float() * (k / S)[:, None] - c * w[tgt].float()).to(dtype)
            grad_w[:vocab_size].index_add_(0, tgt, -c * hf)
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        if reduction == "none":
            return losses
        return losses.sum() / n_valid if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        go = grad_out.float()
        gh = (grad_h.float() * go).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * go.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None


@torch.compiler.disable  # a Python loop over chunks: a compiled model calls it eagerly (a graph break)
def softcap_cross_entropy(h, weight, targets, vocab_size, softcap, reduction="mean", chunk_rows=CHUNK_ROWS):
    """h (N, C) final hidden states (after the last norm), weight (V_padded, C) the untied lm_head weight,
    targets (N,) int64 with -1 = ignore. Returns a scalar ("mean"/"sum") or (N,) fp32 ("none")."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"softcap_cross_entropy: reduction must be mean, sum or none, not {reduction!r}")
    # (inside forward, grad mode is always off and needs_input_grad only reflects requires_grad: decide here, so
    # that evaluation under no_grad computes no gradients)
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if reduction == "none" and want_grad:
        raise ValueError("softcap_cross_entropy: reduction 'none' is forward-only; "
                         "use the plain path for per-token gradients")
    return _SoftcapCrossEntropy.apply(h, weight, targets, vocab_size, softcap, reduction, chunk_rows, want_grad)
