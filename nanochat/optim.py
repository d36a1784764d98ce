"""
MuonAdamW: one optimizer for the whole GPT (reference/nanochat.md section 4).

Param groups carry kind="adamw" (embeddings, lm_head, scalars: decoupled-WD AdamW with bias
correction) or kind="muon" (all transformer matrices of one shape: Nesterov momentum, MuonEq row
equilibration, Polar Express orthogonalization, Muon+ norm snapping, NorMuon variance reduction,
cautious weight decay, per-shape LR). Every group stores "initial_lr"; schedules set
lr = initial_lr * multiplier.

Distributed (ZeRO-2 style, reference 4.4, any world size W): step() runs in three phases.
1. launch async reductions: small AdamW params (numel < 1024) all_reduce(AVG) with replicated state;
   larger AdamW params reduce_scatter(AVG) along dim 0, rows zero-padded to a multiple of W; each Muon
   group stacks its K grads to (K, m, n), zero-pads K to ceil(K/W)*W and reduce_scatters so every rank
   owns whole matrices.
2. group by group: wait, update the owned slice / matrices (state exists only for those), launch
   all_gather of the updated values.
3. wait for the gathers and copy the gathered values back into the params.
A single process does no communication and the same math. state_dict() carries a "sharding" entry
(world size, rank, per-param layout) so merge_optimizer_shards() + load_state_dict() can resume a
checkpoint written with a different world size.

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


SMALL_NUMEL = 1024  # AdamW params smaller than this are all-reduced with replicated state (not worth sharding)


def _dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _ceil_div(a, b):
    return -(-a // b)


def _pad_rows(t, rows):
    """t padded with zero rows along dim 0 up to `rows` (t itself when already that long)."""
    if t.shape[0] == rows:
        return t.contiguous()
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.shape[0]] = t
    return out


def adamw_update(p, g, exp_avg, exp_avg_sq, t, lr, wd, eps, beta1, beta2):
    """One AdamW step (reference 4.2) on p (a whole param or a row slice of it) in place; math in fp32,
    results written back in the param / state dtype. t = step count after this step (bias correction).
    The hyperparameters may be Python numbers or 0-d tensors (the compiled path: no recompile per value)."""
    g = g.float()
    m = exp_avg.float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.float().lerp_(g.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
    denom = (v.sqrt() / bias2 ** 0.5).add_(eps)
    pf = p.float().mul_(1 - lr * wd)                      # decoupled weight decay
    step_size = lr / bias1
    if isinstance(step_size, torch.Tensor):
        pf.sub_(m / denom * step_size)
    else:
        pf.addcdiv_(m, denom, value=-step_size)
    p.copy_(pf)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def adamw_update_fused(p, g, exp_avg, exp_avg_sq, t, lr, wd, eps, beta1, beta2):
    """adamw_update through PyTorch's fused AdamW kernel (one pass, math in fp32 for bf16/fp16 tensors, the
    same formula: decoupled decay, bias-corrected moments, eps added after the bias-corrected sqrt). 15-30x faster
    than the op-by-op version on a (32768, 256) embedding on CPU (bench/RESULTS.md). Falls back to adamw_update
    where the kernel does not apply (mixed dtypes, 0-d tensor hyperparameters, a build without it)."""
    fused = getattr(torch, "_fused_adamw_", None)
    same = g.dtype == p.dtype == exp_avg.dtype == exp_avg_sq.dtype and p.dtype in _FUSED_DTYPES
    if fused is None or not same or any(isinstance(x, torch.Tensor) for x in (t, lr, wd, eps, beta1, beta2)):
        return adamw_update(p, g, exp_avg, exp_avg_sq, t, lr, wd, eps, beta1, beta2)
    step = torch.tensor(float(t), dtype=torch.float32, device=p.device)
    fused([p], [g], [exp_avg], [exp_avg_sq], [], [step], lr=float(lr), beta1=float(beta1), beta2=float(beta2),
          weight_decay=float(wd), eps=float(eps), amsgrad=False, maximize=False)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPILED = {}


def compiled(fn):
    """torch.compile(fn) once per function (fullgraph; shapes become dynamic after the first recompile, so the
    many AdamW param shapes do not each cost a compile)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


def _as_tensors(values, device):
    """Python hyperparameters -> 0-d fp32 tensors, so a compiled step guards on dtype/shape, not on the value
    (the LR, momentum and weight decay change every step)."""
    return tuple(torch.tensor(float(v), dtype=torch.float32, device=device) for v in values)


def param_layout(group, p, world_size):
    """How one param's optimizer state is split across ranks (reference 4.4, but any world size):
    replicated: small AdamW param, every rank holds the full state;
    rows: AdamW param, dim 0 padded to chunk * world_size rows, rank r owns rows [r*chunk, (r+1)*chunk);
    muon: the group's K matrices (state on its first param), padded to chunk * world_size, rank r owns
    matrices [r*chunk, (r+1)*chunk). `size` is the unpadded row / matrix count."""
    if group["kind"] == "muon":
        K = len(group["params"])
        return {"kind": "muon", "size": K, "chunk": _ceil_div(K, world_size)}
    if p.numel() < SMALL_NUMEL:
        return {"kind": "replicated", "size": p.shape[0] if p.dim() else 1, "chunk": p.shape[0] if p.dim() else 1}
    return {"kind": "rows", "size": p.shape[0], "chunk": _ceil_div(p.shape[0], world_size)}


def _sharded_keys(kind):
    return ("momentum_buffer", "second_momentum_buffer") if kind == "muon" else ("exp_avg", "exp_avg_sq")


def merge_optimizer_shards(shards):
    """The per-rank state_dicts of one step (any order) -> one unsharded state_dict (world_size 1), which
    MuonAdamW.load_state_dict re-shards for any world size."""
    if not shards:
        raise ValueError("merge_optimizer_shards: no optimizer shards given")
    infos = [s.get("sharding", {"world_size": 1, "rank": 0, "params": None}) for s in shards]
    world_size = infos[0]["world_size"]
    by_rank = {info["rank"]: s for info, s in zip(infos, shards)}
    if any(i["world_size"] != world_size for i in infos) or sorted(by_rank) != list(range(world_size)):
        raise ValueError(f"merge_optimizer_shards: need one shard per rank 0..W-1 of one world size, got "
                         f"{sorted((i['rank'], i['world_size']) for i in infos)}")
    ordered = [by_rank[r] for r in range(world_size)]
    layouts = infos[0]["params"] or {}
    state = {}
    for idx, s0 in ordered[0]["state"].items():
        layout = layouts.get(idx, {"kind": "replicated"})
        if layout["kind"] == "replicated" or world_size == 1:
            state[idx] = copy.deepcopy(s0)
            continue
        full = {k: v for k, v in s0.items() if k not in _sharded_keys(layout["kind"])}
        for key in _sharded_keys(layout["kind"]):
            full[key] = torch.cat([shard["state"][idx][key] for shard in ordered])[:layout["size"]].clone()
        state[idx] = full
    merged_layouts = {idx: {**lay, "chunk": lay["size"]} for idx, lay in layouts.items()}
    return {"state": state, "param_groups": copy.deepcopy(ordered[0]["param_groups"]),
            "sharding": {"world_size": 1, "rank": 0, "params": merged_layouts}}


def shard_optimizer_state(full, rank, world_size, layouts):
    """An unsharded state_dict -> the shard of `rank` for `world_size` (layouts: index -> param_layout)."""
    state = {}
    for idx, s in full["state"].items():
        layout = layouts[idx]
        if layout["kind"] == "replicated":
            state[idx] = copy.deepcopy(s)
            continue
        part = {k: v for k, v in s.items() if k not in _sharded_keys(layout["kind"])}
        chunk = layout["chunk"]
        for key in _sharded_keys(layout["kind"]):
            padded = _pad_rows(s[key], chunk * world_size)
            part[key] = padded[rank * chunk:(rank + 1) * chunk].clone()
        state[idx] = part
    return {"state": state, "param_groups": copy.deepcopy(full["param_groups"]),
            "sharding": {"world_size": world_size, "rank": rank, "params": layouts}}


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
        self.rank, self.world_size = _dist_rank_world()  # the sharding is fixed when the optimizer is built
        self.compile = False  # True: the Muon and AdamW math runs torch.compile'd (base_train --compile-optimizer)

    def _update_fns(self):
        if self.compile:
            return compiled(adamw_update), compiled(muon_update)
        return adamw_update_fused, muon_update

    # --- layout and checkpoints ----------------------------------------------

    def layouts(self):
        """param index (as in state_dict) -> param_layout for this world size."""
        out, idx = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                out[idx] = param_layout(group, p, self.world_size)
                idx += 1
        return out

    def sharding_summary(self):
        """One line per group: how its state is split (for startup logs and events)."""
        lines = []
        for group in self.param_groups:
            lay = param_layout(group, group["params"][0], self.world_size)
            kinds = sorted({param_layout(group, p, self.world_size)["kind"] for p in group["params"]})
            what = f"{len(group['params'])} matrices {tuple(group['params'][0].shape)}" if group["kind"] == "muon" \
                else f"{len(group['params'])} params"
            per_rank = f", {lay['chunk']} {'matrices' if lay['kind'] == 'muon' else 'rows'}/rank" \
                if lay["kind"] != "replicated" else ""
            lines.append(f"{group.get('name', '?')}: {group['kind']}, {what}, {'+'.join(kinds)}{per_rank}")
        return lines

    def state_dict(self):
        sd = super().state_dict()
        sd["sharding"] = {"world_size": self.world_size, "rank": self.rank, "params": self.layouts()}
        return sd

    def load_state_dict(self, state_dict):
        """Accepts this rank's own shard, or an unsharded state (world size 1, e.g. from
        merge_optimizer_shards), which is re-sharded for this rank and world size."""
        sd = copy.deepcopy(state_dict)  # torch would otherwise share tensors with the source; we update in place
        info = sd.pop("sharding", {"world_size": 1, "rank": 0})
        if (info["world_size"], info["rank"]) != (self.world_size, self.rank):
            if info["world_size"] != 1:
                raise ValueError(f"optimizer state is shard {info['rank']} of {info['world_size']} ranks, this is "
                                 f"rank {self.rank} of {self.world_size}: merge the shards first "
                                 "(nanochat.optim.merge_optimizer_shards)")
            sd = shard_optimizer_state(sd, self.rank, self.world_size, self.layouts())
            sd.pop("sharding")
        super().load_state_dict(sd)

    # --- step ----------------------------------------------------------------

    def _grad(self, p):
        if p.grad is not None:
            return p.grad
        if self.world_size == 1:
            return None
        return torch.zeros_like(p)  # every rank must take part in every collective

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW does not take a closure")
        W = self.world_size
        avg = dist.ReduceOp.AVG if W > 1 else None
        # phase 1: launch every reduction; a job is (group, param or None, reduced grad, pending work)
        jobs = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    g = self._grad(p)
                    if g is None:
                        continue
                    lay = param_layout(group, p, W)
                    work = None
                    if W > 1 and lay["kind"] == "replicated":
                        g = g.contiguous()
                        work = dist.all_reduce(g, op=avg, async_op=True)
                    elif W > 1:
                        full = _pad_rows(g, lay["chunk"] * W)
                        g = torch.empty((lay["chunk"], *p.shape[1:]), dtype=g.dtype, device=g.device)
                        work = dist.reduce_scatter_single(g, full, op=avg, async_op=True)
                    jobs.append((group, p, g, work))
            else:
                grads = [self._grad(p) for p in group["params"]]
                if all(g is None for g in grads):
                    continue
                if any(g is None for g in grads):
                    raise RuntimeError(f"MuonAdamW: group {group.get('name')!r} has params without gradients")
                chunk = _ceil_div(len(grads), W)
                stacked = _pad_rows(torch.stack(grads), chunk * W)      # (chunk*W, m, n)
                work, owned = None, stacked
                if W > 1:
                    owned = torch.empty_like(stacked[:chunk])           # (chunk, m, n)
                    work = dist.reduce_scatter_single(owned, stacked, op=avg, async_op=True)
                jobs.append((group, None, owned, work))
        # phase 2: in group order, wait for the reduction, update what this rank owns, launch the gather
        gathers = []
        for group, p, g, work in jobs:
            if work is not None:
                work.wait()
            if group["kind"] == "adamw":
                gathers.append(self._adamw_shard(group, p, g))
            else:
                gathers.append(self._muon_shard(group, g))
        # phase 3: wait for the gathers, copy the full updated values back into the params
        for params, gathered, work in gathers:
            if work is None:
                continue
            work.wait()
            if len(params) == 1 and gathered.dim() == params[0].dim():   # AdamW rows (chunk*W, ...), padded
                params[0].copy_(gathered[:params[0].shape[0]])
            else:                                                        # Muon (chunk*W, m, n), padded
                torch._foreach_copy_(params, list(gathered[:len(params)].unbind(0)))

    def _adamw_shard(self, group, p, g):
        """AdamW on this rank's part of p (all of it when replicated or single process)."""
        W, rank = self.world_size, self.rank
        lay = param_layout(group, p, W)
        sharded = W > 1 and lay["kind"] == "rows"
        state = self.state[p]
        if not state:
            state["step"] = 0
            shape = (lay["chunk"], *p.shape[1:]) if sharded else p.shape
            state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hp = (state["step"], group["lr"], group["weight_decay"], group["eps"], beta1, beta2)
        adamw_update = self._update_fns()[0]
        if self.compile:
            hp = _as_tensors(hp, p.device)
        if not sharded:
            adamw_update(p, g, state["exp_avg"], state["exp_avg_sq"], *hp)
            return [p], None, None
        chunk = lay["chunk"]
        lo = rank * chunk
        n = max(0, min(chunk, p.shape[0] - lo))                   # real (unpadded) rows this rank owns
        out = torch.zeros((chunk, *p.shape[1:]), dtype=p.dtype, device=p.device)
        if n > 0:
            piece = p[lo:lo + n].clone()
            adamw_update(piece, g[:n], state["exp_avg"][:n], state["exp_avg_sq"][:n], *hp)
            out[:n] = piece
        gathered = torch.empty((chunk * W, *p.shape[1:]), dtype=p.dtype, device=p.device)
        return [p], gathered, dist.all_gather_single(gathered, out, async_op=True)

    def _muon_shard(self, group, g):
        """Muon on the matrices this rank owns; g = their reduced grads (chunk, m, n), zero rows = padding."""
        W, rank = self.world_size, self.rank
        params = group["params"]
        K, chunk, (m, n) = len(params), g.shape[0], params[0].shape
        # stacked state of the owned matrices lives on the group's first param so state_dict() round-trips it
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros(chunk, m, n, dtype=torch.float32, device=g.device)
            shape = (chunk, m, 1) if m >= n else (chunk, 1, n)
            state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=g.device)
        lo = rank * chunk
        k = max(0, min(chunk, K - lo))                            # real matrices owned
        hp = (group["lr"], group["momentum"], group["beta2"], group["weight_decay"])
        muon_update = self._update_fns()[1]
        if self.compile:
            hp = _as_tensors(hp, g.device)
        hp = (*hp, group["ns_steps"])
        if W == 1:
            new = muon_update(g, torch.stack(params), state["momentum_buffer"], state["second_momentum_buffer"], *hp)
            torch._foreach_copy_(params, list(new.to(params[0].dtype).unbind(0)))
            return params, None, None
        out = torch.zeros((chunk, m, n), dtype=params[0].dtype, device=g.device)
        if k > 0:
            new = muon_update(g[:k], torch.stack(params[lo:lo + k]), state["momentum_buffer"][:k],
                              state["second_momentum_buffer"][:k], *hp)
            out[:k] = new.to(out.dtype)
        gathered = torch.empty((chunk * W, m, n), dtype=out.dtype, device=g.device)
        return params, gathered, dist.all_gather_single(gathered, out, async_op=True)


def step_with_scaler(optimizer, scaler):
    """optimizer.step() through a torch.amp.GradScaler (enabled for fp16 training, reference 2.10; a disabled one
    just steps): unscale the grads, skip the step on every rank if any rank saw inf/nan (the step's reductions
    are collective, so the ranks must agree), then adapt the scale."""
    scaler.unscale_(optimizer)
    if scaler.is_enabled() and _dist_rank_world()[1] > 1:  # its per-device flags are private; MAX them over ranks
        for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    scaler.step(optimizer)
    scaler.update()
