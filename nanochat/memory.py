"""
Peak memory per device of a stage, estimated before anything runs (issue 11 item 3). Pure Python, no torch:
`nanorun plan` calls it with the resolved model (nanochat.scaling.resolve_training) and the planned hardware,
and a stage can call it again at run time with what it found.

    from nanochat import memory, scaling
    derived = scaling.resolve_training(20, device_batch_size=16, num_iterations=10)
    est = memory.estimate_training_memory(derived, device_batch_size=16, dtype="bfloat16", world_size=8,
                                          device_type="cuda", attention_backend="fa3")
    est["per_device_bytes"], est["breakdown"]          # bytes; breakdown by what holds them
    memory.pick_device_batch_size(derived, 80 * 2**30, dtype="bfloat16", world_size=8, device_type="cuda")

The model is a count of the tensors nanochat really keeps (checked on CPU against autograd's saved tensors and
the profiler's allocations in tests/test_memory.py, and against the real stage's peak RSS in bench/memory_check.py):
- params: fp32 masters for every Linear and scalar (gpt.Linear casts to the compute dtype per call); wte and the
  value embeddings in the compute dtype (fp32 under fp16, as init_weights); the rotary tables (10x the context).
- grads: one per parameter, in its dtype, from the first backward to zero_grad.
- optimizer: per rank, as nanochat.optim shards it: AdamW exp_avg + exp_avg_sq in the param dtype (rows split over
  ranks, params under 1024 elements replicated); Muon fp32 momentum (K, m, n) + NorMuon second moment, whole
  matrices split over ranks.
- activations: what autograd saves for backward at one micro-batch (nanochat.gpt, eager): per layer the norm inputs,
  the norm outputs feeding the Linears, q/k/v after rotary and QK-norm, the attention output, the MLP hidden twice
  (relu out and its square), value embeddings, the residual mix input; the sliding-window mask under SDPA; in a
  half dtype every Linear's cast weight, and on CPU the fp32 copies rms_norm keeps. Under torch.compile (the CUDA
  default) pointwise results are recomputed in backward, so only matmul inputs/outputs and attention tensors count.
- loss: nanochat.loss computes the head's gradients inside the forward (a fp32 (V, C) weight gradient plus chunk
  buffers); the plain full-logits path (RL, compiled GPU) keeps (N, V) tensors.
- optimizer step: nanochat.optim stacks every Muon group's gradients at once and runs Polar Express on one group
  at a time (about 8 fp32 copies of the group); with W > 1 also the reduced chunks and a full-size gather buffer
  per parameter until phase 3.
- allocator: on CPU a second generation of activations, plus a sharded step's collective buffers (glibc's heap
  does not give the first step's regions back to the next step's activations; see estimate_training_memory); on
  CUDA 5% for the caching allocator's rounding.
- runtime: what is resident before the first tensor (CPU: the stage process with torch, tokenizer and loader, plus
  inductor when a compiled kernel is in use; CUDA: context, cuBLAS/NCCL workspaces).
The peak is the largest of four moments: the end of the forward (activations + loss buffers, plus the grads
accumulated so far when grad_accum > 1), the start of the backward, the optimizer step (grads + step buffers), and
a resume (a checkpoint's model or optimizer state loaded beside the live one).
On CPU the stage's measured peak (peak RSS) is the whole process, runtime included; on CUDA it is
torch.cuda.max_memory_allocated, to be compared with "tensor_bytes" (no runtime, no allocator slack).
"""

from nanochat.scaling import SMEAR_CHANNELS, VE_GATE_CHANNELS, has_value_embedding

MiB = 2 ** 20
GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# kept equal to the torch-side constants (tests/test_memory.py checks): nanochat.loss, nanochat.optim
LOSS_CHUNK_ROWS = 256
LOSS_GROUP_BYTES = 64 << 20
LOSS_FUSED_MIN_ELEMENTS = 1 << 19
OPTIM_SMALL_NUMEL = 1024

# Polar Express + the Muon tail on a group of E elements peaks at 8 fp32 (K, m, n) buffers (the stacked params,
# Nesterov g, the orthogonalized X and its scaled copies, the cautious-WD mask) plus the K Gram matrices of
# min(m, n)^2: measured with the profiler on CPU in fp32 and bf16 (8.25x at 4:1 matrices, 9x square).
MUON_WORK_COPIES = 8

# Runtime, measured by bench/memory_check.py (bench/RESULTS.md, "Memory estimate vs measured peak"): the peak RSS
# of a process that does what base_train does before its model exists (torch 2.13 CPU, Linux x86-64: the
# interpreter, torch's libraries, the tokenizer, pyarrow, the data loader's buffers, the device probe), and what
# inductor adds once nanochat.loss's compiled passes exist (used from vocab 2048 on; also a compiled optimizer).
# Their sum is what is calibrated: 522-623 MiB over ten measurements. How it splits depends on whether the device
# probe measured its matmul peaks in that process (a first run; ~495 + 80) or read its cache (~370 + 175).
CPU_RUNTIME_BYTES = 495 * MiB
CPU_INDUCTOR_BYTES = 80 * MiB
# CUDA, not measured here: the context with lazy module loading (~0.5 GiB on Hopper), cuBLAS/NCCL workspaces and
# the inductor/Triton runtime; the caching allocator reuses blocks of the same size from step to step and mostly
# loses rounding (max_memory_reserved over max_memory_allocated is typically a few percent for this loop).
CUDA_RUNTIME_BYTES = 1 * GiB
CUDA_ALLOCATOR_SLACK = 0.05


def _ceil_div(a, b):
    return -(-a // b)


def _dims(derived):
    L, C, H, Hkv = derived["n_layer"], derived["n_embd"], derived["n_head"], derived["n_kv_head"]
    D = derived.get("head_dim", C // H)
    return L, C, H, Hkv, D, derived["padded_vocab_size"]


def _layer_matrices(derived, i):
    """(rows, cols) of layer i's matrices: c_q, c_k, c_v, attention c_proj, c_fc, MLP c_proj, the ve gate."""
    L, C, H, Hkv, D, _ = _dims(derived)
    mats = [(H * D, C), (Hkv * D, C), (Hkv * D, C), (C, H * D), (4 * C, C), (C, 4 * C)]
    return mats + ([(Hkv, VE_GATE_CHANNELS)] if has_value_embedding(i, L) else [])


def _matrix_shapes(derived):
    """{(rows, cols): count} of the transformer matrices: the Muon groups of GPT.setup_optimizer."""
    shapes = {}
    for i in range(derived["n_layer"]):
        for shape in _layer_matrices(derived, i):
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def _adamw_params(derived, emb_bytes):
    """(rows, cols, bytes per element) of every AdamW parameter (GPT.setup_optimizer's groups)."""
    L, C, _, Hkv, D, V = _dims(derived)
    n_ve = sum(has_value_embedding(i, L) for i in range(L))
    return ([(V, C, 4), (V, C, emb_bytes)] + [(V, Hkv * D, emb_bytes)] * n_ve
            + [(L, 1, 4), (L, 1, 4), (1, SMEAR_CHANNELS, 4), (1, 1, 4), (1, 1, 4)])


def _dtype_bytes(dtype):
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# -----------------------------------------------------------------------------
# The parts


def model_bytes(derived, dtype):
    """Parameters and buffers of one GPT as init_weights leaves it: {"params", "buffers"} in bytes."""
    c = _dtype_bytes(dtype)
    emb = 4 if dtype == "float16" else c
    p = derived["params"]
    _, _, _, _, D, _ = _dims(derived)
    params = 4 * (p["transformer_matrices"] + p["lm_head"] + p["scalars"]) + emb * (p["wte"] + p["value_embeds"])
    rotary = 2 * (10 * derived["sequence_len"]) * (D // 2) * c      # cos and sin (1, 10T, 1, D/2)
    return {"params": params, "buffers": rotary}


def optimizer_state_bytes(derived, dtype, world_size=1):
    """MuonAdamW state held by one rank of world_size (nanochat.optim.param_layout)."""
    emb = 4 if dtype == "float16" else _dtype_bytes(dtype)
    W = world_size
    total = 0
    for rows, cols, nbytes in _adamw_params(derived, emb):
        kept = rows if rows * cols < OPTIM_SMALL_NUMEL else _ceil_div(rows, W)   # replicated or a row shard
        total += 2 * kept * cols * nbytes                                        # exp_avg, exp_avg_sq
    for (m, n), K in _matrix_shapes(derived).items():
        chunk = _ceil_div(K, W)
        total += 4 * chunk * m * n + 4 * chunk * (m if m >= n else n)           # momentum, second moment
    return total


def activation_bytes(derived, device_batch_size, dtype, device_type="cpu", attention_backend="sdpa",
                     compiled=False, sequence_len=None):
    """Bytes autograd saves for backward in one forward of device_batch_size rows (the loss's own buffers aside).
    {"per_layer": [...], "embedding": ..., "head": ..., "total": ...}."""
    L, C, H, Hkv, D, _ = _dims(derived)
    T = sequence_len or derived["sequence_len"]
    B, c = device_batch_size, _dtype_bytes(dtype)
    N, q, kv = B * T, H * D, Hkv * D
    # rms_norm on CPU upcasts a half-precision input and saves the fp32 copy; eager on CPU the residual stream is
    # fp32 in any dtype (gpt.GPT: its norms' inputs, the lambda mixes, x0, the backout copy)
    qn = 4 if device_type == "cpu" and c < 4 else c
    r = 4 if device_type == "cpu" else c
    windows = derived.get("window_sizes") or [T] * L
    per_layer = []
    for i in range(L):
        ve = N * kv * c if has_value_embedding(i, L) else 0
        small = 4 * B * H * T + 4 * N * (2 + H + Hkv) + 3 * N * Hkv * c     # log-sum-exp, rms_norm rstd, ve gate
        if compiled:
            # inductor's min-cut keeps matmul inputs/outputs and recomputes norms, rotary, relu^2 in backward:
            # residual input, q, k, v, value embedding, attention output, attention-block output, MLP hidden
            saved = N * C * c + N * (q + 2 * kv) * c + ve + N * q * c + N * C * c + N * 4 * C * c
        else:
            saved = (N * C * r * (1 if i > 0 else 0)     # residual-mix input (x0 for layer 0, counted once)
                     + N * C * r + N * C * c             # attention norm: input, output (c_q/c_k/c_v input)
                     + N * (q + kv) * qn                 # QK-norm inputs (after rotary)
                     + N * (q + 2 * kv) * c + ve         # SDPA's q, k, v
                     + N * q * c                         # attention output (c_proj input)
                     + N * C * r + N * C * c             # MLP norm: input, output (c_fc input)
                     + 2 * N * 4 * C * c)                # relu output, its square (c_proj input)
            if c < 4:  # each Linear keeps its weight cast to the compute dtype
                saved += c * sum(m * n for m, n in _layer_matrices(derived, i))
        if attention_backend == "sdpa" and windows[i] < T - 1 and windows[i] not in windows[:i]:
            saved += T * T * c  # the sliding-window mask, a float bias built once per shape and shared by its layers
        per_layer.append(saved + small)
    if compiled:
        embedding, head = 2 * N * C * c, N * C * c
    else:
        embedding = N * C * (qn + 2 * r)                  # wte output (norm input), normed x (smear), x0
        head = N * C * r + N * C * c                      # final norm input, the hidden state it feeds the loss
        if L // 2 == L - 1:                               # backout saves the last layer's output (L <= 2)
            head += N * C * r
        if c < 4:
            embedding += SMEAR_CHANNELS * c
    return {"per_layer": per_layer, "embedding": embedding, "head": head,
            "total": sum(per_layer) + embedding + head}


def loss_bytes(derived, device_batch_size, dtype, device_type="cpu", plain=False, compiled=False,
               sequence_len=None):
    """Buffers of lm_head + softcap + cross-entropy at the forward's end, beyond the saved activations:
    {"forward": bytes at the end of the forward, "backward": bytes when the backward starts}."""
    _, C, _, _, _, Vp = _dims(derived)
    V = derived.get("vocab_size", Vp)
    T = sequence_len or derived["sequence_len"]
    N, c = device_batch_size * T, _dtype_bytes(dtype)
    if plain and compiled:
        # one fused kernel: logits in the compute dtype kept for backward, an fp32 row pass, their gradient
        both = N * Vp * c + N * V * 4 + N * V * c
        return {"forward": both, "backward": both}
    if plain:
        # eager: softcapped logits, tanh output, log-softmax output (fp32), then their gradients in backward
        return {"forward": N * Vp * c + 12 * N * V, "backward": 16 * N * V + N * Vp * c}
    # nanochat.loss: grad_w (Vp, C) fp32 is computed in the forward; the chunk buffers live until it returns
    rows = LOSS_CHUNK_ROWS
    grad_w = 4 * Vp * C
    eager = not (device_type == "cpu" and rows * V >= LOSS_FUSED_MIN_ELEMENTS)
    # the elementwise pass writes u through a temporary (inductor's copy of the mutated output, or eager's exp)
    if c == 4:
        buffers = 3 * rows * V * 4                                       # ubuf (V, rows), chunk logits z, temporary
    else:
        group = min(_ceil_div(max(rows, LOSS_GROUP_BYTES // (V * c)), rows) * rows, N)
        buffers = (V * C * c                                    # the head weight cast to the compute dtype
                   + group * (V + C) * c                        # buffered u rows and scaled hidden rows
                   + rows * V * c                               # the last chunk's logits z
                   + max(rows * V * (8 if eager else c),        # the pass's temporaries (fp32 tanh/exp when eager)
                         V * C * (c + 4)))                      # the group's weight-gradient product, in fp32
    ends = N * C * (16 + c)                                     # fp32 temporaries of grad_h at the end
    fwd = grad_w + max(buffers, ends)
    # the backward scales grad_w into a new tensor (lm_head.grad) while the saved one is still held, then the last
    # layer's MLP gradient (N, 4C) appears before any activation is freed
    return {"forward": fwd, "backward": 2 * grad_w + N * 4 * C * c}


def optimizer_step_bytes(derived, dtype, world_size=1):
    """Transient buffers of one MuonAdamW.step on one rank (grads and state not included). Phase 1 stacks every
    Muon group's grads (padded to a multiple of W matrices); phase 2 updates one group at a time (Polar Express on
    the owned matrices); with W > 1 the collective buffers come on top (collective_bytes). AdamW on a single
    process runs the fused kernel in place."""
    W = world_size
    muon = [(m * n, _ceil_div(K, W), min(m, n)) for (m, n), K in _matrix_shapes(derived).items()]
    stacked = sum(4 * chunk * W * e for e, chunk, _ in muon)
    work = max(4 * chunk * (MUON_WORK_COPIES * e + side ** 2) for e, chunk, side in muon)
    return stacked + work + collective_bytes(derived, dtype, world_size)


def collective_bytes(derived, dtype, world_size):
    """The buffers of a sharded step (W > 1), all alive at the end of phase 2: each Muon group's reduced chunk,
    its updated chunk and the all-gather buffer of its W chunks; each big AdamW param's zero-padded grad (when its
    rows do not divide), reduced chunk, updated slice, padded output and full-size gather buffer."""
    W = world_size
    if W == 1:
        return 0
    emb = 4 if dtype == "float16" else _dtype_bytes(dtype)
    total = sum(4 * _ceil_div(K, W) * m * n * (2 + W) for (m, n), K in _matrix_shapes(derived).items())
    for rows, cols, nbytes in _adamw_params(derived, emb):
        if rows * cols < OPTIM_SMALL_NUMEL:
            continue                                   # all-reduced in place
        chunk = _ceil_div(rows, W)
        padded = chunk * W * cols * nbytes if rows % W else 0
        total += padded + 3 * chunk * cols * nbytes + chunk * W * cols * nbytes
    return total


def runtime_bytes(device_type, inductor=False):
    """Resident before the first tensor: the process (CPU) or the CUDA context and workspaces."""
    if device_type in ("cpu", "mps"):
        return CPU_RUNTIME_BYTES + (CPU_INDUCTOR_BYTES if inductor else 0)
    return CUDA_RUNTIME_BYTES


# -----------------------------------------------------------------------------
# Entry points


def estimate_training_memory(derived, *, device_batch_size, dtype, world_size=1, device_type="cuda",
                             attention_backend="sdpa", compile=None, grad_accum_steps=None, stage="base_train",
                             sequence_len=None):
    """Peak bytes per device of a training stage at device_batch_size rows of sequence_len tokens
    (default derived["sequence_len"]).

    derived: nanochat.scaling.resolve_training(...) (n_layer, n_embd, n_head, n_kv_head, head_dim,
    padded_vocab_size, vocab_size, sequence_len, window_sizes, params, total_batch_size).
    stage: "base_train" and "sft" use nanochat.loss (mean / sum); "rl" backpropagates per-token losses through
    the plain full-logits path. compile: None = as base_train (on for cuda; sft and rl never compile).
    grad_accum_steps: None = total_batch_size // (device_batch_size * sequence_len * world_size), at least 1.
    -> {"per_device_bytes": int, "tensor_bytes": int (what torch.cuda.max_memory_allocated would show),
        "peak_at": "forward" | "backward" | "optimizer" | "resume" | "rollout" (rl only),
        "breakdown": {name: bytes, summing to per_device_bytes}, "inputs": {what was assumed}}."""
    if stage not in ("base_train", "sft", "rl"):
        raise ValueError(f"stage {stage!r}: expected base_train, sft or rl")
    T = sequence_len or derived["sequence_len"]
    B, W = device_batch_size, world_size
    if compile is None:
        compile = device_type == "cuda" and stage == "base_train"
    if grad_accum_steps is None:
        grad_accum_steps = max(1, derived.get("total_batch_size", B * T * W) // (B * T * W))
    plain = stage == "rl" or (compile and device_type != "cpu")
    model = model_bytes(derived, dtype)
    grads = model["params"]
    optim = optimizer_state_bytes(derived, dtype, W)
    acts = activation_bytes(derived, B, dtype, device_type, attention_backend, compile, T)["total"]
    loss = loss_bytes(derived, B, dtype, device_type, plain, compile, T)
    step = optimizer_step_bytes(derived, dtype, W)
    batch = 2 * B * (T + 1) * 8                               # the loader's (B, T+1) int64 tokens, and the next
    # grads of earlier micro-steps (RL backpropagates every pass of every example before its one step)
    held = grads if grad_accum_steps > 1 or stage == "rl" else 0
    parts = {"forward": {"grads": held, "activations": acts, "loss": loss["forward"]},
             "backward": {"grads": held, "activations": acts, "loss": loss["backward"]},
             "optimizer": {"grads": grads, "optimizer_step": step},
             # load_checkpoint returns the model and optimizer state together, and MuonAdamW.load_state_dict
             # deep-copies the optimizer's: one of them is held twice for a moment
             "resume": {"checkpoint": max(model["params"], optim)}}
    if stage == "rl":  # the next example's rollouts run while this step's gradients are held
        parts["rollout"] = {"grads": grads, "decode_weights": decode_weight_bytes(derived, dtype),
                            "kv_cache": kv_cache_bytes(derived, B, T, dtype)}
    moments = {k: sum(v.values()) for k, v in parts.items()}
    static = model["params"] + model["buffers"] + optim + batch
    if device_type == "cpu":
        # glibc keeps freed blocks (nanochat.common.keep_freed_memory), and the first step creates the gradients and
        # the optimizer state where its activations were: the holes left there do not take the next step's
        # activations, which land above them; a sharded step's collective buffers claim a region of their own too.
        # From the second step on the heap's high-water mark holds a second generation of activations (a plateau
        # from the third step; measured by bench/memory_check.py, and per phase with mallinfo2).
        slack = {k: acts + collective_bytes(derived, dtype, W) if k in ("forward", "backward") else 0
                 for k in moments}
    else:
        slack = {k: int(CUDA_ALLOCATOR_SLACK * (static + v)) for k, v in moments.items()}
    peak_at = max(moments, key=lambda k: moments[k] + slack[k])
    tensors = static + moments[peak_at]
    V = derived.get("vocab_size", derived["padded_vocab_size"])
    inductor = compile or (device_type == "cpu" and not plain and LOSS_CHUNK_ROWS * V >= LOSS_FUSED_MIN_ELEMENTS)
    runtime = runtime_bytes(device_type, inductor)
    slack = slack[peak_at]
    breakdown = {"params": model["params"], "buffers": model["buffers"] + batch, "optimizer": optim,
                 **{k: 0 for part in parts.values() for k in part}, **parts[peak_at],
                 "allocator": slack, "runtime": runtime}
    return {"per_device_bytes": tensors + slack + runtime, "tensor_bytes": tensors, "peak_at": peak_at,
            "breakdown": breakdown,
            "inputs": {"device_batch_size": B, "sequence_len": T, "dtype": dtype, "world_size": W,
                       "device_type": device_type, "attention_backend": attention_backend, "compile": compile,
                       "grad_accum_steps": grad_accum_steps, "stage": stage}}


def decode_weight_bytes(derived, dtype):
    """nanochat.engine.decode_weights: every Linear cast to the compute dtype (a no-op in fp32) and the (C, V)
    head copy it decodes batch-1 rows with."""
    p, c = derived["params"], _dtype_bytes(dtype)
    V = derived.get("vocab_size", derived["padded_vocab_size"])
    return (c * (p["transformer_matrices"] + p["lm_head"]) if c < 4 else 0) + V * derived["n_embd"] * c


def kv_cache_bytes(derived, batch_size, sequence_len, dtype):
    """nanochat.engine.KVCache: k and v of (L, B, T, Hkv, D) in the compute dtype."""
    L, _, _, Hkv, D, _ = _dims(derived)
    return 2 * L * batch_size * sequence_len * Hkv * D * _dtype_bytes(dtype)


def estimate_inference_memory(derived, *, batch_size, dtype, device_type="cuda", sequence_len=None,
                              kv_cache=True, attention_backend="sdpa"):
    """Peak bytes per device of an evaluation or generation stage (base_eval, chat_eval, chat, RL rollouts):
    the model as load_model builds it (with the checkpoint's copy beside it while loading), then the larger of
    a no-grad forward over batch_size x sequence_len tokens (bpb, CORE scoring) and, with kv_cache, generation:
    the weights the engine casts to the compute dtype (nanochat.engine.decode_weights: every Linear when that is
    not fp32, and the (C, V) head copy) plus a KVCache of batch_size rows x sequence_len positions ((L, B, T, Hkv, D)
    k and v) and a one-row prefill of the prompt.
    -> {"per_device_bytes", "tensor_bytes", "peak_at": "load" | "forward" | "generate", "breakdown"}."""
    L, C, H, Hkv, D, Vp = _dims(derived)
    V = derived.get("vocab_size", Vp)
    T = sequence_len or derived["sequence_len"]
    B, c = batch_size, _dtype_bytes(dtype)
    model = model_bytes(derived, dtype)
    ns = 4 if device_type == "cpu" and c < 4 else c
    mask = T * T * c if attention_backend == "sdpa" else 0

    def forward(rows):
        """One layer at a time without grad: residual, x0, backout, norm (and its fp32 copy on CPU), q/k/v,
        attention output, the MLP hidden and its relu^2; then a loss chunk or the last position's logits."""
        N = rows * T
        layer = N * C * (5 * c + ns) + N * (H + 2 * Hkv) * D * c + N * 4 * C * c * 2 + mask
        return layer + min(N, LOSS_CHUNK_ROWS) * V * (c + 8) + rows * V * 4 * 4

    parts = {"load": {"checkpoint": model["params"]}, "forward": {"activations": forward(B)}}
    if kv_cache:
        parts["generate"] = {"decode_weights": decode_weight_bytes(derived, dtype),
                             "kv_cache": kv_cache_bytes(derived, B, T, dtype), "activations": forward(1)}
    moments = {k: sum(v.values()) for k, v in parts.items()}
    peak_at = max(moments, key=moments.get)
    tensors = model["params"] + model["buffers"] + moments[peak_at]
    slack = 0 if device_type == "cpu" else int(CUDA_ALLOCATOR_SLACK * tensors)
    inductor = device_type == "cpu" and LOSS_CHUNK_ROWS * V >= LOSS_FUSED_MIN_ELEMENTS
    runtime = runtime_bytes(device_type, inductor)
    breakdown = {"params": model["params"], "buffers": model["buffers"],
                 **{k: 0 for part in parts.values() for k in part}, **parts[peak_at],
                 "allocator": slack, "runtime": runtime}
    return {"per_device_bytes": tensors + slack + runtime, "tensor_bytes": tensors, "peak_at": peak_at,
            "breakdown": breakdown}


# -----------------------------------------------------------------------------
# Choosing the device batch


def batch_candidates(derived, world_size=1, sequence_len=None):
    """Powers of two that divide total_batch_size // (sequence_len * world_size), largest first."""
    T = sequence_len or derived["sequence_len"]
    rows = derived["total_batch_size"] // (T * world_size)
    if rows < 1 or derived["total_batch_size"] % (T * world_size):
        return []
    out, b = [], 1
    while b <= rows:
        if rows % b == 0:
            out.append(b)
        b *= 2
    return out[::-1]


def pick_device_batch_size(derived, capacity_bytes, *, dtype, world_size=1, device_type="cuda", margin=0.9,
                           **kwargs):
    """The largest power-of-two device batch whose estimate fits margin * capacity_bytes and that divides the
    rows of a step (total_batch_size // (sequence_len * world_size): gradient accumulation keeps the total
    batch), or None when even 1 row does not fit. kwargs go to estimate_training_memory."""
    budget = margin * capacity_bytes
    for b in batch_candidates(derived, world_size, kwargs.get("sequence_len")):
        est = estimate_training_memory(derived, device_batch_size=b, dtype=dtype, world_size=world_size,
                                       device_type=device_type, **kwargs)
        if est["per_device_bytes"] <= budget:
            return b
    return None


def memory_refusal(derived, capacity_bytes, *, device_batch_size, dtype, world_size=1, device_type="cuda",
                   margin=0.9, **kwargs):
    """One line saying why device_batch_size does not fit, with the numbers; None when it fits."""
    est = estimate_training_memory(derived, device_batch_size=device_batch_size, dtype=dtype,
                                   world_size=world_size, device_type=device_type, **kwargs)
    budget = margin * capacity_bytes
    if est["per_device_bytes"] <= budget:
        return None
    best = pick_device_batch_size(derived, capacity_bytes, dtype=dtype, world_size=world_size,
                                  device_type=device_type, margin=margin, **kwargs)
    b = est["breakdown"]
    top = sorted((k for k in b if b[k]), key=lambda k: -b[k])[:3]
    parts = ", ".join(f"{k} {b[k] / GiB:.1f}" for k in top)
    if best:
        advice = f"device batch {best} fits (gradient accumulation keeps the total batch)"
    elif not batch_candidates(derived, world_size, kwargs.get("sequence_len")):
        advice = (f"and no device batch divides the total batch {derived['total_batch_size']} into rows of "
                  f"{est['inputs']['sequence_len']} tokens on {world_size} device(s)")
    else:
        one = estimate_training_memory(derived, device_batch_size=1, dtype=dtype, world_size=world_size,
                                       device_type=device_type, **kwargs)["per_device_bytes"]
        advice = (f"even device batch 1 needs {one / GiB:.1f} GiB: use more devices (the optimizer state shards over "
                  "them) or a smaller model")
    return (f"d{derived['n_layer']} at device batch {device_batch_size} x {est['inputs']['sequence_len']} tokens "
            f"needs {est['per_device_bytes'] / GiB:.1f} GiB per device ({parts} GiB), over {margin:.0%} of "
            f"{capacity_bytes / GiB:.1f} GiB; {advice}")
