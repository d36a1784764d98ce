"""
Benchmark: nanochat.memory's training estimate against the peak that the real base_train stage measures on CPU
(peak RSS of the whole process, result.json's peak_memory_mib), issue 11 item 3. Goal: within 15%.

    .venv/bin/python bench/memory_check.py                                  # the default sweep (~20 min on 2 cores)
    .venv/bin/python bench/memory_check.py --configs 4x2 --dtypes float32 --steps 2     # smoke test

Each configuration (DEPTHxBATCH, optionally aACCUM gradient-accumulation steps and wRANKS torchrun processes)
runs `python -m nanochat.stages.base_train` on CPU for a few steps on a generated corpus with a BPE tokenizer of
--vocab-size trained on it (built once under --work-dir, as tests/test_base_train.py builds its own).

The runtime baseline the estimate adds (nanochat.memory.CPU_RUNTIME_BYTES + CPU_INDUCTOR_BYTES) is measured first
by a worker that does what the stage does before its model exists: the imports, compute_init, the tokenizer, a
data-loader batch, the device probe (its matmul peaks cached in the work dir's NANORUN_HOME, where the stage runs
then find them), and then nanochat.loss's compiled passes (inductor; training and evaluation). Printed: that
baseline, then per configuration the estimate, the measured peak, the error, and the estimate's breakdown.
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanochat import memory, scaling  # noqa: E402  (torch-free)

MiB = 2 ** 20


def build_parser():
    p = argparse.ArgumentParser(description="nanochat.memory estimate vs measured peak RSS", allow_abbrev=False)
    a = p.add_argument
    a("--configs", default="4x8,6x8,8x8,4x2,4x16,4x8a2,4x8w2",
      help="comma-separated DEPTHxDEVICE_BATCH, optionally aACCUM (gradient accumulation steps) and wRANKS "
           "(torchrun processes, gloo): 4x8a2w2")
    a("--dtypes", default="float32,bfloat16", help="bfloat16 is skipped on a CPU without native bf16")
    a("--max-seq-len", type=int, default=512)
    a("--vocab-size", type=int, default=32768)
    a("--steps", type=int, default=4, help="optimizer steps per run (the peak RSS plateaus from the third step)")
    a("--work-dir", default=os.path.join(tempfile.gettempdir(), "nanorun-memory-check"))
    a("--baseline-worker", default=None, help=argparse.SUPPRESS)  # DTYPE: measure the runtime baseline
    return p


# -----------------------------------------------------------------------------
# A corpus and tokenizer big enough for a 32768-token BPE: made-up words over a skewed letter distribution


def build_corpus(work_dir, vocab_size):
    data_dir, tok_dir = os.path.join(work_dir, "data"), os.path.join(work_dir, f"tok{vocab_size}")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")) and os.path.isdir(data_dir):
        return data_dir, tok_dir
    from nanochat.dataset import write_parquet_shards
    from nanochat.tokenizer import train_tokenizer
    rng = random.Random(0)
    letters, weights = "etaoinshrdlcumwfgypbvkjxqz", [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3] + [2] * 6 + [1] * 7
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(60000)]

    def doc():
        return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + "."
                        for _ in range(rng.randint(2, 12)))
    docs = [doc() for _ in range(8000)]
    train_tokenizer(iter(docs), vocab_size).save(tok_dir)
    write_parquet_shards(iter(docs[:7000]), data_dir, "shard", 3500, row_group_size=250)
    write_parquet_shards(iter(docs[7000:]), data_dir, "val", 1000, row_group_size=250)
    return data_dir, tok_dir


def native_dtypes():
    from nanochat.hardware import cpu_native_dtypes
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        pass
    return cpu_native_dtypes({"device_type": "cpu", "flags": flags})


# -----------------------------------------------------------------------------
# The runtime baseline (worker process): everything base_train holds before its model


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def baseline_worker(args):
    import importlib

    import torch

    from nanochat.common import EventLog, compute_init, log_device
    from nanochat.dataloader import DataLoader
    from nanochat.loss import softcap_cross_entropy
    from nanochat.tokenizer import Tokenizer
    for name in ("nanochat.stages.base_train", "nanochat.attention", "nanochat.checkpoint", "nanochat.engine",
                 "nanochat.fp8", "nanochat.gpt", "nanochat.loss_eval", "nanochat.optim", "nanochat.core_eval"):
        importlib.import_module(name)  # what the stage imports
    data_dir, tok_dir = build_corpus(args.work_dir, args.vocab_size)
    _, _, _, _, device = compute_init("cpu")
    tokenizer = Tokenizer.from_directory(tok_dir)
    tokenizer.token_bytes()
    loader = DataLoader(data_dir, tokenizer, 8, args.max_seq_len, device=device)
    loader.next_batch()
    log_device(EventLog(os.path.join(args.work_dir, "baseline-events.jsonl")), device)  # probe (cached peaks)
    before = rss_mib()
    # one compiled loss pass at the real vocabulary (a full 256-row chunk), on tiny hidden states (C = 8)
    V = tokenizer.get_vocab_size()
    h = torch.randn(256, 8, requires_grad=True, dtype=getattr(torch, args.baseline_worker))
    w = torch.randn(V, 8, requires_grad=True)
    targets = torch.randint(0, V, (256,))
    softcap_cross_entropy(h, w, targets, V, 15.0).backward()     # the training pass
    with torch.no_grad():
        softcap_cross_entropy(h, w, targets, V, 15.0, "none")      # and the evaluation's (another kernel)
    print("RESULT " + json.dumps({"runtime_mib": before, "with_inductor_mib": rss_mib()}), flush=True)


def measure_baseline(args, dtype):
    env = {**os.environ, "NANOCHAT_DTYPE": dtype, "NANORUN_HOME": os.path.join(args.work_dir, "home")}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--baseline-worker", dtype,
                          "--work-dir", args.work_dir, "--vocab-size", str(args.vocab_size),
                          "--max-seq-len", str(args.max_seq_len)], env=env, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"baseline worker failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


# -----------------------------------------------------------------------------
# One real base_train run


def parse_config(text):
    m = re.fullmatch(r"(\d+)x(\d+)(?:a(\d+))?(?:w(\d+))?", text.strip())
    if not m:
        raise SystemExit(f"--configs: {text!r} is not DEPTHxBATCH[aACCUM][wRANKS]")
    depth, batch, accum, ranks = m.groups()
    return int(depth), int(batch), int(accum or 1), int(ranks or 1)


def run_stage(args, depth, batch, accum, ranks, dtype, data_dir, tok_dir):
    T = args.max_seq_len
    out_dir = os.path.join(args.work_dir, "runs", f"d{depth}-b{batch}a{accum}w{ranks}-{dtype}-{time.time_ns()}")
    launcher = [sys.executable, "-m", "nanochat.stages.base_train"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    "-m", "nanochat.stages.base_train"]
    cmd = launcher + [
        "--device-type", "cpu", "--dtype", dtype, "--depth", str(depth), "--max-seq-len", str(T),
        "--device-batch-size", str(batch), "--total-batch-size", str(batch * T * accum * ranks),
        "--num-iterations", str(args.steps), "--eval-tokens", str(batch * T * ranks), "--core-metric-every", "-1",
        "--sample-every", "-1", "--warmup-steps", "1", "--data-dir", data_dir, "--tokenizer-dir", tok_dir,
        "--out-dir", out_dir]
    env = {**os.environ, "NANORUN_HOME": os.path.join(args.work_dir, "home")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"base_train failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "result.json")) as f:
        peak = json.load(f)["metrics"]["peak_memory_mib"]
    shutil.rmtree(out_dir)  # its checkpoints: ~2 GB per run at d8
    return peak


def main():
    args = build_parser().parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    if args.baseline_worker:
        return baseline_worker(args)
    data_dir, tok_dir = build_corpus(args.work_dir, args.vocab_size)
    from nanochat.tokenizer import Tokenizer
    vocab_size = Tokenizer.from_directory(tok_dir).get_vocab_size()
    dtypes = [d for d in args.dtypes.split(",") if d == "float32" or d in native_dtypes()]

    print(f"runtime baseline (peak RSS before the model; constants in nanochat.memory: "
          f"{memory.CPU_RUNTIME_BYTES / MiB:.0f} + inductor {memory.CPU_INDUCTOR_BYTES / MiB:.0f} MiB):")
    for dtype in dtypes:
        b = measure_baseline(args, dtype)
        print(f"  {dtype}: {b['runtime_mib']:.0f} MiB, after one compiled loss pass {b['with_inductor_mib']:.0f} MiB "
              f"(+{b['with_inductor_mib'] - b['runtime_mib']:.0f})")

    rows = []
    for config in args.configs.split(","):
        depth, batch, accum, ranks = parse_config(config)
        for dtype in dtypes:
            derived = scaling.resolve_training(depth, vocab_size=vocab_size, max_seq_len=args.max_seq_len,
                                               num_iterations=args.steps, device_batch_size=batch,
                                               total_batch_size=batch * args.max_seq_len * accum * ranks,
                                               world_size=ranks)
            est = memory.estimate_training_memory(derived, device_batch_size=batch, dtype=dtype, world_size=ranks,
                                                  device_type="cpu", attention_backend="sdpa")
            measured = run_stage(args, depth, batch, accum, ranks, dtype, data_dir, tok_dir)
            estimate = est["per_device_bytes"] / MiB
            err = 100 * (estimate - measured) / measured
            rows.append((depth, dtype, batch, accum, ranks, estimate, measured, err, est))
            print(f"d{depth} {dtype} batch {batch} accum {accum} ranks {ranks}: estimate {estimate:,.0f} MiB, "
                  f"measured {measured:,.0f} MiB ({err:+.1f}%), peak at {est['peak_at']}", flush=True)

    print(f"\nseq {args.max_seq_len}, vocab {vocab_size}, {args.steps} steps, SSSL windows (SDPA), world size 1")
    print("| depth | dtype | device batch | accum | ranks | estimate MiB | measured MiB | error % | peak at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth, dtype, batch, accum, ranks, estimate, measured, err, est in rows:
        print(f"| {depth} | {dtype} | {batch} | {accum} | {ranks} | {estimate:,.0f} | {measured:,.0f} | {err:+.1f} "
              f"| {est['peak_at']} |")
    keys = list(rows[0][-1]["breakdown"])
    print("\nbreakdown of the estimate (MiB):")
    print("| depth | dtype | batch | accum | ranks | " + " | ".join(keys) + " |")
    print("|---|---|---|---|---|" + "---|" * len(keys))
    for depth, dtype, batch, accum, ranks, *_, est in rows:
        print(f"| {depth} | {dtype} | {batch} | {accum} | {ranks} | "
              + " | ".join(f"{est['breakdown'][k] / MiB:,.0f}" for k in keys) + " |")
    worst = max(abs(r[7]) for r in rows)
    print(f"\nworst error {worst:.1f}% ({'within' if worst <= 15 else 'OUTSIDE'} the 15% goal)")


if __name__ == "__main__":
    main()
