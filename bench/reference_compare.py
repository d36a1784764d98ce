"""
Side by side with the reference: nanochat's own scripts.base_train (from a checkout given by path; nothing of it
is copied here) and nanorun's base_train stage, on the same parquet files, tokenizer and flags. Prints the val bpb
curves of both, then per step what each loader fed the model (tokens, documents, fraction of tokens that start a
document, whether the rows are identical) and the LR multiplier / Muon momentum / Muon weight decay schedules.

    .venv/bin/python bench/reference_compare.py --ref /work/ref --ref-python /work/refvenv/bin/python \
        --data-dir DATA --tokenizer-dir TOK --work /tmp/cmp --seeds 42,1,2      # the issue-16 demo shape, fp32
    .venv/bin/python bench/reference_compare.py ... --no-train                    # loader + schedules only (~1 min)
    .venv/bin/python bench/reference_compare.py ... --reuse                       # keep finished runs in WORK
    .venv/bin/python bench/reference_compare.py ... --depth 6 --lrs reference --num-iterations 400

DATA: a folder of parquet files with a `text` column, sorted by name, the last one the val shard (what both
loaders expect). TOK: a nanorun tokenizer directory; the reference gets the same vocabulary as the tiktoken pickle
it loads. The reference needs its own environment (--ref-python: torch, tiktoken, rustbpe, wandb, filelock, jinja2,
pyyaml, pyarrow, requests). Training runs are CPU-heavy: run this under `nice` and one at a time.
The reference's schedule functions are read from its scripts/base_train.py (ast) and evaluated here, beside ours.
"""

import argparse
import ast
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the demo's pretraining shape (specs/cpu_demo.yaml) and the reference's own base LRs
DEMO_LRS = {"matrix_lr": 0.08, "embedding_lr": 1.2, "unembedding_lr": 0.032, "scalar_lr": 2.0}
REFERENCE_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}
SCHEDULE_FUNCTIONS = ("get_lr_multiplier", "get_muon_momentum", "get_weight_decay")

# runs in the reference's interpreter with cwd = the checkout: its loader, one JSON line of rows per step
REF_LOADER_SCRIPT = """
import json, sys
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit as loader
from nanochat.tokenizer import get_tokenizer
split, B, T, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
batches = loader(get_tokenizer(), B, T, split, device="cpu")
for _ in range(steps):
    x, y = next(batches)
    print(json.dumps([xr + [yr[-1]] for xr, yr in zip(x.tolist(), y.tolist())]))
"""


def build_parser():
    p = argparse.ArgumentParser(description="nanorun vs the reference nanochat, side by side", allow_abbrev=False)
    a = p.add_argument
    a("--ref", required=True, help="path of a nanochat checkout (e.g. commit 92d63d4)")
    a("--ref-python", default=sys.executable, help="python of an environment with the reference's dependencies")
    a("--data-dir", required=True, help="folder of parquet shards, last = val")
    a("--tokenizer-dir", required=True, help="nanorun tokenizer directory (tokenizer.pkl, token_bytes.pt)")
    a("--work", required=True, help="scratch directory: the reference's base dir, run outputs, logs")
    a("--seeds", default="42", help="nanorun seeds, comma-separated (the reference always seeds 42)")
    a("--depth", type=int, default=4)
    a("--head-dim", type=int, default=64)
    a("--max-seq-len", type=int, default=512)
    a("--window-pattern", default="L")
    a("--device-batch-size", type=int, default=16)
    a("--total-batch-size", type=int, default=8192)
    a("--num-iterations", type=int, default=250)
    a("--warmup-steps", type=int, default=10)
    a("--warmdown-ratio", type=float, default=0.65)
    a("--final-lr-frac", type=float, default=0.05)
    a("--weight-decay", type=float, default=0.28)
    a("--lrs", choices=["demo", "reference"], default="demo", help="demo: 4x the reference base LRs (cpu_demo)")
    a("--eval-every", type=int, default=50)
    a("--eval-tokens", type=int, default=65536)
    a("--dtype", default="float32", help="compute dtype of both sides (NANOCHAT_DTYPE)")
    a("--loader-steps", type=int, default=None, help="steps of fed data to compare (default: num_iterations)")
    a("--nanorun-compile", choices=["auto", "0", "1"], default="auto",
      help="nanorun's --compile: auto = its default (eager on CPU in fp32, compiled in bf16 from 200 steps; "
           "the reference always compiles)")
    a("--no-train", action="store_true", help="only compare the loaders and schedules")
    a("--reuse", action="store_true", help="keep any run whose log in WORK already reached the last eval")
    return p


def train_flags(args):
    lrs = DEMO_LRS if args.lrs == "demo" else REFERENCE_LRS
    flags = {"depth": args.depth, "head-dim": args.head_dim, "max-seq-len": args.max_seq_len,
             "window-pattern": args.window_pattern, "device-batch-size": args.device_batch_size,
             "total-batch-size": args.total_batch_size, "num-iterations": args.num_iterations,
             "warmup-steps": args.warmup_steps, "warmdown-ratio": args.warmdown_ratio,
             "final-lr-frac": args.final_lr_frac, "weight-decay": args.weight_decay,
             "eval-every": args.eval_every, "eval-tokens": args.eval_tokens, "core-metric-every": -1,
             "sample-every": -1, "save-every": -1, "device-type": "cpu",
             **{k.replace("_", "-"): v for k, v in lrs.items()}}
    return [f"--{k}={v}" for k, v in flags.items()]


# -----------------------------------------------------------------------------
# The reference's base dir: the same parquet files (linked) and the same vocabulary as a tiktoken pickle


def prepare_ref_base(args):
    import tiktoken
    base = os.path.join(args.work, "ref_base")
    data = os.path.join(base, "base_data_climbmix")
    tok = os.path.join(base, "tokenizer")
    os.makedirs(data, exist_ok=True)
    os.makedirs(tok, exist_ok=True)
    for name in sorted(os.listdir(data)):
        os.remove(os.path.join(data, name))
    for name in sorted(f for f in os.listdir(args.data_dir) if f.endswith(".parquet")):
        os.symlink(os.path.abspath(os.path.join(args.data_dir, name)), os.path.join(data, name))
    with open(os.path.join(args.tokenizer_dir, "tokenizer.pkl"), "rb") as f:
        payload = pickle.load(f)
    n = len(payload["mergeable_ranks"])
    enc = tiktoken.Encoding(name="rustbpe", pat_str=payload["pattern"], mergeable_ranks=payload["mergeable_ranks"],
                            special_tokens={s: n + i for i, s in enumerate(payload["special_tokens"])})
    with open(os.path.join(tok, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    with open(os.path.join(args.tokenizer_dir, "token_bytes.pt"), "rb") as src, \
            open(os.path.join(tok, "token_bytes.pt"), "wb") as dst:
        dst.write(src.read())
    return base


def ref_env(args, base):
    return {**os.environ, "NANOCHAT_BASE_DIR": base, "NANOCHAT_DTYPE": args.dtype, "PYTHONPATH": args.ref,
            "WANDB_MODE": "disabled"}


# -----------------------------------------------------------------------------
# What each loader fed the model


def ref_rows(args, base, split, steps):
    proc = subprocess.run([args.ref_python, "-c", REF_LOADER_SCRIPT, split, str(args.device_batch_size),
                           str(args.max_seq_len), str(steps)], cwd=args.ref, env=ref_env(args, base),
                          capture_output=True, text=True, check=True)
    return np.array([json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")])


def nanorun_rows(args, split, steps):
    from nanochat.dataloader import DataLoader
    from nanochat.tokenizer import Tokenizer
    loader = DataLoader(args.data_dir, Tokenizer.from_directory(args.tokenizer_dir), args.device_batch_size,
                        args.max_seq_len, split=split)
    out = []
    for _ in range(steps):
        x, y = loader.next_batch()
        out.append(np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1))
    return np.stack(out)


def packing_stats(rows, bos):
    """Per step: tokens fed (B*(T+1)), documents (BOS count), fraction of tokens that start a document."""
    starts = (rows == bos).sum(axis=(1, 2))
    tokens = rows.shape[1] * rows.shape[2]
    return [{"tokens": tokens, "docs": int(d), "start_frac": d / tokens} for d in starts]


def compare_loaders(args, base):
    from nanochat.tokenizer import Tokenizer
    bos = Tokenizer.from_directory(args.tokenizer_dir).get_bos_token_id()
    steps = args.loader_steps or args.num_iterations
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len))
    for split, n in (("val", eval_steps), ("train", steps)):
        ref, ours = ref_rows(args, base, split, n), nanorun_rows(args, split, n)
        rs, ns = packing_stats(ref, bos), packing_stats(ours, bos)
        same = [bool(np.array_equal(a, b)) for a, b in zip(ref, ours)]
        print(f"\n== fed data, {split}: {sum(same)}/{n} steps identical"
              f" | docs/step ref {np.mean([s['docs'] for s in rs]):.2f} nanorun {np.mean([s['docs'] for s in ns]):.2f}"
              f" | doc-start fraction ref {np.mean([s['start_frac'] for s in rs]):.5f}"
              f" nanorun {np.mean([s['start_frac'] for s in ns]):.5f}")
        print(f"{'step':>5} {'tok ref':>8} {'tok nr':>8} {'docs ref':>8} {'docs nr':>8} {'start% ref':>10} "
              f"{'start% nr':>10} same")
        for i, (r, o) in enumerate(zip(rs, ns)):
            if i < 10 or i % 25 == 0 or i == n - 1 or not same[i]:
                print(f"{i:5d} {r['tokens']:8d} {o['tokens']:8d} {r['docs']:8d} {o['docs']:8d} "
                      f"{100 * r['start_frac']:10.3f} {100 * o['start_frac']:10.3f} {'yes' if same[i] else 'NO'}")


# -----------------------------------------------------------------------------
# Schedules: the reference's functions (read from its script) beside ours


def reference_schedules(args, weight_decay_scaled):
    source = open(os.path.join(args.ref, "scripts", "base_train.py")).read()
    tree = ast.parse(source)
    funcs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in SCHEDULE_FUNCTIONS]
    namespace = {"math": math, "num_iterations": args.num_iterations, "weight_decay_scaled": weight_decay_scaled,
                 "args": types.SimpleNamespace(warmup_steps=args.warmup_steps, warmdown_ratio=args.warmdown_ratio,
                                               final_lr_frac=args.final_lr_frac)}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "reference:scripts/base_train.py", "exec"), namespace)
    return [namespace[name] for name in SCHEDULE_FUNCTIONS]


def compare_schedules(args):
    from nanochat import scaling
    from nanochat.stages.base_train import lr_multiplier, muon_momentum, muon_weight_decay
    from nanochat.tokenizer import Tokenizer
    vocab = Tokenizer.from_directory(args.tokenizer_dir).get_vocab_size()
    r = scaling.resolve_training(args.depth, vocab_size=vocab, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                                 window_pattern=args.window_pattern, num_iterations=args.num_iterations,
                                 device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                                 weight_decay=args.weight_decay)
    wd, N = r["weight_decay_scaled"], args.num_iterations
    ref_lr, ref_mom, ref_wd = reference_schedules(args, wd)
    ours = [lambda it: lr_multiplier(it, N, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac),
            lambda it: muon_momentum(it, N, args.warmdown_ratio), lambda it: muon_weight_decay(it, N, wd)]
    print(f"\n== schedules (N={N}, weight decay after scaling {wd:.6f})")
    print(f"{'step':>5} {'lrm ref':>9} {'lrm nr':>9} {'mom ref':>9} {'mom nr':>9} {'wd ref':>9} {'wd nr':>9}")
    worst = [0.0, 0.0, 0.0]
    for it in range(N):
        pairs = [(f(it), g(it)) for f, g in zip((ref_lr, ref_mom, ref_wd), ours)]
        worst = [max(w, abs(a - b)) for w, (a, b) in zip(worst, pairs)]
        if it < 12 or it % 25 == 0 or it == N - 1:
            print(f"{it:5d} " + " ".join(f"{a:9.6f} {b:9.6f}" for a, b in pairs))
    print(f"max |difference| over all steps: lrm {worst[0]:.2e}, momentum {worst[1]:.2e}, weight decay {worst[2]:.2e}")


# -----------------------------------------------------------------------------
# Training runs and their val bpb curves


def run_logged(cmd, cwd, env, log_path):
    print(f"$ {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed with exit code {proc.returncode}; see {log_path}")


def val_curve(log_path):
    """{step: val bpb} from either side's console log."""
    pattern = re.compile(r"step (\d+) \| (?:Validation bpb|val bpb): ([0-9.]+)", re.IGNORECASE)
    with open(log_path) as f:
        return {int(m.group(1)): float(m.group(2)) for m in pattern.finditer(f.read())}


def finished(args, log_path):
    return args.reuse and os.path.exists(log_path) and args.num_iterations in val_curve(log_path)


def train_both(args, base):
    ref_log = os.path.join(args.work, "ref_train.log")
    if not finished(args, ref_log):
        run_logged([args.ref_python, "-m", "scripts.base_train", *train_flags(args), "--model-tag=compare"],
                   args.ref, ref_env(args, base), ref_log)
    curves = {"ref": val_curve(ref_log)}
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = os.path.join(args.work, f"nanorun_seed{seed}")
        log = out + ".log"
        if not finished(args, log):
            shutil.rmtree(out, ignore_errors=True)  # a fresh run refuses a directory holding checkpoints
            compile_flag = [] if args.nanorun_compile == "auto" else [f"--compile={args.nanorun_compile}"]
            cmd = [sys.executable, "-m", "nanochat.stages.base_train", *train_flags(args), *compile_flag,
                   f"--dtype={args.dtype}", f"--data-dir={args.data_dir}", f"--tokenizer-dir={args.tokenizer_dir}",
                   f"--out-dir={out}", f"--seed={seed}"]
            run_logged(cmd, ROOT, {**os.environ, "PYTHONPATH": ROOT}, log)
        curves[f"seed {seed}"] = val_curve(log)
    return curves


def print_curves(curves):
    names = [n for n in curves if n != "ref"]
    steps = sorted(curves["ref"])
    print("\n== val bpb by step")
    print(f"{'step':>5} {'ref':>8} " + " ".join(f"{n:>9}" for n in names) + f" {'mean':>8} {'mean-ref':>9}")
    for s in steps:
        vals = [curves[n].get(s, float("nan")) for n in names]
        mean = float(np.mean(vals))
        print(f"{s:5d} {curves['ref'][s]:8.4f} " + " ".join(f"{v:9.4f}" for v in vals)
              + f" {mean:8.4f} {mean - curves['ref'][s]:+9.4f}")
    if len(names) > 1:
        last = steps[-1]
        finals = [curves[n][last] for n in names]
        print(f"final: nanorun mean {np.mean(finals):.4f} std {np.std(finals, ddof=1):.4f} "
              f"over {len(finals)} seeds, reference {curves['ref'][last]:.4f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    os.environ["NANOCHAT_DTYPE"] = args.dtype
    base = prepare_ref_base(args)
    compare_schedules(args)
    compare_loaders(args, base)
    if not args.no_train:
        print_curves(train_both(args, base))


if __name__ == "__main__":
    main()
