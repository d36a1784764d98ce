"""
Pretraining stage (reference/nanochat.md section 5): depth -> every hyperparameter via nanochat.scaling,
MuonAdamW, warmup/warmdown schedules, periodic val bpb / CORE / samples, atomic checkpoints and exact resume.

    python -m nanochat.stages.base_train --depth 4 --max-seq-len 256 --device-batch-size 2 \
        --total-batch-size 1024 --num-iterations 20 --eval-tokens 2048 --data-dir DATA --tokenizer-dir TOK
    torchrun --standalone --nproc_per_node=2 -m nanochat.stages.base_train --config config.json

Flags use the reference names and defaults; --config FILE (JSON keyed by argparse dest names) sets defaults
that explicit flags override. Outputs in --out-dir: events.jsonl, checkpoints/, result.json (written last).
--resume-from-step -2 continues from the newest complete checkpoint (what `nanorun apply` passes); a fresh run
refuses an --out-dir that already holds checkpoints, and a resume past the run's last step is refused.
Under --dtype float16 a GradScaler scales the loss (its state is checkpointed).

Distributed: the optimizer state is sharded across ranks (nanochat.optim). Data: every micro-step of every
rank reads its own stream, "virtual rank" v = rank * grad_accum + micro_step of world_size * grad_accum, so
the rows of one step depend only on device_batch_size and total_batch_size, not on how they are split
between ranks and accumulation: W ranks x A micro-steps train like 1 process x W*A micro-steps, and a
checkpoint resumes exactly (model, optimizer and data) on another world size. Only if the number of streams
changes (another device batch size) is the data resume approximate (a warning says so).
"""

import argparse
import gc
import math
import os
import time
from dataclasses import dataclass

# torch-free (`nanorun doctor` reads them too)
from nanochat.hardware import COMPILE_MODEL_MIN_STEPS, COMPILE_OPTIMIZER_MIN_STEPS

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
# keys the runner writes into config.json that are informative only
INFORMATIVE_CONFIG_KEYS = {"vocab_size"}


def build_parser():
    p = argparse.ArgumentParser(description="nanorun pretraining stage", allow_abbrev=False)
    a = p.add_argument
    a("--config", default=None, help="JSON file of defaults keyed by argparse dest names")
    a("--run", default="dummy", help="wandb run name ('dummy' = off; WANDB_MODE=offline works without network)")
    a("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    a("--dtype", default=None, help="bfloat16|float16|float32 (sets NANOCHAT_DTYPE; None = default policy)")
    a("--fp8", action=argparse.BooleanOptionalAction, default=False, help="FP8 training of large Linears (torchao)")
    a("--fp8-recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    a("--depth", type=int, default=20)
    a("--aspect-ratio", type=int, default=64)
    a("--head-dim", type=int, default=128)
    a("--max-seq-len", type=int, default=2048)
    a("--window-pattern", default="SSSL")
    a("--num-iterations", type=int, default=-1)
    a("--target-flops", type=float, default=-1.0)
    a("--target-param-data-ratio", type=float, default=12.0)
    a("--device-batch-size", type=int, default=32)
    a("--total-batch-size", type=int, default=-1)
    a("--embedding-lr", type=float, default=0.3)
    a("--unembedding-lr", type=float, default=0.008)
    a("--weight-decay", type=float, default=0.28)
    a("--matrix-lr", type=float, default=0.02)
    a("--scalar-lr", type=float, default=0.5)
    a("--adam-beta1", type=float, default=0.8)
    a("--adam-beta2", type=float, default=0.95)
    a("--warmup-steps", type=int, default=40)
    a("--warmup-ratio", type=float, default=-1.0, help=">= 0 overrides --warmup-steps as a fraction of iterations")
    a("--warmdown-ratio", type=float, default=0.65)
    a("--final-lr-frac", type=float, default=0.05)
    a("--resume-from-step", type=int, default=-1, help="-1 = fresh, -2 = last complete checkpoint if any")
    a("--eval-every", type=int, default=250)
    a("--eval-tokens", type=int, default=80 * 524288)
    a("--core-metric-every", type=int, default=2000)
    a("--core-metric-max-per-task", type=int, default=500)
    a("--core-bundle-dir", default=None, help="CORE bundle (default $NANORUN_HOME/eval_bundle; skipped if absent)")
    a("--sample-every", type=int, default=2000)
    a("--save-every", type=int, default=-1)
    a("--model-tag", default=None)
    a("--compile", type=int, default=None, choices=[0, 1],
      help="torch.compile the model (default: on for cuda, and on CPU for bf16/fp16 runs of at least "
           f"{COMPILE_MODEL_MIN_STEPS} steps, where eager trains worse; off otherwise)")
    a("--compile-optimizer", type=int, default=None, choices=[0, 1],
      help="torch.compile the Muon/AdamW math (default: on with --compile, and on CPU for runs of at least "
           f"{COMPILE_OPTIMIZER_MIN_STEPS} steps, where its one-off compile pays for itself)")
    a("--out-dir", default=None, help="stage directory (default $NANORUN_HOME/stages/base_train-manual)")
    a("--data-dir", default=None)
    a("--tokenizer-dir", default=None)
    a("--seed", type=int, default=42)
    return p


def parse_args(argv=None):
    """Two passes: read --config, install its values as defaults, then parse again so flags win.
    Bad input exits with status 2 and a one-line message (argparse's error())."""
    parser = build_parser()
    from nanochat.stage_args import parse_args_with_config
    args = parse_args_with_config(parser, argv, ignore=INFORMATIVE_CONFIG_KEYS, required=("data_dir", "tokenizer_dir"))
    if args.dtype not in (None, "bfloat16", "float16", "float32"):
        parser.error(f"--dtype {args.dtype}: expected bfloat16, float16 or float32")
    return args


# -----------------------------------------------------------------------------
# Schedules (reference 5.3); it = step index, N = num_iterations


def lr_multiplier(it, N, warmup_steps, warmdown_ratio, final_lr_frac):
    warmdown = round(warmdown_ratio * N)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= N - warmdown:
        return 1.0
    progress = (N - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it, N, warmdown_ratio):
    warmdown = round(warmdown_ratio * N)
    if it < 400:
        return 0.85 + (0.97 - 0.85) * it / 400
    if warmdown > 0 and it > N - warmdown:
        return 0.97 - (0.97 - 0.90) * (it - (N - warmdown)) / warmdown
    return 0.97


def muon_weight_decay(it, N, weight_decay):
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / N))


def default_compile_optimizer(use_compile, device, num_iterations):
    """(on, why) for --compile-optimizer left unset."""
    from nanochat.common import inductor_works
    if use_compile:
        return True, "with the model"
    if device.type != "cpu":
        return False, "model not compiled"
    if num_iterations < COMPILE_OPTIMIZER_MIN_STEPS:
        return False, f"{num_iterations} steps < {COMPILE_OPTIMIZER_MIN_STEPS}: the compile would not pay for itself"
    if not inductor_works(device):
        return False, "torch.compile unavailable here"
    return True, f"CPU run of {num_iterations} steps"


# -----------------------------------------------------------------------------


def resume_loader_states(data_dir, ckpt_dir, step, meta, virtual_ranks, streams):
    """The saved dataloader states for this rank's streams: exact when the checkpoint had the same number of
    streams (whatever its world size), else remapped with a warning (nanochat.checkpoint.remap_loader_states)."""
    import pyarrow.parquet as pq

    from nanochat.checkpoint import load_rank_states, remap_loader_states
    from nanochat.common import print0
    from nanochat.dataloader import read_data_dir
    old = []
    for rank_state in load_rank_states(ckpt_dir, step, meta.get("world_size", 1)):
        if rank_state is None:
            continue
        old.extend(rank_state["loaders"] if "loaders" in rank_state else [rank_state])  # older: one loader/rank
    if not old:
        print0(f"warning: checkpoint step {step} has no dataloader state; data starts from the beginning")
        return [None] * len(virtual_ranks)
    by_rank = {st["rank"]: st for st in old}
    if all(st["world_size"] == streams for st in old) and sorted(by_rank) == list(range(streams)):
        return [by_rank[v] for v in virtual_ranks]
    print0(f"warning: checkpoint step {step} has {old[0]['world_size']} data streams, this run has {streams} "
           "(device batch size changed?): exact data resume is impossible; every stream restarts just past the "
           "furthest row group read before (buffered documents are dropped)")
    train, _ = read_data_dir(data_dir)
    groups = [sum(pq.ParquetFile(f).num_row_groups for f in source["files"]) for source in train]
    return remap_loader_states(old, virtual_ranks, streams, groups)


def main(argv=None):
    args = parse_args(argv)
    if args.dtype:
        os.environ["NANOCHAT_DTYPE"] = args.dtype  # read when nanochat.common is first imported (below)
    import torch

    from nanochat import common
    from nanochat.common import EventLog, compute_init, run_stage
    if args.dtype and common.COMPUTE_DTYPE != getattr(torch, args.dtype):
        raise ValueError(f"--dtype {args.dtype}: nanochat.common was already imported with {common.COMPUTE_DTYPE}")

    out_dir = args.out_dir or os.path.join(common.get_base_dir(), "stages", "base_train-manual")
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    events = EventLog(os.path.join(out_dir, "events.jsonl"), rank, wandb_run=args.run, config=vars(args))
    return run_stage(events, "base_train", lambda: train(args, out_dir, events, ddp, rank, world_size, device),
                     world_size=world_size, device=str(device))


# -----------------------------------------------------------------------------
# Training. train() is the outline; the steps it calls follow below in the order it calls them. Setup prints and
# logs as it goes, so the order of the setup steps is the order of the output.


@dataclass(frozen=True)
class TrainingPlan:
    """nanochat.scaling's numbers for this depth and batch (`resolved`, printed and logged as they are) and what
    the loop reads from them."""
    resolved: dict
    num_iterations: int     # N, optimizer steps
    total_batch_size: int   # B, tokens per optimizer step (all ranks)
    grad_accum: int         # micro-steps per optimizer step on each rank
    warmup_steps: int


@dataclass
class LoopState:
    """The loop's running numbers. The fields in SAVED are a checkpoint's meta["loop_state"] (in this order, plus
    "grad_scaler" under fp16) and a resume restores them; the others are the latest values, for the result."""
    min_val_bpb: float = float("inf")
    smooth_train_loss: float = 0.0     # EMA of the train loss, not debiased
    total_training_time: float = 0.0   # seconds, steps after step 10 only (compile and warm-up left out)
    val_bpb: float | None = None
    tok_per_sec_sum: float = 0.0       # over the timed steps
    timed_steps: int = 0
    core_metric: float | None = None
    train_loss: float | None = None
    tok_per_sec: float = 0.0
    mfu: float = 0.0

    SAVED = ("min_val_bpb", "smooth_train_loss", "total_training_time", "val_bpb", "tok_per_sec_sum", "timed_steps")

    @classmethod
    def restore(cls, loop_state):
        return cls(**{k: loop_state[k] for k in cls.SAVED if k in loop_state})

    def saved(self):
        return {k: getattr(self, k) for k in self.SAVED}


EMA_BETA = 0.9  # smoothing of the printed train loss


def train(args, out_dir, events, ddp, rank, world_size, device):
    from nanochat.common import write_result
    from nanochat.tokenizer import Tokenizer

    # --- setup
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    vocab_size = tokenizer.get_vocab_size()
    token_bytes = tokenizer.token_bytes().to(device)  # bytes of each token id, for val bpb
    plan = resolve_plan(args, vocab_size, events, world_size, device)
    orig_model = build_model(args, plan, vocab_size, device)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    resume_step = find_resume_step(args.resume_from_step, ckpt_dir, rank)
    optim_state, meta = None, {}  # meta: the resumed checkpoint's
    if resume_step >= 0:
        optim_state, meta = restore_model(orig_model, ckpt_dir, resume_step, plan.num_iterations, device, rank,
                                          world_size)
    model, model_compile, flops_per_token, params_total = prepare_model(args, orig_model, plan.num_iterations,
                                                                        device)
    optimizer = build_optimizer(args, plan, orig_model, model_compile, optim_state, device)
    del optim_state
    scaler = build_grad_scaler(meta.get("loop_state", {}), device)
    log_distributed(optimizer, plan, events, world_size)
    train_loaders = build_train_loaders(args, plan, tokenizer, ckpt_dir, resume_step, meta, rank, world_size, device)
    peak_flops, peak_source, dtype_reason = mfu_denominator(events, device, ddp)
    evaluate_core, bundle_dir = core_evaluator(args)

    # --- the loop: at the start of a step the evaluations and the checkpoint that are due, then one optimizer step
    N = plan.num_iterations
    state = LoopState.restore(meta.get("loop_state", {}))
    step = first_step = resume_step if resume_step >= 0 else 0
    reshard = meta.get("world_size", 1) != world_size
    prefetched = [None] * plan.grad_accum  # batches drawn ahead of their micro-step
    while True:
        last_step = step == N
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            evaluate_val_bpb(step, state, orig_model, tokenizer, token_bytes, args, events, rank, world_size, device)
        if (periodic(step, args.core_metric_every, last_step) and evaluate_core is not None
                and os.path.isdir(bundle_dir)):
            evaluate_core_metric(step, state, orig_model, tokenizer, evaluate_core, bundle_dir, args, events, device)
        if rank == 0 and periodic(step, args.sample_every, last_step):
            log_samples(step, orig_model, tokenizer, events)
        if checkpoint_due(step, N, args.save_every, resume_step, reshard):
            save(step, state, args, plan, orig_model, optimizer, scaler, train_loaders, ckpt_dir, rank, world_size)
        if last_step:
            break
        train_loss, lrm, dt = optimizer_step(step, model, optimizer, scaler, train_loaders, prefetched, plan, args,
                                             ddp, device)
        report_step(step, state, train_loss, lrm, dt, train_loaders[0].epoch, plan, flops_per_token, peak_flops,
                    scaler, events, world_size, device)
        collect_garbage(step, first_step)
        step += 1
    gc.enable()

    metrics = final_metrics(state, args, plan, flops_per_token, params_total, peak_flops, peak_source, dtype_reason,
                            world_size, device)
    if rank == 0:
        events.log("status", status="done")
        write_result(out_dir, "base_train", metrics=metrics, outputs={"checkpoint_dir": ckpt_dir, "last_step": N})
    return metrics


# --- setup steps


def resolve_plan(args, vocab_size, events, world_size, device):
    """Every hyperparameter from the depth (nanochat.scaling.resolve_from), printed and logged. -> TrainingPlan"""
    from nanochat import scaling
    from nanochat.attention import BACKEND
    from nanochat.common import COMPUTE_DTYPE, print0
    r = scaling.resolve_from(args, vocab_size=vocab_size, device_batch_size=args.device_batch_size,
                             world_size=world_size)
    N = r["num_iterations"]
    warmup_steps = round(args.warmup_ratio * N) if args.warmup_ratio >= 0 else args.warmup_steps
    print0("resolved training plan (nanochat.scaling.resolve_training):")
    for k in sorted(r):
        print0(f"  {k}: {r[k]}")
    print0(f"  warmup_steps: {warmup_steps}\n  attention backend: {BACKEND}\n  compute dtype: {COMPUTE_DTYPE}")
    if BACKEND == "sdpa" and "S" in args.window_pattern.upper() and device.type == "cuda":
        print0("warning: sliding windows on SDPA use an explicit mask (slow); consider --window-pattern L")
    events.log("log", message="resolved", resolved=r, attention_backend=BACKEND, warmup_steps=warmup_steps,
               compute_dtype=str(COMPUTE_DTYPE), args=vars(args))
    return TrainingPlan(resolved=r, num_iterations=N, total_batch_size=r["total_batch_size"],
                        grad_accum=r["grad_accum_steps"], warmup_steps=warmup_steps)


def build_model(args, plan, vocab_size, device):
    """The plan's GPT, built on the meta device and initialized on `device` (torch's RNG, seeded in main)."""
    import torch

    from nanochat.gpt import GPT, GPTConfig
    r = plan.resolved
    model_config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=r["n_layer"],
                             n_head=r["n_head"], n_kv_head=r["n_kv_head"], n_embd=r["n_embd"],
                             window_pattern=args.window_pattern)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def find_resume_step(resume_from_step, ckpt_dir, rank):
    """The checkpoint step to resume from, -1 for a fresh run (-2 = the newest complete one if any). A fresh run
    refuses a directory that already holds a run's checkpoints. Rank 0 removes what a save killed midway left."""
    from nanochat.checkpoint import find_last_step, list_steps, remove_partial_files
    resume_step = resume_from_step
    if resume_step == -2:
        resume_step = find_last_step(ckpt_dir) if list_steps(ckpt_dir) else -1
    if resume_step < 0 and list_steps(ckpt_dir):
        raise ValueError(f"{ckpt_dir} already holds checkpoints of a run (steps "
                         f"{', '.join(map(str, list_steps(ckpt_dir)))}): resume it with --resume-from-step -2 "
                         "or choose another --out-dir")
    if rank == 0:
        remove_partial_files(ckpt_dir)
    return resume_step


def restore_model(model, ckpt_dir, step, num_iterations, device, rank, world_size):
    """Load checkpoint `step`'s weights into model; refuse a step past this run's last.
    -> (this rank's optimizer state, the checkpoint's meta)."""
    from nanochat.checkpoint import load_checkpoint
    from nanochat.common import print0
    N = num_iterations
    print0(f"resuming from step {step} of {ckpt_dir}")
    model_state, optim_state, meta, _ = load_checkpoint(ckpt_dir, step, device, rank, world_size=world_size)
    if step > N:
        raise ValueError(f"checkpoint step {step} of {ckpt_dir} is past this run's last step "
                         f"(num_iterations resolved to {N})")
    if meta.get("num_iterations", N) != N:
        print0(f"warning: checkpoint step {step} was written by a run of {meta['num_iterations']} "
               f"iterations; this one has {N}, so the schedules from here on differ from that run's")
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    model.load_state_dict(model_state, strict=True)
    return optim_state, meta


def prepare_model(args, orig_model, num_iterations, device):
    """FP8 Linears (--fp8) and torch.compile (--compile, else nanochat.hardware.default_compile) of the model to
    train. -> (model to train, (compiled?, why), FLOPs per token, total params)."""
    import torch

    from nanochat.common import COMPUTE_DTYPE, dtype_name, inductor_works, print0
    from nanochat.fp8 import convert_to_fp8
    from nanochat.hardware import default_compile
    if args.fp8:
        n_fp8 = convert_to_fp8(orig_model, args.fp8_recipe)
        print0(f"FP8 ({args.fp8_recipe}) on {n_fp8} Linear layers; evaluation runs them in {COMPUTE_DTYPE}")
    flops_per_token = orig_model.estimate_flops()  # counts every nn.Linear, so it survives the fp8 swap
    counts = orig_model.num_scaling_params()
    if args.compile is not None:
        use_compile, compile_why = bool(args.compile), "--compile"
    else:
        use_compile, compile_why = default_compile(device.type, dtype_name(COMPUTE_DTYPE), num_iterations)
        if use_compile and device.type == "cpu" and not inductor_works(device):
            use_compile, compile_why = False, "torch.compile unavailable here (eager: below the compiled quality)"
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model
    return model, (use_compile, compile_why), flops_per_token, counts["total"]


def build_optimizer(args, plan, orig_model, model_compile, optim_state, device):
    """MuonAdamW with the plan's learning rates, its math compiled or not (printed with the model's decision,
    model_compile = (on, why)), loaded from optim_state on a resume (this rank's shard, or a merged state
    re-sharded here)."""
    from nanochat.common import print0
    use_compile, compile_why = model_compile
    r = plan.resolved
    optimizer = orig_model.setup_optimizer(
        unembedding_lr=r["unembedding_lr"], embedding_lr=r["embedding_lr"], matrix_lr=r["matrix_lr"],
        weight_decay=r["weight_decay_scaled"], scalar_lr=r["scalar_lr"], adam_betas=(args.adam_beta1, args.adam_beta2))
    if args.compile_optimizer is None:
        optimizer.compile, why = default_compile_optimizer(use_compile, device, plan.num_iterations)
    else:
        optimizer.compile, why = bool(args.compile_optimizer), "--compile-optimizer"
    print0(f"torch.compile: model {'on' if use_compile else 'off'} ({compile_why}), "
           f"optimizer {'on' if optimizer.compile else 'off'} ({why})")
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
    return optimizer


def build_grad_scaler(loop_state, device):
    """fp16 needs loss scaling (reference 2.10): params stay fp32 masters, so the scaler can unscale their grads.
    Disabled (a no-op) in other dtypes; a resume restores its state from the checkpoint's loop state."""
    import torch

    from nanochat.common import COMPUTE_DTYPE
    scaler = torch.amp.GradScaler(device.type, enabled=COMPUTE_DTYPE == torch.float16)
    if scaler.is_enabled() and "grad_scaler" in loop_state:
        scaler.load_state_dict(loop_state["grad_scaler"])
    return scaler


def log_distributed(optimizer, plan, events, world_size):
    """How the optimizer state is sharded over the ranks and how many data streams feed them."""
    from nanochat.common import print0
    print0(f"world size {world_size}, optimizer state sharding:")
    for line in optimizer.sharding_summary():
        print0(f"  {line}")
    events.log("log", message="distributed", world_size=world_size, grad_accum_steps=plan.grad_accum,
               data_streams=world_size * plan.grad_accum, optimizer_sharding=optimizer.sharding_summary())


def build_train_loaders(args, plan, tokenizer, ckpt_dir, resume_step, meta, rank, world_size, device):
    """One loader per micro-step: virtual rank rank*grad_accum + a of world_size*grad_accum (module docstring),
    each at its stream's position in checkpoint resume_step (if >= 0)."""
    from nanochat.dataloader import DataLoader
    grad_accum = plan.grad_accum
    streams = world_size * grad_accum
    virtual_ranks = [rank * grad_accum + a for a in range(grad_accum)]
    loader_states = [None] * grad_accum
    if resume_step >= 0:
        loader_states = resume_loader_states(args.data_dir, ckpt_dir, resume_step, meta, virtual_ranks, streams)
    return [DataLoader(args.data_dir, tokenizer, args.device_batch_size, args.max_seq_len, split="train", rank=v,
                       world_size=streams, device=device, state=st) for v, st in zip(virtual_ranks, loader_states)]


def mfu_denominator(events, device, ddp):
    """Log the device (nanochat.common.log_device), then the MFU denominator: a GPU's table peak, a CPU's measured
    matmul peak (shared by the processes on it). -> (peak FLOP/s per device, its source, dtype_reason)."""
    from nanochat.common import COMPUTE_DTYPE, dtype_name, log_device, print0
    from nanochat.hardware import mfu_peak_flops
    caps, dtype_reason = log_device(events, device, ddp)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    peak_flops, peak_source = mfu_peak_flops(caps, dtype_name(COMPUTE_DTYPE), local_procs)
    print0(f"MFU denominator: {peak_flops:.3e} FLOP/s per device ({peak_source})")
    events.log("log", message="mfu", peak_flops=peak_flops if peak_flops != float("inf") else None,
               peak_source=peak_source)
    return peak_flops, peak_source, dtype_reason


def core_evaluator(args):
    """(nanochat.core_eval.evaluate_core or None if it cannot be imported, the CORE bundle directory); says so
    when CORE during training is asked for but cannot run."""
    from nanochat.common import get_base_dir, print0
    bundle_dir = args.core_bundle_dir or os.path.join(get_base_dir(), "eval_bundle")
    try:
        from nanochat.core_eval import evaluate_core
    except ImportError:
        evaluate_core = None
    if args.core_metric_every > 0 and (evaluate_core is None or not os.path.isdir(bundle_dir)):
        print0(f"CORE during training is off: no CORE bundle at {bundle_dir} (see --core-bundle-dir)")
    return evaluate_core, bundle_dir


# --- loop steps


def periodic(step, every, last_step):
    """Every `every` steps after step 0, and at the last step; never if every <= 0."""
    return every > 0 and (last_step or (step > 0 and step % every == 0))


def evaluate_val_bpb(step, state, orig_model, tokenizer, token_bytes, args, events, rank, world_size, device):
    """Val bpb over eval_tokens of the val split (this rank's share): the uncompiled model with FP8 switched off
    (nanochat.fp8), in the compute dtype. Sets state.val_bpb and state.min_val_bpb."""
    from nanochat.common import print0
    from nanochat.dataloader import DataLoader
    from nanochat.fp8 import fp8_disabled
    from nanochat.loss_eval import evaluate_bpb
    dbs, T = args.device_batch_size, args.max_seq_len
    eval_steps = max(1, args.eval_tokens // (dbs * T * world_size))
    orig_model.eval()
    val_loader = DataLoader(args.data_dir, tokenizer, dbs, T, split="val", rank=rank, world_size=world_size,
                            device=device)
    # targets from the loader are strided views of one (B, T+1) buffer; evaluators may .view() them
    val_batches = ((x.contiguous(), y.contiguous()) for x, y in val_loader)
    with fp8_disabled(orig_model):
        state.val_bpb = evaluate_bpb(orig_model, val_batches, eval_steps, token_bytes)
    state.min_val_bpb = min(state.min_val_bpb, state.val_bpb)
    print0(f"step {step:05d} | val bpb: {state.val_bpb:.6f}")
    events.metric(step, **{"val/bpb": state.val_bpb})
    orig_model.train()


def evaluate_core_metric(step, state, orig_model, tokenizer, evaluate_core, bundle_dir, args, events, device):
    """CORE (at most core_metric_max_per_task examples per task) of the uncompiled model, FP8 off; logs every
    task's accuracy and centered score. Sets state.core_metric."""
    from nanochat.common import print0
    from nanochat.fp8 import fp8_disabled
    orig_model.eval()
    with fp8_disabled(orig_model):
        core = evaluate_core(orig_model, tokenizer, bundle_dir, device, max_per_task=args.core_metric_max_per_task)
    orig_model.train()
    state.core_metric = core["core_metric"]
    print0(f"step {step:05d} | CORE metric: {state.core_metric:.4f}")
    for task, res in core["tasks"].items():
        for metric in ("accuracy", "centered"):
            events.log("eval", step=step, suite="core", task=task, metric=metric, value=res[metric], n=res["n"])
    events.metric(step, **{"core/metric": state.core_metric})


def log_samples(step, orig_model, tokenizer, events):
    """Greedy 16-token continuations of SAMPLE_PROMPTS (uncompiled model, FP8 off), printed and logged."""
    from nanochat.common import print0
    from nanochat.engine import Engine
    from nanochat.fp8 import fp8_disabled
    orig_model.eval()
    engine = Engine(orig_model, tokenizer)
    with fp8_disabled(orig_model):
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out, _ = engine.generate_batch(ids, num_samples=1, max_tokens=16, temperature=0)
            text = tokenizer.decode(out[0][len(ids):])
            print0(f"sample: {prompt!r} -> {text!r}")
            events.log("sample", step=step, prompt=prompt, text=prompt + text)
    orig_model.train()


def checkpoint_due(step, num_iterations, save_every, resume_step, reshard):
    """A checkpoint at the last step and every save_every steps, but not of the step just resumed from: a resume
    that starts at the last step saves it again only to re-shard it for another world size (`reshard`)."""
    same_as_loaded = step == resume_step and not reshard
    return (step == num_iterations and not same_as_loaded) or (step > 0 and step != resume_step and save_every > 0
                                                                and step % save_every == 0)


def save(step, state, args, plan, orig_model, optimizer, scaler, train_loaders, ckpt_dir, rank, world_size):
    """Checkpoint the state after `step` optimizer steps, before the next batch is drawn: the model, this rank's
    optimizer shard and loaders' positions, and the meta (configs, plan numbers, loop state) that a resume reads."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.common import print0
    meta = {
        "step": step, "val_bpb": state.val_bpb, "model_config": vars(orig_model.config), "user_config": vars(args),
        "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
        "total_batch_size": plan.total_batch_size, "world_size": world_size, "num_iterations": plan.num_iterations,
        "model_tag": args.model_tag or f"d{args.depth}",
        "loop_state": state.saved(),
    }
    if scaler.is_enabled():
        meta["loop_state"]["grad_scaler"] = scaler.state_dict()
    save_checkpoint(ckpt_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta, rank,
                    rank_state={"loaders": [loader.state_dict() for loader in train_loaders]})
    print0(f"saved checkpoint step {step} to {ckpt_dir}")


def optimizer_step(step, model, optimizer, scaler, train_loaders, prefetched, plan, args, ddp, device):
    """One optimizer step: grad_accum micro-batches, this step's schedules, the update.
    -> (mean loss of the step's micro-batches over all ranks, LR multiplier, seconds)."""
    import torch.distributed as dist

    from nanochat.common import synchronize
    from nanochat.optim import step_with_scaler
    N = plan.num_iterations
    synchronize(device)
    t0 = time.time()
    # the next step's first batch is drawn ahead only when no checkpoint comes in between (a checkpoint holds the
    # loader state before it)
    saves_next = step + 1 == N or (args.save_every > 0 and (step + 1) % args.save_every == 0)
    loss_sum = accumulate_gradients(model, scaler, train_loaders, prefetched, prefetch_next_step=not saves_next)
    lrm = apply_schedules(optimizer, step, plan, args)
    step_with_scaler(optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    train_loss = loss_sum / plan.grad_accum
    if ddp:  # log the loss of the whole batch, not rank 0's part: comparable across world sizes
        dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
    train_loss = train_loss.item()
    synchronize(device)
    return train_loss, lrm, time.time() - t0


def accumulate_gradients(model, scaler, train_loaders, prefetched, prefetch_next_step):
    """Forward and backward of one micro-batch per loader, each loss divided by grad_accum (and scaled under fp16).
    The batch of the next micro-step is drawn while the device runs this one's backward (reference 5.4); the next
    optimizer step's first one only if prefetch_next_step. prefetched[a] holds micro-step a's batch drawn ahead.
    -> sum of the micro-batch losses (a detached scalar tensor)."""
    grad_accum = len(train_loaders)
    loss_sum = 0.0
    for a, loader in enumerate(train_loaders):
        x, y = prefetched[a] if prefetched[a] is not None else loader.next_batch()
        prefetched[a] = None
        loss = model(x, y)
        loss_sum += loss.detach()
        scaler.scale(loss / grad_accum).backward()
        if a + 1 < grad_accum:
            prefetched[a + 1] = train_loaders[a + 1].next_batch()
        elif prefetch_next_step:
            prefetched[0] = train_loaders[0].next_batch()
    return loss_sum


def apply_schedules(optimizer, step, plan, args):
    """Set this step's learning rates (every group) and Muon momentum and weight decay. -> the LR multiplier."""
    N = plan.num_iterations
    lrm = lr_multiplier(step, N, plan.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    momentum = muon_momentum(step, N, args.warmdown_ratio)
    muon_wd = muon_weight_decay(step, N, plan.resolved["weight_decay_scaled"])
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = momentum, muon_wd
    return lrm


def report_step(step, state, train_loss, lrm, dt, epoch, plan, flops_per_token, peak_flops, scaler, events,
                world_size, device):
    """Update the running numbers (smoothed loss, throughput, MFU, timed total) and print and log the step."""
    from nanochat.common import peak_memory_mib, print0
    N, B = plan.num_iterations, plan.total_batch_size
    state.train_loss = train_loss
    state.smooth_train_loss = EMA_BETA * state.smooth_train_loss + (1 - EMA_BETA) * train_loss
    debiased = state.smooth_train_loss / (1 - EMA_BETA ** (step + 1))
    state.tok_per_sec = B / dt
    state.mfu = 100 * flops_per_token * B / dt / (peak_flops * world_size)
    if step > 10:
        state.total_training_time += dt
        state.tok_per_sec_sum += state.tok_per_sec
        state.timed_steps += 1
    # ETA of the remaining steps at the mean step time so far (eval and checkpoints not included)
    eta = (N - step - 1) * (state.total_training_time / state.timed_steps if state.timed_steps else dt)
    peak_mem = peak_memory_mib(device)
    extra = {"train/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
    print0(f"step {step:05d}/{N} ({100 * step / N:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
           f"dt: {dt * 1000:.2f}ms | tok/sec: {int(state.tok_per_sec):,} | mfu: {state.mfu:.2f} | "
           f"epoch: {epoch} | total time: {state.total_training_time / 60:.2f}m | "
           f"eta: {eta / 60:.1f}m | peak mem: {peak_mem:,.0f} MiB")
    events.metric(step, **{"train/loss": train_loss, "train/loss_smooth": debiased, "train/lrm": lrm,
                           "train/dt": dt, "train/tok_per_sec": state.tok_per_sec, "train/mfu": state.mfu,
                           "train/epoch": epoch, "train/eta_s": eta,
                           "train/peak_mem_mib": peak_mem, "train/total_training_time": state.total_training_time,
                           "train/total_training_flops": flops_per_token * B * (step + 1), **extra})


def collect_garbage(step, first_step):
    """Avoid ~500 ms GC pauses later (reference 5.4): after the first step (again after a resume) collect, freeze
    what survives and switch the collector off; collect by hand every 5000 steps."""
    if step == first_step:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 5000 == 0:
        gc.collect()


def final_metrics(state, args, plan, flops_per_token, params_total, peak_flops, peak_source, dtype_reason,
                  world_size, device):
    """Print the run's totals; -> result.json's metrics."""
    from nanochat.attention import BACKEND
    from nanochat.common import COMPUTE_DTYPE, dtype_name, peak_memory_mib, print0
    N, B = plan.num_iterations, plan.total_batch_size
    peak_mem = peak_memory_mib(device)
    print0(f"peak memory: {peak_mem:.2f} MiB ({'max allocated' if device.type == 'cuda' else 'peak RSS'})")
    print0(f"total training time: {state.total_training_time / 60:.2f}m | min val bpb: {state.min_val_bpb:.6f}")
    metrics = {
        "val_bpb": state.val_bpb, "min_val_bpb": state.min_val_bpb, "train_loss": state.train_loss,
        "total_training_time": state.total_training_time, "total_flops": flops_per_token * B * N,
        "flops_per_token": flops_per_token, "num_iterations": N, "total_batch_size": B, "total_tokens": B * N,
        "tok_per_sec": state.tok_per_sec_sum / state.timed_steps if state.timed_steps else state.tok_per_sec,
        "mfu": state.mfu, "params_total": params_total, "scaling_params": plan.resolved["scaling_params"],
        "depth": args.depth, "world_size": world_size, "attention_backend": BACKEND, "peak_memory_mib": peak_mem,
        "compute_dtype": dtype_name(COMPUTE_DTYPE), "dtype_reason": dtype_reason,
        "peak_flops": peak_flops if peak_flops != float("inf") else None, "peak_source": peak_source,
    }
    if state.core_metric is not None:
        metrics["core_metric"] = state.core_metric
    return metrics


if __name__ == "__main__":
    main()
