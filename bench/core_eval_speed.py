"""
Benchmark: CORE examples per second, nanochat.core_eval's fast scoring (packed rows, a multiple-choice example's
shared prefix run once against a KV cache, the vocabulary head only at scored positions) versus the reference
method (one example per forward with full logits: score_examples(batch_tokens=0)), on the same random GPT on CPU.
Checks that both give the same answer on every example.

    .venv/bin/python bench/core_eval_speed.py --bundle $NANORUN_HOME/eval_bundle --tokenizer-dir TOK \
        [--depth 4] [--examples 16] [--repeats 3] [--tasks hellaswag,arc_easy] [--batch-tokens 8192]

The model is the real GPT at --depth with the reference's dims (nanochat.scaling.model_dims: head_dim 128,
window pattern SSSL, sequence_len 2048) and the tokenizer's vocabulary (a 32768 BPE for the reference shape),
random weights perturbed so answers are not ties. Without --tokenizer-dir a byte tokenizer (vocab 257) is used;
without --bundle, synthetic tasks of each type. The two methods run alternately --repeats times per task and
the best time of each is kept (the CPU may be shared). Examples are the first --examples after the bundle's
shuffle (random.Random(1337)), as evaluate_core takes them.
"""

import argparse
import os
import random
import time

import torch

from nanochat.core_eval import load_bundle, load_items, score_examples
from nanochat.gpt import GPTConfig, build_model
from nanochat.scaling import model_dims


class ByteTokenizer:
    def get_bos_token_id(self):
        return 256

    def get_vocab_size(self):
        return 257

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))


def synthetic_tasks(n):
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree quickly slowly and then".split()

    def phrase(k):
        return " ".join(rng.choice(words) for _ in range(k))
    return [
        ({"label": "mc", "type": "multiple_choice", "shots": 3, "delimiter": " "},
         [{"query": phrase(12), "choices": [phrase(5) for _ in range(4)], "gold": 0} for _ in range(n)]),
        ({"label": "schema", "type": "schema", "shots": 0, "delimiter": " "},
         [{"context_options": [phrase(8), phrase(8)], "continuation": phrase(6), "gold": 1} for _ in range(n)]),
        ({"label": "lm", "type": "language_modeling", "shots": 5, "delimiter": " "},
         [{"context": phrase(15), "continuation": phrase(2)} for _ in range(n)]),
    ]


def bundle_tasks(bundle, n, labels=None):
    out = []
    for task in load_bundle(bundle):
        if task["available"] and (not labels or task["label"] in labels):
            items = load_items(task["data"])
            random.Random(1337).shuffle(items)
            out.append((task, items[:n]))
    return out


def build(depth, vocab_size):
    torch.manual_seed(0)
    d = model_dims(depth)
    config = GPTConfig(sequence_len=2048, vocab_size=vocab_size, n_layer=depth, n_head=d["n_head"],
                       n_kv_head=d["n_kv_head"], n_embd=d["n_embd"], window_pattern="SSSL")
    model = build_model(config)
    with torch.no_grad():  # init zeroes the block outputs and makes tiny logits: perturb, so answers are not ties
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--bundle", default=None)
    p.add_argument("--tokenizer-dir", default=None, help="a nanorun tokenizer dir (default: bytes)")
    p.add_argument("--examples", type=int, default=16, help="examples per task")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per method; the best is kept")
    p.add_argument("--tasks", default="", help="comma list of bundle labels (default: every available task)")
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args()
    if args.tokenizer_dir:
        from nanochat.tokenizer import Tokenizer
        tok = Tokenizer.from_directory(args.tokenizer_dir)
    else:
        tok = ByteTokenizer()
    model = build(args.depth, tok.get_vocab_size())
    labels = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = bundle_tasks(args.bundle, args.examples, labels) if args.bundle else synthetic_tasks(args.examples)
    d = model_dims(args.depth)
    print(f"model: depth {args.depth}, n_embd {d['n_embd']}, head_dim {d['head_dim']}, vocab "
          f"{tok.get_vocab_size()}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
          f"{args.examples} examples per task; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'task':<34}{'type':<8}{'reference ex/s':>15}{'fast ex/s':>11}{'speedup':>9}{'same':>6}")
    score_examples(model, tok, tasks[0][1][:2], tasks[0][0], "cpu", batch_tokens=0)  # warm-up allocations
    score_examples(model, tok, tasks[0][1][:2], tasks[0][0], "cpu", batch_tokens=args.batch_tokens)
    total_ref = total_fast = 0.0
    n_total, all_same = 0, True
    for meta, items in tasks:
        best_ref = best_fast = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = score_examples(model, tok, items, meta, "cpu", batch_tokens=0)
            t1 = time.perf_counter()
            got = score_examples(model, tok, items, meta, "cpu", batch_tokens=args.batch_tokens)
            t2 = time.perf_counter()
            best_ref, best_fast = min(best_ref, t1 - t0), min(best_fast, t2 - t1)
        same = ref == got
        all_same &= same
        total_ref, total_fast, n_total = total_ref + best_ref, total_fast + best_fast, n_total + len(items)
        print(f"{meta['label']:<34}{meta['type'][:6]:<8}{len(items) / best_ref:>15.2f}{len(items) / best_fast:>11.2f}"
              f"{best_ref / best_fast:>8.2f}x{str(same):>6}", flush=True)
    print(f"{'all tasks':<34}{'':<8}{n_total / total_ref:>15.2f}{n_total / total_fast:>11.2f}"
          f"{total_ref / total_fast:>8.2f}x{str(all_same):>6}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
