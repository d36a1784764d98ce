"""
RL stage (reference/nanochat.md 11.3): on-policy REINFORCE ("GRPO" without the ratio, the clip or a KL term) on
generated arithmetic word problems (nanochat.rl_data), starting from the SFT checkpoint. Reward = exact match of
the final "#### N" answer (0/1).

    python -m nanochat.stages.rl --checkpoint-dir SFT/checkpoints --tokenizer-dir TOK --out-dir OUT \
        --num-steps 8 --examples-per-step 4 --num-samples 4 --device-batch-size 4 --max-new-tokens 64
    torchrun --standalone --nproc_per_node=2 -m nanochat.stages.rl --config config.json

Each step: the step's examples_per_step problems are strided over ranks; per problem, num_samples rollouts in
num_samples/device_batch_size passes of Engine.generate_batch (seed = hash((step, idx, pass)) & 0x7FFFFFFF, so a
rollout does not depend on the world size); advantages r - mean(r); sequences padded with <|assistant_end|>;
targets -1 on the prompt, the padding and forced tool tokens; loss = -sum(logp * A) / (valid tokens of the pass
* passes * examples per rank) (DAPO-style token-level normalization); one optimizer step (MuonAdamW averages the
gradients over ranks); LR multiplier 1 - step/num_steps. pass@k (k = 1..eval_samples) on the first eval_examples
held-out test problems every eval_every steps and at the end.

Unlike the reference it resumes: every save_every steps it saves the model, every rank's optimizer shard and the
stage's state (step, RNG states, data cursor) with nanochat.checkpoint; a restart with the same --out-dir
continues from the newest complete checkpoint and logs exactly the same per-step metrics as an uninterrupted run.
Outputs in --out-dir: events.jsonl, checkpoints/ (meta "stage": "rl", loadable like sft's), result.json.
"""

import argparse
import os
import random
import time

EVAL_SEED_OFFSET = 1 << 30   # eval seeds (offset + problem index) stay clear of the rollout seeds' usual range


def build_parser():
    p = argparse.ArgumentParser(description="nanorun RL stage (REINFORCE on word problems)", allow_abbrev=False)
    a = p.add_argument
    a("--config", default=None, help="JSON file of defaults keyed by argparse dest names")
    a("--run", default="dummy", help="wandb run name ('dummy' = off)")
    a("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    a("--checkpoint-dir", default=None, help="the SFT stage's checkpoints/ directory")
    a("--model-step", type=int, default=None, help="checkpoint step (default: the newest)")
    a("--tokenizer-dir", default=None)
    a("--out-dir", default=None, help="stage directory (default $NANORUN_HOME/stages/rl-manual)")
    a("--seed", type=int, default=42, help="torch seed (rollout seeds follow the reference formula)")
    a("--num-epochs", type=int, default=1)
    a("--num-steps", type=int, default=-1, help="-1 = num_epochs passes over the train problems")
    a("--train-problems", type=int, default=7473, help="generated train problems (GSM8K train has 7473)")
    a("--device-batch-size", type=int, default=8, help="rollouts per generate/forward pass")
    a("--examples-per-step", type=int, default=16, help="problems per optimizer step (divisible by world size)")
    a("--num-samples", type=int, default=16, help="rollouts per problem (divisible by device batch size)")
    a("--max-new-tokens", type=int, default=256)
    a("--temperature", type=float, default=1.0)
    a("--top-k", type=int, default=50)
    a("--embedding-lr", type=float, default=0.2)
    a("--unembedding-lr", type=float, default=0.004)
    a("--matrix-lr", type=float, default=0.02)
    a("--weight-decay", type=float, default=0.0)
    a("--init-lr-frac", type=float, default=0.05)
    a("--eval-every", type=int, default=60, help="-1 = only at the end")
    a("--eval-examples", type=int, default=400, help="first N held-out test problems for pass@k")
    a("--eval-samples", type=int, default=8, help="samples per eval problem: pass@1..pass@N")
    a("--save-every", type=int, default=60, help="-1 = only the final checkpoint")
    return p


def parse_args(argv=None):
    from nanochat.stage_args import parse_args_with_config
    parser = build_parser()
    args = parse_args_with_config(parser, argv, required=("checkpoint_dir", "tokenizer_dir"))
    for name in ("num_epochs", "train_problems", "device_batch_size", "examples_per_step", "num_samples",
                 "max_new_tokens", "eval_examples", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.num_samples % args.device_batch_size:
        parser.error(f"--num-samples {args.num_samples} must be a multiple of --device-batch-size "
                     f"{args.device_batch_size}")
    return args


# -----------------------------------------------------------------------------
# Pieces of one step (pure functions of their inputs; the tests call them directly)


def rollout_seed(step, example_idx, pass_idx):
    """The reference's sampling seed; hash of a tuple of ints is the same in every process."""
    return hash((step, example_idx, pass_idx)) & 0x7FFFFFFF


def step_examples(step, examples_per_step, num_problems, rank=0, world_size=1):
    """Global problem indices this rank trains on at `step`: the step's block of examples_per_step problems
    (cycling over the dataset), strided over ranks."""
    first = step * examples_per_step
    return [(first + i) % num_problems for i in range(rank, examples_per_step, world_size)]


def lr_multiplier(step, num_steps):
    return 1.0 - step / num_steps


def rollout_batch(sequences, masks, pad_id, device):
    """Generated rows (prompt + completion, masks 0 on prompt/forced tokens) -> (inputs (N, L-1) long,
    targets (N, L-1) long with -1 where not sampled or padding). Rows are right-padded with pad_id."""
    import torch
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return inputs.to(device), targets.to(device)


def policy_gradient_backward(model, inputs, targets, advantages, normalizer):
    """Backward of -sum(logp(token) * A(row)) / (valid tokens * normalizer) for one pass; -> the loss (float).
    advantages: (N,) one per row; normalizer = passes * examples per rank."""
    logp = -model(inputs, targets, loss_reduction="none")                 # (N, T); 0 where target is -1
    valid = (targets >= 0).sum().clamp(min=1)
    objective = (logp * advantages.unsqueeze(1)).sum() / (valid * normalizer)
    loss = -objective
    loss.backward()
    return loss.item()


def pass_at_k(correct_rows):
    """correct_rows: per problem a list of 0/1 over its samples -> list of counts, element k-1 = problems with a
    correct answer among their first k samples."""
    K = max((len(r) for r in correct_rows), default=0)
    return [sum(int(any(r[:k])) for r in correct_rows) for k in range(1, K + 1)]


def evaluate(engine, tokenizer, items, args, rank, world_size, device):
    """pass@1..pass@eval_samples over items (strided over ranks, seeded per problem, summed over ranks)."""
    import torch
    import torch.distributed as dist

    from nanochat.rl_data import reward
    rows = []
    for i in range(rank, len(items), world_size):
        prompt = tokenizer.render_for_completion(items[i])
        seqs, _ = engine.generate_batch(prompt, num_samples=args.eval_samples, max_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=EVAL_SEED_OFFSET + i)
        rows.append([int(reward(items[i], tokenizer.decode(s[len(prompt):]))) for s in seqs])
    counts = torch.tensor(pass_at_k(rows) if rows else [0] * args.eval_samples, dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return {f"pass@{k + 1}": int(c) / len(items) for k, c in enumerate(counts.tolist())}


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    import torch  # noqa: F401  (after argument errors, which should be fast)

    from nanochat import common
    from nanochat.common import EventLog, compute_init, run_stage
    out_dir = args.out_dir or os.path.join(common.get_base_dir(), "stages", "rl-manual")
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    if args.examples_per_step % world_size:
        raise ValueError(f"rl: --examples-per-step {args.examples_per_step} is not divisible by the "
                         f"world size {world_size}")
    events = EventLog(os.path.join(out_dir, "events.jsonl"), rank, wandb_run=args.run, wandb_project="nanorun-rl",
                      config=vars(args))
    return run_stage(events, "rl", lambda: train(args, out_dir, events, ddp, rank, world_size, device),
                     world_size=world_size, device=str(device))


def train(args, out_dir, events, ddp, rank, world_size, device):
    import torch

    from nanochat.checkpoint import find_last_step, list_steps
    from nanochat.common import write_result
    from nanochat.engine import Engine
    from nanochat.rl_data import word_problems
    from nanochat.tokenizer import Tokenizer

    # --- setup: the problems, the policy (our own newest checkpoint, a resume, or the SFT one), the optimizer
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    train_items = word_problems("train", args.train_problems)
    eval_items = word_problems("test", args.eval_examples)
    epoch_steps = max(1, len(train_items) // args.examples_per_step)
    num_steps = args.num_steps if args.num_steps > 0 else epoch_steps * args.num_epochs
    resume = find_last_step(ckpt_dir) if list_steps(ckpt_dir) else None
    source_step = find_last_step(args.checkpoint_dir) if args.model_step is None else args.model_step
    model, model_config = load_policy(args.checkpoint_dir, source_step, ckpt_dir, resume, num_steps, device)
    optimizer = build_optimizer(args, model, ckpt_dir, resume, events, rank, world_size, device)
    engine = Engine(model, tokenizer)
    log_plan(args, num_steps, len(train_items), len(eval_items), resume or 0, events, world_size)

    # --- the loop: pass@k when due, then one optimizer step; a checkpoint every save_every steps and at the end
    last_reward, last_eval, t_start = None, {}, time.time()
    for step in range(resume or 0, num_steps + 1):
        last = step == num_steps
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            last_eval = evaluate(engine, tokenizer, eval_items, args, rank, world_size, device)
            log_eval(step, last_eval, len(eval_items), events)
        if last:
            break
        t0 = time.time()
        lrm, stats = optimizer_step(step, model, engine, optimizer, tokenizer, train_items, args, num_steps, ddp,
                                    rank, world_size, device)
        last_reward = report_step(step, num_steps, stats, lrm, t0, world_size, events)
        done = step + 1
        if args.save_every > 0 and done % args.save_every == 0 and done < num_steps:
            save(done, model, optimizer, model_config, source_step, num_steps, args, ckpt_dir, rank)

    if resume != num_steps:   # (a restart after the final save only re-evaluates and writes the result)
        save(num_steps, model, optimizer, model_config, source_step, num_steps, args, ckpt_dir, rank, final=True)
    metrics = {"reward": last_reward, **last_eval, "num_steps": num_steps, "eval_examples": len(eval_items),
               "training_time": time.time() - t_start, "world_size": world_size, "resumed_from": resume}
    if rank == 0:
        events.log("status", status="done")
        write_result(out_dir, "rl", metrics=metrics, outputs={"checkpoint_dir": ckpt_dir, "last_step": num_steps})
    return metrics


# --- setup steps


def load_policy(checkpoint_dir, source_step, ckpt_dir, resume, num_steps, device):
    """The model to train: our own checkpoint `resume` if there is one (it must belong to a run of num_steps
    steps), else the SFT checkpoint source_step. -> (model, its model_config)"""
    from nanochat.checkpoint import load_model
    model, meta = load_model(ckpt_dir if resume is not None else checkpoint_dir,
                             resume if resume is not None else source_step, device)
    if resume is not None and meta.get("num_steps") != num_steps:
        raise ValueError(f"rl: the checkpoints in {ckpt_dir} belong to a run of {meta.get('num_steps')} steps, this "
                         f"one has {num_steps}: use another --out-dir")
    return model, meta["model_config"]


def build_optimizer(args, model, ckpt_dir, resume, events, rank, world_size, device):
    """MuonAdamW at init_lr_frac of the flags' learning rates. On a resume its state (and this rank's RNG states)
    come from our checkpoint `resume`."""
    import torch

    from nanochat.checkpoint import load_checkpoint
    from nanochat.common import print0
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    base_lrs = [g["initial_lr"] * args.init_lr_frac for g in optimizer.param_groups]
    if resume is not None:
        _, optim_state, _, rank_state = load_checkpoint(ckpt_dir, resume, device, rank, world_size=world_size)
        optimizer.load_state_dict(optim_state)
        del optim_state
        if rank_state is not None:  # same world size: this rank's RNG states (a cross-world resume reseeds)
            torch.set_rng_state(rank_state["torch_rng"])
            random.setstate(rank_state["python_rng"])
        print0(f"rl: resuming from step {resume} of {ckpt_dir}")
        events.log("log", message="resumed", step=resume)
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = group["initial_lr"] = lr
    return optimizer


def log_plan(args, num_steps, train_problems, eval_problems, start_step, events, world_size):
    from nanochat.common import print0
    passes = args.num_samples // args.device_batch_size
    print0(f"rl: {train_problems} train / {eval_problems} eval problems; {num_steps} steps of "
           f"{args.examples_per_step} problems x {args.num_samples} samples ({passes} passes of "
           f"{args.device_batch_size}) on {world_size} rank(s)")
    events.log("log", message="resolved", num_steps=num_steps, passes=passes,
               examples_per_rank=args.examples_per_step // world_size, start_step=start_step, args=vars(args))


# --- loop steps


def log_eval(step, results, n, events):
    """Print and log pass@k of an evaluation on n problems."""
    from nanochat.common import print0
    print0(f"step {step:05d} | " + " ".join(f"{k}: {v:.4f}" for k, v in results.items()))
    events.metric(step, **{f"eval/{k}": v for k, v in results.items()})
    for k, v in results.items():
        events.log("eval", step=step, suite="rl", task="WordProblems", metric=k, value=v, n=n)


def optimizer_step(step, model, engine, optimizer, tokenizer, train_items, args, num_steps, ddp, rank, world_size,
                   device):
    """One REINFORCE step: rollouts and policy-gradient backward on each of this rank's problems of the step, then
    one update at this step's LR. -> (LR multiplier, stats summed over ranks: reward sum, rollouts, completion
    length sum, loss sum)."""
    import torch
    import torch.distributed as dist
    lrm = lr_multiplier(step, num_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
    stats = torch.zeros(4, dtype=torch.float64, device=device)   # reward sum, rollouts, length sum, loss sum
    for idx in step_examples(step, args.examples_per_step, len(train_items), rank, world_size):
        train_on_problem(step, idx, train_items[idx], model, engine, tokenizer, args, world_size, stats, device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ddp:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return lrm, stats


def train_on_problem(step, idx, item, model, engine, tokenizer, args, world_size, stats, device):
    """num_samples rollouts of problem idx (passes of device_batch_size, seeded by rollout_seed), advantages
    r - mean(r), and the policy-gradient backward of each pass (grads accumulate); adds to stats."""
    import torch

    from nanochat.rl_data import reward
    passes = args.num_samples // args.device_batch_size
    per_rank = args.examples_per_step // world_size
    prompt = tokenizer.render_for_completion(item)
    model.eval()
    sequences, masks = [], []
    for p in range(passes):
        seqs, ms = engine.generate_batch(prompt, num_samples=args.device_batch_size, max_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k,
                                         seed=rollout_seed(step, idx, p))
        sequences += seqs
        masks += ms
    rewards = torch.tensor([reward(item, tokenizer.decode(s[len(prompt):])) for s in sequences],
                           dtype=torch.float32, device=device)
    advantages = rewards - rewards.mean()
    inputs, targets = rollout_batch(sequences, masks, tokenizer.encode_special("<|assistant_end|>"), device)
    model.train()
    for p in range(passes):
        rows = slice(p * args.device_batch_size, (p + 1) * args.device_batch_size)
        stats[3] += policy_gradient_backward(model, inputs[rows], targets[rows], advantages[rows], passes * per_rank)
    stats[0] += rewards.sum().item()
    stats[1] += len(sequences)
    stats[2] += sum(len(s) - len(prompt) for s in sequences)


def report_step(step, num_steps, stats, lrm, t0, world_size, events):
    """Print and log the step begun at time t0. -> mean reward of its rollouts (all ranks)."""
    from nanochat.common import print0
    reward = (stats[0] / stats[1]).item()
    loss = (stats[3] / world_size).item()   # each rank's loss is a mean over its examples; ranks average
    dt = time.time() - t0
    seq_len = (stats[2] / stats[1]).item()
    print0(f"step {step:05d}/{num_steps} | reward: {reward:.4f} | loss: {loss:.6f} | len: {seq_len:.1f} | "
           f"lrm: {lrm:.3f} | dt: {dt * 1000:.0f}ms")
    events.metric(step, **{"train/reward": reward, "train/loss": loss, "train/seq_len": seq_len, "train/lrm": lrm,
                           "train/dt": dt})
    return reward


def save(step, model, optimizer, model_config, source_step, num_steps, args, ckpt_dir, rank, final=False):
    """Checkpoint after `step` steps: the model, this rank's optimizer shard, its RNG states and data cursor."""
    import torch

    from nanochat.checkpoint import save_checkpoint
    step_meta = {"stage": "rl", "step": step, "num_steps": num_steps, "model_config": model_config,
                 "user_config": vars(args), "final": final,
                 "source_checkpoint": {"dir": args.checkpoint_dir, "step": source_step},
                 "max_seq_len": model_config.get("sequence_len")}
    rank_state = {"step": step, "cursor": step * args.examples_per_step, "torch_rng": torch.get_rng_state(),
                  "python_rng": random.getstate()}
    save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), step_meta, rank,
                    rank_state=rank_state)


if __name__ == "__main__":
    main()
