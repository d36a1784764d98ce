"""
The GPT model (reference/nanochat.md section 2): pre-norm transformer with parameter-free RMSNorm,
RoPE (base 100k), QK-norm x1.2, ReLU^2 MLP, sliding windows, gated value embeddings on alternating
layers, per-layer resid/x0 lambdas, smear and backout, untied lm_head with a 15*tanh(x/15) softcap.

    from nanochat.gpt import GPTConfig, build_model
    model = build_model(GPTConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=128, vocab_size=300), "cpu")
    loss = model(idx, targets)          # idx/targets (B,T) int64
    logits = model(idx)                  # (B,T,vocab_size) fp32
    logits = model(idx, logit_positions=(rows, cols))   # (N,vocab_size): only where scored (CORE eval)

All counts here must agree with nanochat/scaling.py (tests/test_model.py checks it for depths 2..26).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention
from nanochat.common import COMPUTE_DTYPE
from nanochat.loss import softcap_cross_entropy
from nanochat.scaling import (SMEAR_CHANNELS, VE_GATE_CHANNELS, dmodel_lr_scale, has_value_embedding,
                              padded_vocab_size, window_sizes)

ROPE_BASE = 100_000
QK_SCALE = 1.2      # applied to q and k after QK-norm ("sharper attention")
SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    """Parameter-free RMSNorm over the last dim, in the activation dtype."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free Linear whose fp32 master weight is cast to the input dtype (replaces autocast)."""

    def __init__(self, in_features, out_features, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class _EmbeddingFp32Grad(torch.autograd.Function):
    """F.embedding whose weight gradient is summed in fp32, then cast to the weight's dtype.

    Eager PyTorch on CPU accumulates an embedding's gradient in the weight's own dtype: for a bf16 table every
    occurrence of a frequent token is added into one bf16 row, and the sum loses most of its precision: in a
    d6 batch at init the wte and value-embedding gradients were 3-5x further from the fp32 ones than
    torch.compile's, whose decomposition sums in fp32 (issue 16). CUDA's kernel already accumulates in fp32, so
    this runs on CPU only."""

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.table = (weight.shape, weight.dtype)
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,), (shape, dtype) = ctx.saved_tensors, ctx.table
        grad = torch.zeros(shape, dtype=torch.float32, device=grad_out.device)
        grad.index_add_(0, idx.reshape(-1), grad_out.reshape(-1, shape[1]).float())
        return None, grad.to(dtype)


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter name, same forward) whose reduced-precision gradient on CPU is summed in
    fp32 (_EmbeddingFp32Grad)."""

    def forward(self, idx):
        w = self.weight
        if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and w.requires_grad:
            return _EmbeddingFp32Grad.apply(idx, w)
        return F.embedding(idx, w)


def apply_rotary(x, cos, sin):
    """x (B,T,H,D); cos/sin (1,T,1,D/2). Half-split convention of the reference (rotates by -theta;
    kept for checkpoint compatibility): y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, D = config.n_embd, self.head_dim
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"GPTConfig: n_embd {C} must divide by n_head {config.n_head}, "
                             f"and n_head by n_kv_head {config.n_kv_head}")
        self.c_q = Linear(C, self.n_head * D, device=device)
        self.c_k = Linear(C, self.n_kv_head * D, device=device)
        self.c_v = Linear(C, self.n_kv_head * D, device=device)
        self.c_proj = Linear(self.n_head * D, C, device=device)
        self.ve_gate = (Linear(VE_GATE_CHANNELS, self.n_kv_head, device=device)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual with a per-head gate in (0, 3), read from the first 12 channels
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))        # (B,T,Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        y = attention(q, k, v, window, kv_cache=kv_cache, layer_idx=self.layer_idx)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, device=device)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, device=device)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, device=device)
        self.mlp = MLP(config, device=device)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x).to(COMPUTE_DTYPE), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x).to(COMPUTE_DTYPE))


class GPT(nn.Module):
    """Precision: Linear weights are fp32 masters cast to COMPUTE_DTYPE per call; wte and the value embeddings are
    stored in COMPUTE_DTYPE (as the reference). When the model runs eagerly in bf16/fp16 on CPU, the residual stream (x,
    x0, the backout copy, the lambda mixes) is kept in fp32 and each block reads it through norm(x) cast to the
    compute dtype, so matmuls stay in bf16. Eager PyTorch would otherwise round after every add and mix -- and
    round the scalar lambdas themselves to bf16, where a resid lambda near 1.1 moves in steps of 2^-7 -- while
    torch.compile (which the reference always uses) fuses those chains in fp32. Eager bf16 training with a bf16
    residual ended 0.031 val bpb behind the reference at depth 6 (issue 16, bench/RESULTS.md). Compiled graphs
    are unchanged: they keep the residual in the compute dtype, as the reference's. GPUs are left as they were
    (compiled by default in base_train; an fp32 residual would cost eager SFT/RL memory there, unmeasured)."""

    def __init__(self, config, pad_vocab_size_to=64, device=None):
        super().__init__()
        self.config = config
        self.chunked_loss = True  # nanochat.loss for the training/bpb loss; False = the plain full-logits path
        self.fp32_residual = True  # eager bf16/fp16 on CPU: the residual stream in fp32 (class docstring)
        L, C = config.n_layer, config.n_embd
        V = padded_vocab_size(config.vocab_size, pad_vocab_size_to)
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.window_sizes = window_sizes(L, config.sequence_len, config.window_pattern)
        self.transformer = nn.ModuleDict({
            "wte": Embedding(V, C, device=device),
            "h": nn.ModuleList([Block(config, i, device=device) for i in range(L)]),
        })
        self.lm_head = Linear(C, V, device=device)
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim, device=device)
                                           for i in range(L) if has_value_embedding(i, L)})
        self.resid_lambdas = nn.Parameter(torch.empty(L, device=device))
        self.x0_lambdas = nn.Parameter(torch.empty(L, device=device))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, device=device)
        self.smear_lambda = nn.Parameter(torch.empty(1, device=device))
        self.backout_lambda = nn.Parameter(torch.empty(1, device=device))
        # rotary tables for 10x the training length; non-persistent (recomputed in init_weights)
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables(device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device):
        D = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)                                   # (T, D/2)
        return (freqs.cos().to(COMPUTE_DTYPE)[None, :, None, :],
                freqs.sin().to(COMPUTE_DTYPE)[None, :, None, :])

    @torch.no_grad()
    def init_weights(self):
        """Reference init (section 2.7). Called after to_empty(), so every tensor is (re)written here."""
        L, C = self.config.n_layer, self.config.n_embd
        s = math.sqrt(3) / math.sqrt(C)            # uniform bound with std 1/sqrt(C)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        ramp = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * ramp)
        self.x0_lambdas.copy_(0.20 - 0.15 * ramp)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary_tables(self.cos.device)
        self.cos, self.sin = cos, sin
        # embeddings in the compute dtype to save memory, except under fp16 (GradScaler needs fp32 grads)
        if COMPUTE_DTYPE != torch.float16:
            self.transformer.wte.to(dtype=COMPUTE_DTYPE)
            for ve in self.value_embeds.values():
                ve.to(dtype=COMPUTE_DTYPE)

    # -------------------------------------------------------------------------
    # accounting (must equal nanochat.scaling)

    def num_matmul_params(self):
        """Weights of every nn.Linear (also counts Float8Linear and other nn.Linear subclasses)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self):
        """Training FLOPs per token: 6 * matmul params + sum over layers of 12*H*D*min(window, T)."""
        H, D, T = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn = sum(12 * H * D * min(w, T) for w in self.window_sizes)
        return 6 * self.num_matmul_params() + attn

    # inference (reference 2.9): per-position FLOPs with a KV cache, and the cache's size in bytes.
    # `ctx` counts the keys a query attends to, its own position included; a layer reads min(ctx, window) of them.

    def estimate_decode_flops(self, ctx):
        """Forward FLOPs of one decoded token at context length ctx: 2 * matmul params (lm_head included)
        + sum over layers of 4*H*D*min(ctx, window) (QK^T and AV, 2*H*D each per key)."""
        H, D = self.config.n_head, self.config.n_embd // self.config.n_head
        return 2 * self.num_matmul_params() + sum(4 * H * D * min(ctx, w) for w in self.window_sizes)

    def estimate_prefill_flops(self, n):
        """Forward FLOPs of an n-token prefill (causal, the logits of every position included): the sum of
        estimate_decode_flops(ctx) for ctx = 1..n, i.e. with w = min(window, n) a layer attends over
        w(w+1)/2 + (n-w)*w (query, key) pairs."""
        H, D = self.config.n_head, self.config.n_embd // self.config.n_head
        pairs = 0
        for window in self.window_sizes:
            w = min(window, n)
            pairs += w * (w + 1) // 2 + (n - w) * w
        return 2 * self.num_matmul_params() * n + 4 * H * D * pairs

    def kv_bytes_per_token(self):
        """KV-cache bytes one position takes across all layers (k and v, COMPUTE_DTYPE)."""
        c = self.config
        return c.n_layer * 2 * c.n_kv_head * (c.n_embd // c.n_head) * COMPUTE_DTYPE.itemsize

    def kv_read_bytes(self, ctx):
        """KV-cache bytes one decoded token reads at context length ctx (sliding layers read only their window)."""
        c = self.config
        per_position = 2 * c.n_kv_head * (c.n_embd // c.n_head) * COMPUTE_DTYPE.itemsize
        return sum(per_position * min(ctx, w) for w in self.window_sizes)

    def num_scaling_params(self):
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": (self.resid_lambdas.numel() + self.x0_lambdas.numel() + self.smear_gate.weight.numel()
                        + self.smear_lambda.numel() + self.backout_lambda.numel()),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is not accounted for"
        return counts

    # -------------------------------------------------------------------------

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5, adam_betas=(0.8, 0.95)):
        """MuonAdamW with the reference groups (section 4.1). AdamW embedding/unembedding LRs get
        dmodel_lr_scale = (C/768)^-0.5. adam_betas=(b1, b2) replaces the reference's default 0.8 / 0.95
        wherever the table uses them (so the defaults reproduce the table exactly)."""
        from nanochat.optim import MuonAdamW
        b1, b2 = adam_betas
        dscale = dmodel_lr_scale(self.config.n_embd)

        def adamw(name, params, lr, betas, wd):
            return {"name": name, "kind": "adamw", "params": list(params), "lr": lr, "betas": betas,
                    "eps": 1e-10, "weight_decay": wd}

        groups = [
            adamw("lm_head", [self.lm_head.weight], unembedding_lr * dscale, (b1, 0.96), 0.01),
            adamw("embedding", [self.transformer.wte.weight], embedding_lr * dscale, (b1, 0.995), 0.001),
            adamw("value_embeds", self.value_embeds.parameters(), 0.5 * embedding_lr * dscale, (b1, 0.995), 0.01),
            adamw("resid", [self.resid_lambdas], 0.01 * scalar_lr, (b1, b2), 0.05),
            adamw("x0", [self.x0_lambdas], scalar_lr, (0.96, b2), 0.0),
            adamw("smear", [self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (b1, b2), 0.0),
        ]
        by_shape = {}
        for p in self.transformer.h.parameters():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape in sorted(by_shape):
            groups.append({"name": f"muon_{shape[0]}x{shape[1]}", "kind": "muon", "params": by_shape[shape],
                           "lr": matrix_lr, "momentum": 0.95, "beta2": 0.9, "ns_steps": 5,
                           "weight_decay": weight_decay})
        groups = [g for g in groups if g["params"]]
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(list(self.parameters())), "every parameter must be in exactly one group"
        return MuonAdamW(groups)

    # -------------------------------------------------------------------------

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logit_positions=None):
        B, T = idx.shape
        pos = kv_cache.get_pos() if kv_cache is not None else 0
        if pos + T > self.cos.size(1):
            raise ValueError(f"sequence too long: position {pos} + {T} tokens > rotary table {self.cos.size(1)}")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]

        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))                   # (B,T,C)
        if self._fp32_residual(x):
            x = x.float()
        # smear: mix the previous token's normalized embedding in through a gated scalar (starts at 0)
        prev = kv_cache.prev_embedding if kv_cache is not None else None
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B,T,1)
        if prev is not None:
            shifted = torch.cat([prev.to(x.dtype).expand(B, 1, -1), x[:, :-1]], dim=1)
            x_new = x + gate * shifted
        else:
            x_new = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:].detach()
        x = x_new

        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(COMPUTE_DTYPE) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == self.config.n_layer // 2:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        if kv_cache is not None:
            kv_cache.advance(T)

        x = norm(x).to(COMPUTE_DTYPE)
        if logit_positions is not None:  # eval only (CORE, no targets): the head only at (rows, positions) -> (N,V)
            x = x[logit_positions]
        if targets is not None and self._chunked_loss_ok(loss_reduction, x.device):
            loss = softcap_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                         self.config.vocab_size, SOFTCAP, loss_reduction)
            return loss.view(B, T) if loss_reduction == "none" else loss
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def _fp32_residual(self, x):
        """Run the residual stream in fp32? Yes when eager in bf16/fp16 on CPU (see the class docstring)."""
        return (self.fp32_residual and x.dtype != torch.float32 and x.device.type == "cpu"
                and not torch.compiler.is_compiling())

    def _chunked_loss_ok(self, loss_reduction, device):
        """nanochat.loss computes head + softcap + CE in row chunks (no full logits tensor): used for the plain
        Linear head (not an FP8 one), and for per-token losses only without gradients (bpb); RL's per-token
        gradients take the plain path. Under torch.compile it is used on CPU only, where it runs outside the
        graph (softcap_cross_entropy is excluded from compilation: the compiled trunk hands it the hidden states)
        and is faster than inductor's fusion of the plain path; on GPU the compiled model keeps the plain path."""
        if torch.compiler.is_compiling() and device.type != "cpu":
            return False
        return (self.chunked_loss and type(self.lm_head) is Linear
                and (loss_reduction != "none" or not torch.is_grad_enabled()))

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 sampling with a full forward per token (no cache): the engine's reference.
        Yields one token id at a time."""
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                if top_k is not None and top_k > 0:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=rng)
            ids = torch.cat([ids, nxt], dim=1)
            yield nxt.item()


def build_model(config, device="cpu"):
    """Construct on the meta device (no memory, no init), materialize on `device`, then init_weights()."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
