"""
MuonAdamW: one optimizer for the whole GPT (reference/nanochat.md section 4).

Param groups carry kind="adamw" (embeddings, lm_head, scalars: decoupled-WD AdamW with bias
correction) or kind="muon" (all transformer matrices of one shape: Nesterov momentum, MuonEq row
equilibration, Polar Express orthogonalization, Muon+ norm snapping, NorMuon variance reduction,
cautious weight decay, per-shape LR). Every group stores "initial_lr"; schedules set
lr = initial_lr * multiplier.

Distributed: when torch.distributed is initialized, step() averages the gradients across ranks first
(one flat all_reduce(AVG) per dtype), then every rank runs the same update on replicated state. This is
correct for any world size; ZeRO-style sharding would replace `_average_grads` and the loops below.

    opt = model.setup_optimizer(...); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
"""

import copy
import math

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE

# Polar Express coefficients (arXiv 2505.16932), num_iters=5, safety 2e-2, cushion 2
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, steps=5):
    """Approximate the orthogonal polar factor of a stack of matrices G (K, m, n)."""
    X = G
    X = X / (1.01 * X.norm(dim=(-2, -1), keepdim=True) + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            A = X.mT @ X                                   # (K, n, n)
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT                                   # (K, m, m)
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_update(grads, params, momentum_buffer, second_buffer, lr, momentum, beta2, weight_decay, ns_steps):
    """One Muon step on a stack of same-shape matrices. grads/params (K, m, n); updates params in place
    (caller copies back). momentum_buffer (K,m,n) fp32; second_buffer (K,m,1) if m >= n else (K,1,n)."""
    K, m, n = grads.shape
    g = grads.float()
    # 1. Nesterov momentum
    momentum_buffer.lerp_(g, 1 - momentum)
    g = g.lerp(momentum_buffer, momentum)
    # 2. orthogonalize in bf16 when training in bf16
    X = g.to(torch.bfloat16) if COMPUTE_DTYPE == torch.bfloat16 else g
    # 3. MuonEq: every row rescaled to the mean row norm ||X||_F / sqrt(m)
    row_norm = X.norm(dim=-1, keepdim=True)
    target = X.norm(dim=(-2, -1), keepdim=True) / math.sqrt(m)
    X = X * (target / (row_norm + 1e-7))
    # 4. Polar Express
    X = polar_express(X, ns_steps).float()
    # 5. Muon+: snap the Frobenius norm to sqrt(min(m, n)) (arXiv 2602.21545)
    X = X * (math.sqrt(min(m, n)) / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7))
    # 6. NorMuon (arXiv 2510.05491): per-row (tall/square) or per-column second moment, norm preserved
    red_dim = -1 if m >= n else -2
    second_buffer.lerp_(X.square().mean(dim=red_dim, keepdim=True), 1 - beta2)
    Y = X * second_buffer.clamp_min(1e-10).rsqrt()
    Y = Y * (X.norm(dim=(-2, -1), keepdim=True) / (Y.norm(dim=(-2, -1), keepdim=True) + 1e-10))
    # 7. cautious weight decay (only where update and weight agree in sign) + update, per-shape lr
    lr_eff = lr * math.sqrt(max(1.0, m / n))
    P = params.float()
    mask = (Y * P) >= 0
    P = P - lr_eff * Y - lr_eff * weight_decay * P * mask
    return P


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups):
        for g in param_groups:
            if g.get("kind") not in ("adamw", "muon"):
                raise ValueError(f"MuonAdamW: param group {g.get('name')!r} needs kind 'adamw' or 'muon'")
            g.setdefault("initial_lr", g["lr"])
            if g["kind"] == "muon":
                shapes = {tuple(p.shape) for p in g["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"MuonAdamW: muon group {g.get('name')!r} needs 2-D params of one shape")
        super().__init__(param_groups, defaults={})

    def load_state_dict(self, state_dict):
        # deep copy: torch would otherwise share state tensors with the source, and our updates are in place
        super().load_state_dict(copy.deepcopy(state_dict))

    # -------------------------------------------------------------------------

    def _average_grads(self):
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        by_dtype = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # every rank must take part with the same tensors
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    @torch.no_grad()
    def _adamw_step(self, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            # math in fp32, results written back in the param dtype (bf16 embeddings keep bf16 state)
            g = p.grad.float()
            m = state["exp_avg"].float().lerp_(g, 1 - beta1)
            v = state["exp_avg_sq"].float().lerp_(g.square(), 1 - beta2)
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
            pf = p.float().mul_(1 - lr * wd)                      # decoupled weight decay
            pf.addcdiv_(m, denom, value=-lr / bias1)
            p.copy_(pf)
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)

    @torch.no_grad()
    def _muon_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if len(params) != len(group["params"]):
            raise RuntimeError(f"MuonAdamW: group {group.get('name')!r} has params without gradients")
        K, (m, n) = len(params), params[0].shape
        # stacked state lives on the group's first param so state_dict() round-trips it
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros(K, m, n, dtype=torch.float32, device=params[0].device)
            shape = (K, m, 1) if m >= n else (K, 1, n)
            state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=params[0].device)
        grads = torch.stack([p.grad for p in params])
        stacked = torch.stack(list(params))
        new = muon_update(grads, stacked, state["momentum_buffer"], state["second_momentum_buffer"],
                          group["lr"], group["momentum"], group["beta2"], group["weight_decay"], group["ns_steps"])
        torch._foreach_copy_(params, list(new.to(params[0].dtype).unbind(0)))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW does not take a closure")
        self._average_grads()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_step(group)
            else:
                self._muon_step(group)
