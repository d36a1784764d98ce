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

from nanochat.hardware import COMPILE_OPTIMIZER_MIN_STEPS  # torch-free (`nanorun doctor` reads it too)

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
      help="torch.compile the model (default 1 on cuda, 0 elsewhere)")
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


def train(args, out_dir, events, ddp, rank, world_size, device):
    import torch
    import torch.distributed as dist

    from nanochat import scaling
    from nanochat.attention import BACKEND
    from nanochat.checkpoint import (find_last_step, list_steps, load_checkpoint, remove_partial_files,
                                     save_checkpoint)
    from nanochat.common import (COMPUTE_DTYPE, dtype_name, get_base_dir, log_device, peak_memory_mib, print0,
                                 synchronize, write_result)
    from nanochat.hardware import mfu_peak_flops
    from nanochat.dataloader import DataLoader
    from nanochat.engine import Engine
    from nanochat.fp8 import convert_to_fp8, fp8_disabled
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.optim import step_with_scaler
    from nanochat.tokenizer import Tokenizer

    # --- tokenizer, derived numbers, model -----------------------------------
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    vocab_size = tokenizer.get_vocab_size()
    token_bytes = tokenizer.token_bytes().to(device)
    r = scaling.resolve_from(args, vocab_size=vocab_size, device_batch_size=args.device_batch_size,
                             world_size=world_size)
    N, B, T, dbs = r["num_iterations"], r["total_batch_size"], args.max_seq_len, args.device_batch_size
    grad_accum = r["grad_accum_steps"]
    warmup_steps = round(args.warmup_ratio * N) if args.warmup_ratio >= 0 else args.warmup_steps
    print0("resolved training plan (nanochat.scaling.resolve_training):")
    for k in sorted(r):
        print0(f"  {k}: {r[k]}")
    print0(f"  warmup_steps: {warmup_steps}\n  attention backend: {BACKEND}\n  compute dtype: {COMPUTE_DTYPE}")
    if BACKEND == "sdpa" and "S" in args.window_pattern.upper() and device.type == "cuda":
        print0("warning: sliding windows on SDPA use an explicit mask (slow); consider --window-pattern L")
    events.log("log", message="resolved", resolved=r, attention_backend=BACKEND, warmup_steps=warmup_steps,
               compute_dtype=str(COMPUTE_DTYPE), args=vars(args))

    model_config = GPTConfig(sequence_len=T, vocab_size=vocab_size, n_layer=r["n_layer"], n_head=r["n_head"],
                             n_kv_head=r["n_kv_head"], n_embd=r["n_embd"], window_pattern=args.window_pattern)
    with torch.device("meta"):
        orig_model = GPT(model_config)
    orig_model.to_empty(device=device)
    orig_model.init_weights()

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    resume_step = args.resume_from_step
    if resume_step == -2:
        resume_step = find_last_step(ckpt_dir) if list_steps(ckpt_dir) else -1
    if resume_step < 0 and list_steps(ckpt_dir):
        raise ValueError(f"{ckpt_dir} already holds checkpoints of a run (steps "
                         f"{', '.join(map(str, list_steps(ckpt_dir)))}): resume it with --resume-from-step -2 "
                         "or choose another --out-dir")
    if rank == 0:
        remove_partial_files(ckpt_dir)  # what a save killed midway left behind
    loop_state, meta, saved_world = {}, None, None
    if resume_step >= 0:
        print0(f"resuming from step {resume_step} of {ckpt_dir}")
        model_state, optim_state, meta, _ = load_checkpoint(ckpt_dir, resume_step, device, rank, world_size=world_size)
        if resume_step > N:
            raise ValueError(f"checkpoint step {resume_step} of {ckpt_dir} is past this run's last step "
                             f"(num_iterations resolved to {N})")
        if meta.get("num_iterations", N) != N:
            print0(f"warning: checkpoint step {resume_step} was written by a run of {meta['num_iterations']} "
                   f"iterations; this one has {N}, so the schedules from here on differ from that run's")
        model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
        orig_model.load_state_dict(model_state, strict=True)
        loop_state = meta.get("loop_state", {})
        saved_world = meta.get("world_size", 1)
        del model_state

    if args.fp8:
        n_fp8 = convert_to_fp8(orig_model, args.fp8_recipe)
        print0(f"FP8 ({args.fp8_recipe}) on {n_fp8} Linear layers; evaluation runs them in {COMPUTE_DTYPE}")
    flops_per_token = orig_model.estimate_flops()  # counts every nn.Linear, so it survives the fp8 swap
    counts = orig_model.num_scaling_params()
    use_compile = args.compile if args.compile is not None else int(device.type == "cuda")
    model = torch.compile(orig_model, dynamic=False) if use_compile else orig_model

    optimizer = orig_model.setup_optimizer(
        unembedding_lr=r["unembedding_lr"], embedding_lr=r["embedding_lr"], matrix_lr=r["matrix_lr"],
        weight_decay=r["weight_decay_scaled"], scalar_lr=r["scalar_lr"], adam_betas=(args.adam_beta1, args.adam_beta2))
    if args.compile_optimizer is None:
        optimizer.compile, why = default_compile_optimizer(use_compile, device, N)
    else:
        optimizer.compile, why = bool(args.compile_optimizer), "--compile-optimizer"
    print0(f"torch.compile: model {'on' if use_compile else 'off'}, "
           f"optimizer {'on' if optimizer.compile else 'off'} ({why})")
    if resume_step >= 0:
        optimizer.load_state_dict(optim_state)  # this rank's shard, or a merged state re-sharded here
        del optim_state
    # fp16 needs loss scaling (reference 2.10): params stay fp32 masters, so the scaler can unscale their grads
    scaler = torch.amp.GradScaler(device.type, enabled=COMPUTE_DTYPE == torch.float16)
    if scaler.is_enabled() and "grad_scaler" in loop_state:
        scaler.load_state_dict(loop_state["grad_scaler"])
    print0(f"world size {world_size}, optimizer state sharding:")
    for line in optimizer.sharding_summary():
        print0(f"  {line}")
    events.log("log", message="distributed", world_size=world_size, grad_accum_steps=grad_accum,
               data_streams=world_size * grad_accum, optimizer_sharding=optimizer.sharding_summary())

    # one loader per micro-step: virtual rank rank*grad_accum + a of world_size*grad_accum (module docstring)
    streams = world_size * grad_accum
    virtual_ranks = [rank * grad_accum + a for a in range(grad_accum)]
    loader_states = [None] * grad_accum
    if resume_step >= 0:
        loader_states = resume_loader_states(args.data_dir, ckpt_dir, resume_step, meta, virtual_ranks, streams)
    train_loaders = [DataLoader(args.data_dir, tokenizer, dbs, T, split="train", rank=v, world_size=streams,
                                device=device, state=st) for v, st in zip(virtual_ranks, loader_states)]
    eval_steps = max(1, args.eval_tokens // (dbs * T * world_size))

    # MFU denominator: a GPU's table peak, a CPU's measured matmul peak (shared by the processes on it)
    caps, dtype_reason = log_device(events, device, ddp)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    peak_flops, peak_source = mfu_peak_flops(caps, dtype_name(COMPUTE_DTYPE), local_procs)
    print0(f"MFU denominator: {peak_flops:.3e} FLOP/s per device ({peak_source})")
    events.log("log", message="mfu", peak_flops=peak_flops if peak_flops != float("inf") else None,
               peak_source=peak_source)

    bundle_dir = args.core_bundle_dir or os.path.join(get_base_dir(), "eval_bundle")
    try:
        from nanochat.core_eval import evaluate_core
    except ImportError:
        evaluate_core = None
    if args.core_metric_every > 0 and (evaluate_core is None or not os.path.isdir(bundle_dir)):
        print0(f"CORE during training is off: no CORE bundle at {bundle_dir} (see --core-bundle-dir)")

    # --- loop state -----------------------------------------------------------
    step = resume_step if resume_step >= 0 else 0
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    smooth_train_loss = loop_state.get("smooth_train_loss", 0.0)
    total_training_time = loop_state.get("total_training_time", 0.0)
    val_bpb, core_metric, train_loss_f, tok_per_sec, mfu = loop_state.get("val_bpb"), None, None, 0.0, 0.0
    tok_per_sec_sum, timed_steps = loop_state.get("tok_per_sec_sum", 0.0), loop_state.get("timed_steps", 0)
    ema_beta = 0.9
    first_step = step
    prefetched = [None] * grad_accum  # batches drawn ahead of their micro-step

    while True:
        last_step = step == N
        # --- val bpb
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            # evaluation: the uncompiled model with FP8 switched off (nanochat.fp8), in the compute dtype
            orig_model.eval()
            val_loader = DataLoader(args.data_dir, tokenizer, dbs, T, split="val", rank=rank,
                                    world_size=world_size, device=device)
            # targets from the loader are strided views of one (B, T+1) buffer; evaluators may .view() them
            val_batches = ((x.contiguous(), y.contiguous()) for x, y in val_loader)
            with fp8_disabled(orig_model):
                val_bpb = evaluate_bpb(orig_model, val_batches, eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb: {val_bpb:.6f}")
            events.metric(step, **{"val/bpb": val_bpb})
            orig_model.train()
        # --- CORE (optional: needs core_eval and a bundle)
        if (args.core_metric_every > 0 and evaluate_core is not None and os.path.isdir(bundle_dir)
                and (last_step or (step > 0 and step % args.core_metric_every == 0))):
            orig_model.eval()
            with fp8_disabled(orig_model):
                core = evaluate_core(orig_model, tokenizer, bundle_dir, device,
                                     max_per_task=args.core_metric_max_per_task)
            orig_model.train()
            core_metric = core["core_metric"]
            print0(f"step {step:05d} | CORE metric: {core_metric:.4f}")
            for task, res in core["tasks"].items():
                for metric in ("accuracy", "centered"):
                    events.log("eval", step=step, suite="core", task=task, metric=metric, value=res[metric],
                               n=res["n"])
            events.metric(step, **{"core/metric": core_metric})
        # --- samples (rank 0)
        if rank == 0 and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
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
        # --- checkpoint (the state after `step` optimizer steps, before the next batch is drawn)
        # a resume that starts at the last step saves it again only to re-shard it for another world size
        same_as_loaded = step == resume_step and saved_world == world_size
        if (last_step and not same_as_loaded) or (step > 0 and step != resume_step and args.save_every > 0
                                                  and step % args.save_every == 0):
            meta = {
                "step": step, "val_bpb": val_bpb, "model_config": vars(model_config), "user_config": vars(args),
                "device_batch_size": dbs, "max_seq_len": T, "total_batch_size": B, "world_size": world_size,
                "num_iterations": N,
                "model_tag": args.model_tag or f"d{args.depth}",
                "loop_state": {"min_val_bpb": min_val_bpb, "smooth_train_loss": smooth_train_loss,
                               "total_training_time": total_training_time, "val_bpb": val_bpb,
                               "tok_per_sec_sum": tok_per_sec_sum, "timed_steps": timed_steps},
            }
            if scaler.is_enabled():
                meta["loop_state"]["grad_scaler"] = scaler.state_dict()
            save_checkpoint(ckpt_dir, step, orig_model.state_dict(), optimizer.state_dict(), meta, rank,
                            rank_state={"loaders": [loader.state_dict() for loader in train_loaders]})
            print0(f"saved checkpoint step {step} to {ckpt_dir}")
        if last_step:
            break

        # --- one optimizer step
        synchronize(device)
        t0 = time.time()
        loss_sum = 0.0
        # the batch of the next micro-step is drawn while the device runs this one's backward (reference 5.4);
        # across steps only when no checkpoint comes in between (a checkpoint holds the loader state before it)
        saves_next = step + 1 == N or (args.save_every > 0 and (step + 1) % args.save_every == 0)
        for a, loader in enumerate(train_loaders):
            x, y = prefetched[a] if prefetched[a] is not None else loader.next_batch()
            prefetched[a] = None
            loss = model(x, y)
            loss_sum += loss.detach()
            scaler.scale(loss / grad_accum).backward()
            if a + 1 < grad_accum:
                prefetched[a + 1] = train_loaders[a + 1].next_batch()
            elif not saves_next:
                prefetched[0] = train_loaders[0].next_batch()
        lrm = lr_multiplier(step, N, warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step, N, args.warmdown_ratio)
        muon_wd = muon_weight_decay(step, N, r["weight_decay_scaled"])
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, muon_wd
        step_with_scaler(optimizer, scaler)
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum
        if ddp:  # log the loss of the whole batch, not rank 0's part: comparable across world sizes
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss_f = train_loss.item()
        synchronize(device)
        dt = time.time() - t0

        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased = smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = B / dt
        mfu = 100 * flops_per_token * B / dt / (peak_flops * world_size)
        if step > 10:
            total_training_time += dt
            tok_per_sec_sum += tok_per_sec
            timed_steps += 1
        # ETA of the remaining steps at the mean step time so far (eval and checkpoints not included)
        eta = (N - step - 1) * (total_training_time / timed_steps if timed_steps else dt)
        peak_mem = peak_memory_mib(device)
        extra = {"train/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
        print0(f"step {step:05d}/{N} ({100 * step / N:.2f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | "
               f"dt: {dt * 1000:.2f}ms | tok/sec: {int(tok_per_sec):,} | mfu: {mfu:.2f} | "
               f"epoch: {train_loaders[0].epoch} | total time: {total_training_time / 60:.2f}m | "
               f"eta: {eta / 60:.1f}m | peak mem: {peak_mem:,.0f} MiB")
        events.metric(step, **{"train/loss": train_loss_f, "train/loss_smooth": debiased, "train/lrm": lrm,
                               "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                               "train/epoch": train_loaders[0].epoch, "train/eta_s": eta,
                               "train/peak_mem_mib": peak_mem, "train/total_training_time": total_training_time,
                               "train/total_training_flops": flops_per_token * B * (step + 1), **extra})
        if step == first_step:  # avoid ~500 ms GC pauses later (reference 5.4); again after a resume
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()
        step += 1

    gc.enable()
    peak_mem = peak_memory_mib(device)
    print0(f"peak memory: {peak_mem:.2f} MiB ({'max allocated' if device.type == 'cuda' else 'peak RSS'})")
    print0(f"total training time: {total_training_time / 60:.2f}m | min val bpb: {min_val_bpb:.6f}")
    metrics = {
        "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "train_loss": train_loss_f,
        "total_training_time": total_training_time, "total_flops": flops_per_token * B * N,
        "flops_per_token": flops_per_token, "num_iterations": N, "total_batch_size": B, "total_tokens": B * N,
        "tok_per_sec": tok_per_sec_sum / timed_steps if timed_steps else tok_per_sec, "mfu": mfu,
        "params_total": counts["total"], "scaling_params": r["scaling_params"], "depth": args.depth,
        "world_size": world_size, "attention_backend": BACKEND, "peak_memory_mib": peak_mem,
        "compute_dtype": dtype_name(COMPUTE_DTYPE), "dtype_reason": dtype_reason,
        "peak_flops": peak_flops if peak_flops != float("inf") else None, "peak_source": peak_source,
    }
    if core_metric is not None:
        metrics["core_metric"] = core_metric
    outputs = {"checkpoint_dir": ckpt_dir, "last_step": N}
    if rank == 0:
        events.log("status", status="done")
        write_result(out_dir, "base_train", metrics=metrics, outputs=outputs)
    return metrics


if __name__ == "__main__":
    main()
