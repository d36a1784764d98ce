"""
Benchmark: CORE examples per second, batched (many examples per forward, nanochat.core_eval) versus one example
per forward (the reference), on the same small random-init GPT on CPU. Also checks both give the same answers.

    .venv/bin/python bench/core_eval_speed.py [--bundle DIR] [--examples 64] [--depth 2] [--batch-tokens 8192]

Without --bundle it uses synthetic tasks of each type; with a bundle (e.g. $NANORUN_HOME/eval_bundle) it uses
the first examples of hellaswag, arc_easy, winogrande and lambada_openai where present.
"""

import argparse
import random
import time

import torch

from nanochat.core_eval import load_bundle, load_items, score_examples
from nanochat.gpt import GPTConfig, build_model


class ByteTokenizer:
    def get_bos_token_id(self):
        return 256

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


def bundle_tasks(bundle, n):
    out = []
    for task in load_bundle(bundle):
        if task["label"] in ("hellaswag", "arc_easy", "winogrande", "lambada_openai") and task["available"]:
            items = load_items(task["data"])
            random.Random(1337).shuffle(items)
            out.append((task, items[:n]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--bundle", default=None)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args()
    torch.manual_seed(0)
    dim = 64 * args.depth
    config = GPTConfig(sequence_len=2048, vocab_size=257, n_layer=args.depth, n_head=max(1, dim // 64),
                       n_kv_head=max(1, dim // 64), n_embd=dim, window_pattern="L")
    model = build_model(config).eval()
    tok = ByteTokenizer()
    tasks = bundle_tasks(args.bundle, args.examples) if args.bundle else synthetic_tasks(args.examples)
    print(f"model: depth {args.depth}, n_embd {dim}, byte vocab; {args.examples} examples per task; "
          f"{torch.get_num_threads()} threads")
    print(f"{'task':<16}{'one/forward ex/s':>18}{'batched ex/s':>15}{'speedup':>10}{'same':>7}")
    with torch.no_grad():  # warm-up (first-call allocations) outside the timings
        score_examples(model, tok, tasks[0][1][:2], tasks[0][0], "cpu", batch_tokens=0)
    for meta, items in tasks:
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = score_examples(model, tok, items, meta, "cpu", batch_tokens=0)
            t1 = time.perf_counter()
            got = score_examples(model, tok, items, meta, "cpu", batch_tokens=args.batch_tokens)
            t2 = time.perf_counter()
        slow, fast = len(items) / (t1 - t0), len(items) / (t2 - t1)
        print(f"{meta['label']:<16}{slow:>18.1f}{fast:>15.1f}{fast / slow:>9.2f}x{str(ref == got):>7}")


if __name__ == "__main__":
    main()
