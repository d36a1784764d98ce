"""
The lm_head + softcap + cross-entropy of nanochat.gpt, computed a chunk of rows at a time so that the
(tokens, vocab) logits never exist in full.

At the reference shape (8 x 512 tokens, vocab 32768) the plain path builds five fp32 tensors of 537 MB each
(logits, logits/15, tanh, softcap, log-softmax) and as many again in backward. On a CPU that traffic, not the
matmul, dominated the step (tanh alone took longer than all the model's matmuls). Here every chunk of
`chunk_rows` rows computes its logits, loss and -- when gradients are wanted -- the gradients of the hidden
states and of the head weight right away, while the chunk is still in cache. Backward then only scales those
gradients by the incoming scalar. Same math as

    logits = 15 * tanh((h @ W[:V].T).float() / 15)
    loss = F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)

up to float rounding (tests/test_loss.py compares values and gradients with that expression).

    from nanochat.loss import softcap_cross_entropy
    loss = softcap_cross_entropy(h, lm_head.weight, targets, vocab_size=V, softcap=15.0)   # h (N, C)

reduction "mean" or "sum" with gradients, or any reduction ("none" too) without them. A per-token loss that
needs gradients (RL) takes the plain path in gpt.py; so does a compiled model (inductor fuses it anyway).
"""

import torch

CHUNK_ROWS = 256  # rows per chunk: 256 x 32768 fp32 = 32 MB of logits, fast on the measured CPU (bench/RESULTS.md)


class _SoftcapCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, softcap, reduction, chunk_rows):
        N = h.size(0)
        w = weight[:vocab_size].to(h.dtype)              # (V, C) in the compute dtype, as nanochat.gpt.Linear
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != -1
        safe_targets = targets.clamp(min=0)
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_grad else None
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            hc, tc, vc = h[s:e], safe_targets[s:e, None], valid[s:e]
            t = (hc @ w.t()).float().div_(softcap).tanh_()  # (n, V) tanh(z / cap); logits = cap * t
            # |logits| <= cap = 15, so exp cannot overflow in fp32: no max-subtraction pass is needed
            ex = t.mul(softcap).exp_()
            sumexp = ex.sum(dim=1)
            losses[s:e] = (sumexp.log() - softcap * t.gather(1, tc).squeeze(1)).masked_fill_(~vc, 0.0)
            if not want_grad:
                continue
            # d loss_i / d logits = softmax - onehot; d logits / d z = 1 - tanh^2; ignored rows contribute nothing
            # (the row mask rides on the per-row scale, so ignored rows become exact zeros without a sync)
            keep = vc.to(torch.float32)[:, None]
            g = ex.mul_(keep / sumexp[:, None])
            g.scatter_add_(1, tc, -keep)
            g = g.addcmul_(g, t.mul_(t), value=-1.0).to(h.dtype)                    # g * (1 - t^2)
            grad_h[s:e] = g @ w
            if g.dtype == torch.float32:
                grad_w[:vocab_size].addmm_(g.t(), hc)
            else:
                grad_w[:vocab_size] += (g.t() @ hc).float()
        if reduction == "none":
            out = losses
            scale = None
        else:
            n_valid = valid.sum()
            out = losses.sum() / n_valid if reduction == "mean" else losses.sum()
            scale = (1.0 / n_valid.float()) if reduction == "mean" else None
        if want_grad:
            if scale is not None:  # fold the mean's 1/N into the saved gradients now
                grad_h = (grad_h.float() * scale).to(h.dtype)
                grad_w.mul_(scale)
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        go = grad_out.float()
        gh = (grad_h.float() * go).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * go.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def softcap_cross_entropy(h, weight, targets, vocab_size, softcap, reduction="mean", chunk_rows=CHUNK_ROWS):
    """h (N, C) final hidden states (after the last norm), weight (V_padded, C) the untied lm_head weight,
    targets (N,) int64 with -1 = ignore. Returns a scalar ("mean"/"sum") or (N,) fp32 ("none")."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"softcap_cross_entropy: reduction must be mean, sum or none, not {reduction!r}")
    if reduction == "none" and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        raise ValueError("softcap_cross_entropy: reduction 'none' is forward-only; use the plain path for per-token gradients")
    return _SoftcapCrossEntropy.apply(h, weight, targets, vocab_size, softcap, reduction, chunk_rows)
