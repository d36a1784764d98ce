"""
Depth-based scaling laws: the ONE place where depth turns into dims, parameter counts, FLOPs per
token, token budget, batch size, LR/WD scaling and iteration counts (reference/nanochat.md 2.9, 5.2).

Pure Python on purpose (no torch): `nanorun plan` resolves a spec with it before anything runs, and the
training stage calls the same functions at run time, so the plan and the run can never disagree.
A test checks every count here against a real GPT built on the meta device.
"""

import math

B_REF = 2**19            # tokens per step of the d12 reference run
REF_DEPTH = 12           # the depth that anchors batch-size and weight-decay scaling
BATCH_EXPONENT = 0.383   # Power Lines (arXiv 2505.13738): B_opt ~ D^0.383
VE_GATE_CHANNELS = 12    # value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24      # smear gate reads the first 24 channels


def model_dims(depth, aspect_ratio=64, head_dim=128):
    """depth -> GPT-2 style dims. Width is rounded UP to a multiple of head_dim, so head_dim is exact."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (got {depth})")
    base_dim = depth * aspect_ratio
    n_embd = math.ceil(base_dim / head_dim) * head_dim
    n_head = n_embd // head_dim
    return {"n_layer": depth, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_head, "head_dim": head_dim}


def padded_vocab_size(vocab_size, multiple=64):
    return math.ceil(vocab_size / multiple) * multiple


def has_value_embedding(layer_idx, n_layer):
    """Alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(n_layer, sequence_len, window_pattern="SSSL"):
    """Left attention window per layer, in tokens. L = full context, S = ceil(T/4/128)*128 (512 at T=2048).
    The pattern tiles across layers and the last layer is always full."""
    pattern = window_pattern.upper()
    if not pattern or any(c not in "SL" for c in pattern):
        raise ValueError(f"window pattern must use only S and L (got {window_pattern!r})")
    short = min(sequence_len, math.ceil(sequence_len / 4 / 128) * 128)
    sizes = [sequence_len if pattern[i % len(pattern)] == "L" else short for i in range(n_layer)]
    sizes[-1] = sequence_len
    return sizes


def param_counts(depth, vocab_size=32768, aspect_ratio=64, head_dim=128):
    """Parameter counts per group, with the reference's group names (GPT.num_scaling_params)."""
    d = model_dims(depth, aspect_ratio, head_dim)
    C, H, Hkv, D, L = d["n_embd"], d["n_head"], d["n_kv_head"], d["head_dim"], d["n_layer"]
    V = padded_vocab_size(vocab_size)
    n_ve = sum(has_value_embedding(i, L) for i in range(L))
    attn = C * H * D + 2 * C * Hkv * D + H * D * C    # c_q, c_k, c_v, c_proj
    mlp = 2 * 4 * C * C                                 # c_fc, c_proj
    transformer_matrices = L * (attn + mlp) + n_ve * VE_GATE_CHANNELS * Hkv
    counts = {
        "wte": V * C,
        "value_embeds": n_ve * V * Hkv * D,
        "lm_head": V * C,
        "transformer_matrices": transformer_matrices,
        "scalars": 2 * L + SMEAR_CHANNELS + 2,          # resid/x0 lambdas, smear gate + lambda, backout lambda
    }
    counts["total"] = sum(counts.values())
    return counts


def scaling_params(depth, vocab_size=32768, aspect_ratio=64, head_dim=128):
    """N in the D:N ratio: transformer matrices + lm_head (the Kaplan-style count the reference uses)."""
    c = param_counts(depth, vocab_size, aspect_ratio, head_dim)
    return c["transformer_matrices"] + c["lm_head"]


def matmul_params(depth, vocab_size=32768, aspect_ratio=64, head_dim=128):
    """Weights that take part in a matmul per token: every Linear (attention, MLP, gates, lm_head)."""
    c = param_counts(depth, vocab_size, aspect_ratio, head_dim)
    return c["transformer_matrices"] + c["lm_head"] + SMEAR_CHANNELS


def flops_per_token(depth, vocab_size=32768, aspect_ratio=64, head_dim=128, sequence_len=2048, window_pattern="SSSL"):
    """Training FLOPs per token: 6*matmul params + sum over layers 12*H*D*min(window, T) (PaLM-style attention)."""
    d = model_dims(depth, aspect_ratio, head_dim)
    attn = sum(12 * d["n_head"] * d["head_dim"] * min(w, sequence_len)
               for w in window_sizes(depth, sequence_len, window_pattern))
    return 6 * matmul_params(depth, vocab_size, aspect_ratio, head_dim) + attn


def dmodel_lr_scale(n_embd):
    """(C / 768)^-0.5: the AdamW groups' LR scale for model width (reference section 4.1), the one place it lives."""
    return (n_embd / 768) ** -0.5


def auto_total_batch_size(target_tokens, ref_tokens):
    """B = 2^round(log2(B_REF * (D/D_REF)^0.383)), rounded to a power of two."""
    return 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** BATCH_EXPONENT))


# the knobs resolve_training reads from a spec (model + train sections) or from base_train's flags, by name
TRAINING_KNOBS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "window_pattern", "num_iterations",
                  "target_flops", "target_param_data_ratio", "total_batch_size", "embedding_lr", "unembedding_lr",
                  "matrix_lr", "scalar_lr", "weight_decay")


def resolve_from(*sources, **given):
    """resolve_training with every knob of TRAINING_KNOBS read by name from the first of `sources` (objects: a
    spec's model and train sections, or base_train's parsed flags) that has it; `given` (vocab_size,
    device_batch_size, world_size) is passed as is. The planner and the stage call this, so they cannot drift."""
    knobs = {}
    for name in TRAINING_KNOBS:
        source = next((src for src in sources if hasattr(src, name)), None)
        if source is None:
            raise TypeError(f"resolve_from: no source has the knob {name!r}")
        knobs[name] = getattr(source, name)
    return resolve_training(knobs.pop("depth"), **knobs, **given)


def resolve_training(depth, *, vocab_size=32768, aspect_ratio=64, head_dim=128, max_seq_len=2048,
                     window_pattern="SSSL", num_iterations=-1, target_flops=-1.0, target_param_data_ratio=12.0,
                     device_batch_size=32, total_batch_size=-1, world_size=1,
                     embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28):
    """Everything base_train derives from depth and the horizon flags (reference/nanochat.md 5.2).
    Returns a flat dict with the reference's names. Raises ValueError when the batch does not divide."""
    dims = model_dims(depth, aspect_ratio, head_dim)
    counts = param_counts(depth, vocab_size, aspect_ratio, head_dim)
    n_scaling = counts["transformer_matrices"] + counts["lm_head"]
    fpt = flops_per_token(depth, vocab_size, aspect_ratio, head_dim, max_seq_len, window_pattern)

    # Batch and WD scale with ratio * scaling_params whatever sets the horizon (target_flops only sets the step
    # count). The ratio cancels in both, so a non-positive ratio (the scaling sweep passes -1) stands in as 12.
    ratio = target_param_data_ratio if target_param_data_ratio > 0 else 12.0
    target_tokens = int(ratio * n_scaling)
    ref_tokens = ratio * scaling_params(REF_DEPTH, vocab_size, aspect_ratio, head_dim)

    B = total_batch_size if total_batch_size > 0 else auto_total_batch_size(target_tokens, ref_tokens)
    batch_lr_scale = math.sqrt(B / B_REF)
    weight_decay_scaled = weight_decay * math.sqrt(B / B_REF) * (ref_tokens / target_tokens)
    width_lr_scale = dmodel_lr_scale(dims["n_embd"])

    if num_iterations > 0:
        iterations, horizon = num_iterations, "num_iterations"
    elif target_flops > 0:
        iterations, horizon = round(target_flops / (fpt * B)), "target_flops"
    elif target_param_data_ratio > 0:
        iterations, horizon = target_tokens // B, "target_param_data_ratio"
    else:
        raise ValueError("no training horizon: set num_iterations, target_flops or target_param_data_ratio")
    iterations = max(1, iterations)

    tokens_per_fwdbwd = device_batch_size * max_seq_len * world_size
    if B % tokens_per_fwdbwd != 0:
        raise ValueError(f"total_batch_size {B} is not divisible by device_batch_size*max_seq_len*world_size "
                         f"= {device_batch_size}*{max_seq_len}*{world_size} = {tokens_per_fwdbwd}")
    total_tokens = B * iterations
    return {
        **dims,
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size(vocab_size),
        "sequence_len": max_seq_len,
        "window_pattern": window_pattern,
        "window_sizes": window_sizes(depth, max_seq_len, window_pattern),
        "params": counts,
        "scaling_params": n_scaling,
        "flops_per_token": fpt,
        "horizon": horizon,
        "target_tokens": target_tokens,
        "total_batch_size": B,
        "device_batch_size": device_batch_size,
        "world_size": world_size,
        "grad_accum_steps": B // tokens_per_fwdbwd,
        "num_iterations": iterations,
        "total_tokens": total_tokens,
        "tokens_per_param": total_tokens / n_scaling,
        "total_flops": fpt * total_tokens,
        "batch_lr_scale": batch_lr_scale,
        "dmodel_lr_scale": width_lr_scale,
        "weight_decay_scaled": weight_decay_scaled,
        # learning rates as base_train hands them to the optimizer (AdamW groups also get dmodel_lr_scale there)
        "embedding_lr": embedding_lr * batch_lr_scale,
        "unembedding_lr": unembedding_lr * batch_lr_scale,
        "matrix_lr": matrix_lr * batch_lr_scale,
        "scalar_lr": scalar_lr * batch_lr_scale,
    }
