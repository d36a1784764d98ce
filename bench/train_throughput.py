"""
Benchmark: pretraining throughput (tokens/s) and MFU of the real model + MuonAdamW step, at the reference's
benchmark shape: depth 4/6/8 (plus 12/20 when CUDA is present), seq 512, device batch 8, head_dim 128,
vocab 32768, for float32 and bfloat16. Random token batches (no data loader), but every timed step is the full
forward + backward + optimizer step of nanochat.stages.base_train (same model, same optimizer groups).

    .venv/bin/python bench/train_throughput.py                          # full sweep (minutes on CPU)
    .venv/bin/python bench/train_throughput.py --depths 4 --steps 3     # smoke test
    .venv/bin/python bench/train_throughput.py --compile --threads 2 --dtypes bfloat16 --window-pattern L

MFU = flops_per_token * tok/s / peak. Peak on CPU: the measured dense matmul peak the training stage uses
(nanochat.hardware.mfu_peak_flops over nanochat.probe's cached measurement, so MFU reads "fraction of what a plain
matmul gets here"); on CUDA: the BF16 table value
(nanochat.hardware.get_peak_flops), as the reference always reports. NANOCHAT_DTYPE is read once when
nanochat.common is first imported, so each (depth, dtype) runs in a fresh subprocess of this script
(--worker); the parent collects one JSON line from each and prints a table plus rows for bench/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

RESULT_PREFIX = "RESULT "  # the worker's one machine-readable stdout line


def build_parser():
    p = argparse.ArgumentParser(description="nanorun pretraining throughput / MFU benchmark", allow_abbrev=False)
    a = p.add_argument
    a("--depths", default=None, help="comma-separated depths (default 4,6,8; plus 12,20 on CUDA)")
    a("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes (NANOCHAT_DTYPE)")
    a("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    a("--warmup", type=int, default=2, help="untimed steps first (compile, allocator, caches)")
    a("--compile", action="store_true", help="torch.compile the model (dynamic=False, as base_train)")
    a("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0 = torch default)")
    a("--device-type", default="", help="cuda|cpu ('' = cuda when available)")
    a("--max-seq-len", type=int, default=512)
    a("--device-batch-size", type=int, default=8)
    a("--head-dim", type=int, default=128)
    a("--vocab-size", type=int, default=32768)
    a("--window-pattern", default="SSSL", help="reference default; L = full attention in every layer")
    a("--plain-loss", action="store_true", help="full-logits loss (as the reference) instead of nanochat.loss chunks")
    a("--compile-optimizer", action="store_true", help="torch.compile the Muon/AdamW math")
    a("--fp8", default="", choices=["", "tensorwise", "rowwise"], help="torchao FP8 training recipe (CUDA, sm89+)")
    a("--worker", default=None, help=argparse.SUPPRESS)  # "DEPTH": run one configuration, print RESULT json
    return p


# -----------------------------------------------------------------------------
# Worker: one (depth, dtype) in this process; the dtype came in through NANOCHAT_DTYPE


def run_one(args, depth):
    import gc

    import torch

    from nanochat import scaling
    from nanochat.attention import BACKEND
    from nanochat.common import (COMPUTE_DTYPE, autodetect_device_type, device_caps, dtype_name, keep_freed_memory,
                                 synchronize)
    from nanochat.hardware import mfu_peak_flops
    from nanochat.gpt import GPTConfig, build_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cpu":
        keep_freed_memory()  # as base_train's compute_init (NANOCHAT_KEEP_MEMORY=0 measures without it)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(42)
    B, T = args.device_batch_size, args.max_seq_len
    # the optimizer hyperparameters base_train would use for this depth at one micro-step per step
    r = scaling.resolve_training(depth, vocab_size=args.vocab_size, head_dim=args.head_dim, max_seq_len=T,
                                 window_pattern=args.window_pattern, num_iterations=1000, device_batch_size=B,
                                 total_batch_size=B * T)
    config = GPTConfig(sequence_len=T, vocab_size=args.vocab_size, n_layer=r["n_layer"], n_head=r["n_head"],
                       n_kv_head=r["n_kv_head"], n_embd=r["n_embd"], window_pattern=args.window_pattern)
    orig_model = build_model(config, device)
    orig_model.chunked_loss = not args.plain_loss
    if args.fp8:
        from nanochat.fp8 import convert_to_fp8
        convert_to_fp8(orig_model, args.fp8)
    flops_per_token = orig_model.estimate_flops()  # counts Float8Linear too: FP8 does not change the FLOPs
    params = orig_model.num_scaling_params()["total"]
    model = torch.compile(orig_model, dynamic=False) if args.compile else orig_model
    optimizer = orig_model.setup_optimizer(
        unembedding_lr=r["unembedding_lr"], embedding_lr=r["embedding_lr"], matrix_lr=r["matrix_lr"],
        weight_decay=r["weight_decay_scaled"], scalar_lr=r["scalar_lr"])
    optimizer.compile = args.compile_optimizer

    peak, _ = mfu_peak_flops(device_caps(device), dtype_name(COMPUTE_DTYPE))

    # a few random (B, T+1) token buffers, cycled; inputs/targets are shifted views as in the data loader
    bufs = [torch.randint(0, args.vocab_size, (B, T + 1), device=device) for _ in range(4)]
    times = []
    for step in range(args.warmup + args.steps):
        buf = bufs[step % len(bufs)]
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        synchronize(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_f = loss.item()  # base_train reads the loss every step too (a device sync)
        synchronize(device)
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
        print(f"  d{depth} {COMPUTE_DTYPE} step {step}{' (warmup)' if step < args.warmup else ''}: "
              f"{dt * 1000:.0f} ms, loss {loss_f:.3f}", file=sys.stderr, flush=True)
        if step == 0:  # as base_train: no GC pauses inside the timed steps
            gc.collect()
            gc.freeze()
            gc.disable()
    gc.enable()

    dt = sum(times) / len(times)
    tok_per_sec = B * T / dt
    result = {
        "depth": depth, "dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "compile": bool(args.compile),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "loss": "plain" if args.plain_loss else "chunked", "compile_optimizer": bool(args.compile_optimizer),
        "fp8": args.fp8 or None,
        "threads": torch.get_num_threads(), "attention_backend": BACKEND, "n_embd": r["n_embd"],
        "params": params, "flops_per_token": flops_per_token, "tokens_per_step": B * T,
        "s_per_step": dt, "s_per_step_min": min(times), "tok_per_sec": tok_per_sec,
        "peak_flops": peak, "mfu": 100 * flops_per_token * tok_per_sec / peak, "timed_steps": len(times),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# Parent: one subprocess per configuration, then the table


def cuda_present():
    import torch  # only to ask; the workers do the real work
    return torch.cuda.is_available()


def worker_command(args, depth):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(depth), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--max-seq-len", str(args.max_seq_len),
           "--device-batch-size", str(args.device_batch_size), "--head-dim", str(args.head_dim),
           "--vocab-size", str(args.vocab_size), "--window-pattern", args.window_pattern]
    if args.device_type:
        cmd += ["--device-type", args.device_type]
    for flag in ("compile", "plain_loss", "compile_optimizer"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.fp8:
        cmd += ["--fp8", args.fp8]
    return cmd


def run_sweep(args, depths, dtypes):
    results = []
    for depth in depths:
        for dtype in dtypes:
            env = {**os.environ, "NANOCHAT_DTYPE": dtype}
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # a plain single-process run, even under torchrun
                env.pop(k, None)
            print(f"d{depth} {dtype}{' compiled' if args.compile else ''} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(worker_command(args, depth), env=env, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
            if proc.returncode != 0 or not lines:  # e.g. out of memory at d20 fp32: keep going, show the gap
                print(f"d{depth} {dtype}: worker failed (exit {proc.returncode})", file=sys.stderr, flush=True)
                results.append({"depth": depth, "dtype": dtype, "compile": bool(args.compile), "error": True})
                continue
            results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    return results


def print_report(args, results):
    header = f"{'depth':>5}  {'dtype':<9} {'compile':<7} {'tok/s':>10} {'MFU%':>7} {'peak GFLOP/s':>13}  {'s/step':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("error"):
            print(f"{r['depth']:>5}  {r['dtype']:<9} {str(r['compile']):<7} {'failed':>10}")
            continue
        print(f"{r['depth']:>5}  {r['dtype']:<9} {str(r['compile']):<7} {r['tok_per_sec']:>10,.0f} "
              f"{r['mfu']:>7.2f} {r['peak_flops'] / 1e9:>13,.0f}  {r['s_per_step']:>7.3f}")

    ok = [r for r in results if not r.get("error")]
    device = ok[0]["device"] if ok else "?"
    threads = ok[0]["threads"] if ok else "?"
    date = datetime.date.today().isoformat()
    flags = " ".join(["bench/train_throughput.py", *sys.argv[1:]])
    print(f"\nfor bench/RESULTS.md ({device}, {platform.machine()}, {os.cpu_count()} cores, {threads} threads, "
          f"{date}, `{flags}`, seq {args.max_seq_len}, batch "
          f"{args.device_batch_size}, head_dim {args.head_dim}, vocab {args.vocab_size}, window "
          f"{args.window_pattern}, {args.steps} timed steps after {args.warmup} warmup):\n")
    print("| depth | dtype | compile | tok/s | MFU % | peak GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r.get("error"):
            print(f"| {r['depth']} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | failed | | |")
        else:
            print(f"| {r['depth']} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | {r['tok_per_sec']:,.0f} "
                  f"| {r['mfu']:.2f} | {r['peak_flops'] / 1e9:,.0f} |")
    line = "; ".join(f"d{r['depth']} {r['dtype']}: " + ("failed" if r.get("error") else
                     f"{r['tok_per_sec']:,.0f} tok/s, MFU {r['mfu']:.2f}%") for r in results)
    print(f"\none line: {device}, compile={'yes' if args.compile else 'no'}, {date}: {line}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.worker is not None:
        run_one(args, int(args.worker))
        return
    on_cuda = args.device_type == "cuda" or (args.device_type == "" and cuda_present())
    if args.depths:
        depths = [int(d) for d in args.depths.split(",") if d.strip()]
    else:
        depths = [4, 6, 8] + ([12, 20] if on_cuda else [])
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise SystemExit(f"--dtypes: unknown {bad}; expected float32, bfloat16 or float16")
    results = run_sweep(args, depths, dtypes)
    print_report(args, results)
    if any(r.get("error") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
