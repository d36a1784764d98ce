"""
Supervised fine-tuning stage (reference/nanochat.md 11.2): base checkpoint -> chat model on a mixture of
conversations (nanochat.sft_data), best-fit packed into rows of T+1 tokens, loss on the assistant tokens only.

    python -m nanochat.stages.sft --checkpoint-dir BASE/checkpoints --tokenizer-dir TOK --out-dir OUT \
        --num-iterations 20 --device-batch-size 4 --max-seq-len 256 --chitchat-epochs 0
    torchrun --standalone --nproc_per_node=2 -m nanochat.stages.sft --config config.json

Differences from the reference: the loss of a step is the sum of token losses over every micro-batch of every
rank divided by the step's total supervised tokens (each supervised token weighs the same, however the rows
were split), and the data is generated/packaged offline instead of SmolTalk/MMLU/GSM8K train.
Resume: every --save-every steps the model, every rank's optimizer shard and the loop state are saved; a restart
with the same --out-dir continues from the newest complete checkpoint and logs exactly the losses an
uninterrupted run would (the rows of a step are a pure function of the step, so the step is the data cursor).
Outputs in --out-dir: events.jsonl, checkpoints/ (base_train's format, meta "stage": "sft"), result.json.
"""

import argparse
import math
import os
import random
import time
from dataclasses import dataclass


def build_parser():
    p = argparse.ArgumentParser(description="nanorun SFT stage", allow_abbrev=False)
    a = p.add_argument
    a("--config", default=None, help="JSON file of defaults keyed by argparse dest names")
    a("--run", default="dummy", help="wandb run name ('dummy' = off)")
    a("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    a("--checkpoint-dir", default=None, help="base_train's checkpoints/ directory")
    a("--model-step", type=int, default=None, help="checkpoint step (default: the newest)")
    a("--tokenizer-dir", default=None)
    a("--out-dir", default=None, help="stage directory (default $NANORUN_HOME/stages/sft-manual)")
    a("--seed", type=int, default=42)
    a("--load-optimizer", type=int, default=1, help="1 = warm-start from the base optimizer shards if present")
    a("--num-iterations", type=int, default=-1, help="-1 = one epoch of the mixture")
    a("--max-seq-len", type=int, default=None, help="None = the base checkpoint's")
    a("--device-batch-size", type=int, default=None, help="None = the base checkpoint's")
    a("--total-batch-size", type=int, default=None, help="tokens per step; None = the base checkpoint's")
    a("--embedding-lr", type=float, default=None, help="None = the base run's")
    a("--unembedding-lr", type=float, default=None)
    a("--matrix-lr", type=float, default=None)
    a("--init-lr-frac", type=float, default=0.8)
    a("--warmup-ratio", type=float, default=0.0)
    a("--warmdown-ratio", type=float, default=0.5)
    a("--final-lr-frac", type=float, default=0.0)
    a("--eval-every", type=int, default=200)
    a("--eval-tokens", type=int, default=40 * 524288)
    a("--val-fraction", type=float, default=0.05)
    a("--identity-name", default="nanorun")
    a("--identity-creator", default="the nanorun authors")
    a("--identity-epochs", type=int, default=2)
    a("--arithmetic-examples", type=int, default=2000)
    a("--arithmetic-epochs", type=int, default=1)
    a("--spelling-examples", type=int, default=2000)
    a("--spelling-epochs", type=int, default=1)
    a("--chitchat-epochs", type=int, default=1, help="0 = off")
    a("--chitchat-max", type=int, default=None)
    a("--word-problem-examples", type=int, default=2000, help="GSM8K-style '#### N' problems (rl_data train)")
    a("--word-problem-epochs", type=int, default=1)
    a("--save-every", type=int, default=200, help="checkpoint every N steps (resume); -1 = only the final one")
    return p


def parse_args(argv=None):
    from nanochat.stage_args import parse_args_with_config
    parser = build_parser()
    args = parse_args_with_config(parser, argv, required=("checkpoint_dir", "tokenizer_dir"))
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction}: expected a fraction in (0, 1)")
    return args


# -----------------------------------------------------------------------------


def lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Progress-based schedule (11.2): warmup to warmup_ratio, flat, then linear to final_lr_frac."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1 - warmdown_ratio:
        return 1.0
    decay = (1 - progress) / warmdown_ratio
    return decay + (1 - decay) * final_lr_frac


def muon_momentum(step):
    return 0.85 + (0.95 - 0.85) * min(step / 300, 1.0)


def build_mixture(args, cache_dir):
    """-> (train, val) conversation lists: each source's last val_fraction is held out, train repeats each
    source's rest *_epochs times and is shuffled with the seed."""
    from nanochat import rl_data, sft_data
    sources = [
        ("identity", sft_data.identity_conversations(args.identity_name, args.identity_creator),
         args.identity_epochs),
        ("arithmetic", sft_data.arithmetic_conversations(args.arithmetic_examples, args.seed),
         args.arithmetic_epochs),
        ("spelling", sft_data.spelling_conversations(args.spelling_examples, args.seed + 1), args.spelling_epochs),
        ("word_problems", rl_data.word_problems("train", args.word_problem_examples), args.word_problem_epochs),
    ]
    if args.chitchat_epochs > 0:
        wheel = sft_data.fetch_chitchat(cache_dir)
        sources.append(("chitchat", sft_data.chitchat_conversations(wheel, args.chitchat_max), args.chitchat_epochs))
    train, val, counts = [], [], {}
    for name, convs, epochs in sources:
        if epochs <= 0 or not convs:
            continue
        n_val = max(1, round(len(convs) * args.val_fraction)) if len(convs) > 1 else 0
        val += convs[len(convs) - n_val:]
        train += convs[:len(convs) - n_val] * epochs
        counts[name] = {"train": (len(convs) - n_val) * epochs, "val": n_val}
    if not train:
        raise ValueError("sft: the mixture is empty (every source has 0 examples or 0 epochs)")
    random.Random(args.seed).shuffle(train)
    return train, val, counts


def accumulate_step(model, micro_batches, ddp=False, scaler=None):
    """Forward/backward every (x, y) micro-batch with loss = sum of token losses / supervised tokens of the
    whole step (all micro-batches, all ranks). The optimizer AVG-reduces grads over ranks, so each rank
    divides by total/world_size; `scaler` (fp16) scales what is backpropagated.
    -> (step loss as a float tensor, total supervised tokens int)."""
    import torch
    import torch.distributed as dist
    counts = torch.tensor([sum(int((y >= 0).sum()) for _, y in micro_batches)], dtype=torch.float64,
                          device=micro_batches[0][1].device)
    world = 1
    if ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        world = dist.get_world_size()
    total = max(int(counts.item()), 1)
    loss_sum = torch.zeros((), dtype=torch.float32, device=counts.device)
    for x, y in micro_batches:
        loss = model(x, y, loss_reduction="sum")
        scaled = loss * (world / total)
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        loss_sum += loss.detach().float()
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    return loss_sum / total, int(counts.item())


def evaluate_loss(model, rows, dbs, device, ddp=False):
    """Mean loss per supervised token over rows (this rank's share), summed across ranks."""
    import torch
    import torch.distributed as dist

    from nanochat.sft_data import rows_to_batch
    acc = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    with torch.no_grad():
        for i in range(0, len(rows), dbs):
            x, y = rows_to_batch(rows[i:i + dbs], device)
            acc[0] += model(x, y, loss_reduction="sum").double()
            acc[1] += (y >= 0).sum()
    if ddp:
        dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    return (acc[0] / acc[1].clamp(min=1)).item()


def main(argv=None):
    args = parse_args(argv)
    import torch  # noqa: F401  (after argument errors, which should be fast)

    from nanochat import common
    from nanochat.common import EventLog, compute_init, run_stage
    out_dir = args.out_dir or os.path.join(common.get_base_dir(), "stages", "sft-manual")
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    events = EventLog(os.path.join(out_dir, "events.jsonl"), rank, wandb_run=args.run, config=vars(args))
    return run_stage(events, "sft", lambda: train(args, out_dir, events, ddp, rank, world_size, device),
                     world_size=world_size, device=str(device))


# -----------------------------------------------------------------------------
# Training. train() is the outline; the steps it calls follow below in the order it calls them.


@dataclass(frozen=True)
class Batch:
    """How a step's rows (seq_len + 1 tokens each) are split: device_batch_size rows per micro-batch, grad_accum
    micro-batches per rank; rows_per_step over all ranks."""
    seq_len: int
    device_batch_size: int
    total_batch_size: int   # tokens per step, all ranks
    grad_accum: int
    rows_per_step: int


@dataclass
class LoopState:
    """The latest losses and the supervised tokens trained on so far: a checkpoint's meta records them, a resume
    restores train_loss and supervised_tokens."""
    val_loss: float | None = None
    train_loss: float | None = None
    supervised_tokens: int = 0


def train(args, out_dir, events, ddp, rank, world_size, device):
    import torch

    from nanochat.checkpoint import find_last_step, list_steps, load_model
    from nanochat.common import COMPUTE_DTYPE, dtype_name, log_device, write_result
    from nanochat.tokenizer import Tokenizer

    # --- setup: the base model, batch and data, our own checkpoint to resume from, the optimizer
    torch.manual_seed(args.seed)
    _, dtype_reason = log_device(events, device, ddp)
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    step0 = find_last_step(args.checkpoint_dir) if args.model_step is None else args.model_step
    model, base_meta = load_model(args.checkpoint_dir, step0, device)
    model.train()
    batch = resolve_batch(args, base_meta, model.config.sequence_len, world_size)
    lrs = resolve_lrs(args, base_meta)
    N, conversations, train_rows, val_rows = build_rows(args, tokenizer, batch, lrs, events, rank, world_size)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    resume = find_last_step(ckpt_dir) if list_steps(ckpt_dir) else None
    resume_meta = {}
    if resume is not None:
        model, resume_meta = load_resumed_model(ckpt_dir, resume, N, device)
    optimizer = build_optimizer(args, model, lrs, step0, ckpt_dir, resume, events, rank, world_size, device)
    scaler = build_grad_scaler(resume_meta, device)
    meta = checkpoint_meta(args, base_meta, step0, batch, N)

    # --- the loop: val loss when due, then one optimizer step; a checkpoint every save_every steps and at the end
    state = LoopState(train_loss=resume_meta.get("train_loss"),  # a resume continues; {} on a fresh run
                      supervised_tokens=resume_meta.get("supervised_tokens", 0))
    t_start = time.time()
    for step in range(resume or 0, N + 1):
        last = step == N
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            evaluate_val_loss(step, state, model, val_rows, args, batch, events, ddp, world_size, device)
        if last:
            break
        train_loss, ntok, lrm, dt = optimizer_step(step, model, optimizer, scaler, train_rows, batch, args, N, ddp,
                                                   rank, device)
        report_step(step, N, state, train_loss, ntok, lrm, dt, scaler, events)
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < N:
            save(step + 1, state, meta, model, optimizer, scaler, batch, ckpt_dir, rank)
    save(N, state, meta, model, optimizer, scaler, batch, ckpt_dir, rank)

    metrics = {"train_loss": state.train_loss, "val_loss": state.val_loss, "num_iterations": N,
               "conversations": conversations, "supervised_tokens": state.supervised_tokens,
               "training_time": time.time() - t_start, "world_size": world_size, "resumed_from": resume,
               "compute_dtype": dtype_name(COMPUTE_DTYPE), "dtype_reason": dtype_reason}
    if rank == 0:
        events.log("status", status="done")
        write_result(out_dir, "sft", metrics=metrics, outputs={"checkpoint_dir": ckpt_dir, "last_step": N})
    return metrics


# --- setup steps


def resolve_batch(args, base_meta, model_seq_len, world_size):
    """Sequence length, device batch size and total batch size: the flags, else the base run's. -> Batch"""
    T = args.max_seq_len or base_meta.get("max_seq_len") or model_seq_len
    if T > model_seq_len:
        raise ValueError(f"sft: --max-seq-len {T} exceeds the base model's sequence_len {model_seq_len}")
    dbs = args.device_batch_size or base_meta.get("device_batch_size") or 32
    B = args.total_batch_size or base_meta.get("total_batch_size") or dbs * T * world_size
    if B % (dbs * T * world_size):
        raise ValueError(f"sft: total batch size {B} is not a multiple of device_batch_size*max_seq_len*world "
                         f"= {dbs}*{T}*{world_size}")
    grad_accum = B // (dbs * T * world_size)
    return Batch(seq_len=T, device_batch_size=dbs, total_batch_size=B, grad_accum=grad_accum,
                 rows_per_step=dbs * grad_accum * world_size)


def resolve_lrs(args, base_meta):
    """The flags' learning rates, else the base run's, else nanochat's defaults."""
    user = base_meta.get("user_config", {})
    return {k: getattr(args, k) if getattr(args, k) is not None else user.get(k, d)
            for k, d in (("embedding_lr", 0.3), ("unembedding_lr", 0.004), ("matrix_lr", 0.02))}


def build_rows(args, tokenizer, batch, lrs, events, rank, world_size):
    """The mixture rendered and packed into rows: every rank packs everything the same way; the val rows are
    strided over ranks. Prints and logs the plan. -> (num_iterations, train conversations, train rows, this rank's
    val rows)."""
    from nanochat.common import get_base_dir, print0
    from nanochat.sft_data import pack_rows
    T = batch.seq_len
    train_convs, val_convs, source_counts = build_mixture(args, os.path.join(get_base_dir(), "packages"))
    bos = tokenizer.get_bos_token_id()
    render = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in train_convs]
    train_rows = pack_rows(render, T + 1, bos)
    val_rows = pack_rows([tokenizer.render_conversation(c, max_tokens=T + 1) for c in val_convs], T + 1, bos)
    N = args.num_iterations if args.num_iterations > 0 else max(1, len(train_rows) // batch.rows_per_step)
    val_rows = val_rows[rank::world_size]
    print0(f"sft: {len(train_convs)} train / {len(val_convs)} val conversations {source_counts} -> "
           f"{len(train_rows)} rows of {T + 1}; {N} steps of {batch.rows_per_step} rows (grad accum "
           f"{batch.grad_accum}); lrs {lrs}")
    events.log("log", message="resolved", num_iterations=N, rows=len(train_rows), max_seq_len=T,
               device_batch_size=batch.device_batch_size, total_batch_size=batch.total_batch_size,
               grad_accum_steps=batch.grad_accum, sources=source_counts, lrs=lrs, args=vars(args))
    return N, len(train_convs), train_rows, val_rows


def load_resumed_model(ckpt_dir, step, num_iterations, device):
    """The model of our own checkpoint `step`, if it belongs to a run of this many steps. -> (model, meta)"""
    from nanochat.checkpoint import load_model
    model, meta = load_model(ckpt_dir, step, device)
    model.train()
    if meta.get("num_iterations") != num_iterations:
        raise ValueError(f"sft: the checkpoints in {ckpt_dir} belong to a run of {meta.get('num_iterations')} "
                         f"steps, this one has {num_iterations}: use another --out-dir")
    return model, meta


def build_optimizer(args, model, lrs, step0, ckpt_dir, resume, events, rank, world_size, device):
    """MuonAdamW at init_lr_frac of lrs. On a resume its state (and this rank's RNG states) come from our checkpoint
    `resume`; else it is warm-started from this rank's pretraining shard when there is one (--load-optimizer)."""
    import torch

    from nanochat.checkpoint import load_checkpoint
    from nanochat.common import print0
    optimizer = model.setup_optimizer(weight_decay=0.0, **lrs)
    base_lrs = [g["initial_lr"] * args.init_lr_frac for g in optimizer.param_groups]
    has_optim = os.path.exists(os.path.join(args.checkpoint_dir, f"optim_{step0:06d}_rank0.pt"))
    if resume is not None:
        _, optim_state, _, rank_state = load_checkpoint(ckpt_dir, resume, device, rank, world_size=world_size)
        optimizer.load_state_dict(optim_state)
        del optim_state
        if rank_state is not None:  # same world size: this rank's RNG states (a cross-world resume reseeds)
            torch.set_rng_state(rank_state["torch_rng"])
            random.setstate(rank_state["python_rng"])
        print0(f"sft: resuming from step {resume} of {ckpt_dir}")
        events.log("log", message="resumed", step=resume)
    elif args.load_optimizer and has_optim:
        _, optim_state, _, _ = load_checkpoint(args.checkpoint_dir, step0, device, rank, world_size=world_size)
        optimizer.load_state_dict(optim_state)
        del optim_state
        print0("warm-started the optimizer from the base checkpoint")
    elif args.load_optimizer:
        print0("base checkpoint has no optimizer state: the optimizer starts fresh")
    for group, lr in zip(optimizer.param_groups, base_lrs):  # load_state_dict restored saved LRs: use ours
        group["lr"] = group["initial_lr"] = lr
    events.log("log", message="optimizer", warm_started=bool(args.load_optimizer and has_optim))
    return optimizer


def build_grad_scaler(resume_meta, device):
    """fp16 needs loss scaling (reference 2.10); its state is part of the checkpoint, so a resume is exact.
    Disabled (a no-op) in other dtypes."""
    import torch

    from nanochat.common import COMPUTE_DTYPE
    scaler = torch.amp.GradScaler(device.type, enabled=COMPUTE_DTYPE == torch.float16)
    if scaler.is_enabled() and "grad_scaler" in resume_meta:
        scaler.load_state_dict(resume_meta["grad_scaler"])
    return scaler


def checkpoint_meta(args, base_meta, step0, batch, num_iterations):
    """The part of every checkpoint's meta that does not change during the run (save() adds the rest)."""
    return {"stage": "sft", "num_iterations": num_iterations, "model_config": base_meta["model_config"],
            "user_config": vars(args), "max_seq_len": batch.seq_len, "device_batch_size": batch.device_batch_size,
            "total_batch_size": batch.total_batch_size, "model_tag": base_meta.get("model_tag"),
            "base_checkpoint": {"dir": args.checkpoint_dir, "step": step0}}


# --- loop steps


def evaluate_val_loss(step, state, model, val_rows, args, batch, events, ddp, world_size, device):
    """Val loss per supervised token on the first eval_tokens worth of this rank's val rows. Sets state.val_loss."""
    from nanochat.common import print0
    eval_rows = max(1, args.eval_tokens // (batch.seq_len * world_size))
    model.eval()
    state.val_loss = evaluate_loss(model, val_rows[:eval_rows], batch.device_batch_size, device, ddp)
    model.train()
    print0(f"step {step:05d} | val loss: {state.val_loss:.6f}")
    events.metric(step, **{"val/loss": state.val_loss})


def step_batches(train_rows, step, batch, rank, device):
    """This rank's grad_accum micro-batches of a step: the rows are a pure function of the step (they cycle when
    num_iterations exceeds an epoch), so the step is the data cursor."""
    from nanochat.sft_data import rows_to_batch
    dbs = batch.device_batch_size
    base = step * batch.rows_per_step
    out = []
    for a in range(batch.grad_accum):
        start = base + (rank * batch.grad_accum + a) * dbs
        out.append(rows_to_batch([train_rows[(start + i) % len(train_rows)] for i in range(dbs)], device))
    return out


def optimizer_step(step, model, optimizer, scaler, train_rows, batch, args, num_iterations, ddp, rank, device):
    """One optimizer step on the step's rows with this step's LR and Muon momentum.
    -> (loss per supervised token of the step, supervised tokens of the step (all ranks), LR multiplier, seconds)."""
    from nanochat.optim import step_with_scaler
    t0 = time.time()
    loss, ntok = accumulate_step(model, step_batches(train_rows, step, batch, rank, device), ddp, scaler)
    lrm = lr_multiplier(step / num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
    step_with_scaler(optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    train_loss = loss.item()
    return train_loss, ntok, lrm, time.time() - t0


def report_step(step, num_iterations, state, train_loss, ntok, lrm, dt, scaler, events):
    """Print and log the step; set state.train_loss and count its supervised tokens. A non-finite loss stops the
    stage."""
    from nanochat.common import print0
    state.train_loss = train_loss
    state.supervised_tokens += ntok
    print0(f"step {step:05d}/{num_iterations} | loss: {train_loss:.6f} | lrm: {lrm:.3f} | tokens: {ntok} | "
           f"dt: {dt * 1000:.0f}ms")
    extra = {"train/loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
    events.metric(step, **{"train/loss": train_loss, "train/lrm": lrm, "train/supervised_tokens": ntok,
                           "train/dt": dt, **extra})
    if not math.isfinite(train_loss):
        raise ValueError(f"sft: loss is {train_loss} at step {step}")


def save(step, state, meta, model, optimizer, scaler, batch, ckpt_dir, rank):
    """Checkpoint after `step` steps: the model, this rank's optimizer shard and RNG states, the meta with the loop
    state and the fp16 scaler."""
    import torch

    from nanochat.checkpoint import save_checkpoint
    rank_state = {"step": step, "rows_consumed": step * batch.rows_per_step, "torch_rng": torch.get_rng_state(),
                  "python_rng": random.getstate()}
    extra = {"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {}
    save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(),
                    {**meta, "step": step, "val_loss": state.val_loss, "train_loss": state.train_loss,
                     "supervised_tokens": state.supervised_tokens, **extra}, rank, rank_state=rank_state)


if __name__ == "__main__":
    main()
