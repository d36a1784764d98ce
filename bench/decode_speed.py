"""
Decode speed of the inference engine (KV cache, one token per step) on CPU at the reference's d4 shape.

    .venv/bin/python bench/decode_speed.py                       # batch 1 and 8, fp32, best of 5
    .venv/bin/python bench/decode_speed.py --batch 1 --repeats 3 --new-tokens 128
    .venv/bin/python bench/decode_speed.py --profile             # torch.profiler table of one batch-1 run

The model is nanochat.gpt at depth 4 as the reference builds it (aspect 64, head_dim 128: n_embd 256, 2 heads,
vocab 32768, sequence_len 2048, SSSL windows), with random weights: decode speed does not depend on the values,
only on the shapes. Each repetition runs Engine.generate over a random 16-token prompt for --new-tokens steps with
no stop token (every row runs to the end) and times the whole call, prefill included; tok/s = batch x new tokens
/ seconds. The CPU is shared, so the best of --repeats runs is reported beside the mean, and the 1-minute load
average is printed. Reference figures (fp32, this 2-core CPU): ~180 tok/s at batch 1, ~900 tok/s at batch 8.

Decode MFU and memory bandwidth (reference 2.9 accounting, GPT.estimate_prefill_flops / estimate_decode_flops /
kv_read_bytes): one timed call does the batch-1 prefill of the prompt, then --new-tokens decode steps at contexts
P+1 .. P+N; each step reads every matmul weight once (in the compute dtype the engine casts them to) and each
row's KV cache. GFLOP/s and GB/s are those totals over the best run's seconds; MFU and MBU divide them by this
CPU's measured peaks: a dense matmul of the compute dtype (nanochat.probe.measure_matmul_peaks) and a streaming
read of a 512 MiB buffer. Batch 1 decode is bound by bandwidth (the weights are read for one token), so MBU
is the figure to watch there.
"""

import argparse
import os
import statistics
import time

import torch

from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, build_model
from nanochat.scaling import model_dims

REFERENCE_TOK_PER_SEC = {1: 180.0, 8: 900.0}


class NullTokenizer:
    """The engine's tokenizer interface with no special tokens: BOS is an id the model can never emit, so no
    row stops early and tool use is off."""

    def get_bos_token_id(self):
        return -1

    def encode_special(self, name):
        raise KeyError(name)

    def encode(self, text, prepend=None):
        return []

    def decode(self, ids):
        return ""


def build(depth, vocab_size, sequence_len, seed=0):
    d = model_dims(depth)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=d["n_layer"], n_head=d["n_head"],
                       n_kv_head=d["n_kv_head"], n_embd=d["n_embd"], window_pattern="SSSL")
    model = build_model(config, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # random values everywhere (the reference init zeroes projections)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def run_totals(model, prompt_tokens, new_tokens, batch):
    """(FLOPs, bytes moved) of one timed Engine.generate call; see the module docstring."""
    contexts = range(prompt_tokens + 1, prompt_tokens + new_tokens + 1)
    flops = model.estimate_prefill_flops(prompt_tokens) + batch * sum(model.estimate_decode_flops(c)
                                                                       for c in contexts)
    weight_bytes = model.num_matmul_params() * COMPUTE_DTYPE.itemsize
    moved = (new_tokens + 1) * weight_bytes + batch * sum(model.kv_read_bytes(c) for c in contexts)
    return flops, moved


def measure_read_bandwidth(nbytes=512 * 2 ** 20, reps=5):
    """Bytes/s of a streaming read (sum over a buffer much larger than the caches), best of `reps`."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def time_generate(engine, prompt, batch, new_tokens, temperature, top_k):
    start = time.perf_counter()
    steps = 0
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=temperature,
                             top_k=top_k, seed=1):
        steps += 1
    seconds = time.perf_counter() - start
    assert steps == new_tokens, f"generated {steps} steps, expected {new_tokens}"
    return batch * new_tokens / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one run per batch")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build(args.depth, args.vocab_size, args.sequence_len)
    engine = Engine(model, NullTokenizer())
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    c = model.config
    print(f"decode speed: depth {c.n_layer}, n_embd {c.n_embd}, heads {c.n_head}x{c.n_embd // c.n_head}, "
          f"vocab {c.vocab_size}, dtype {next(model.parameters()).dtype}, threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_tokens}, new tokens {args.new_tokens}, temperature {args.temperature}, "
          f"top_k {args.top_k}, load average {os.getloadavg()[0]:.2f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
        for batch in args.batch:
            time_generate(engine, prompt, batch, 16, args.temperature, args.top_k)   # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_generate(engine, prompt, batch, args.new_tokens, args.temperature, args.top_k)
            print(f"--- batch {batch}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    from nanochat.common import dtype_name  # noqa: PLC0415
    from nanochat.probe import measure_matmul_peaks  # noqa: PLC0415
    peak_flops = measure_matmul_peaks("cpu", [dtype_name(COMPUTE_DTYPE)])[dtype_name(COMPUTE_DTYPE)]
    peak_bandwidth = measure_read_bandwidth()
    mid = args.prompt_tokens + args.new_tokens // 2
    print(f"per decoded token at context {mid}: {model.estimate_decode_flops(mid) / 1e6:.1f} MFLOP, "
          f"weights {model.num_matmul_params() * COMPUTE_DTYPE.itemsize / 1e6:.1f} MB (read once per step), "
          f"KV {model.kv_read_bytes(mid) / 1e3:.1f} kB per row ({model.kv_bytes_per_token()} B per cached token); "
          f"measured peaks: matmul {peak_flops / 1e9:.0f} GFLOP/s, read {peak_bandwidth / 1e9:.1f} GB/s")

    print(f"{'batch':>5} {'best tok/s':>11} {'mean tok/s':>11} {'reference':>10} {'ratio':>6} "
          f"{'GFLOP/s':>8} {'MFU %':>6} {'GB/s':>6} {'MBU %':>6}")
    for batch in args.batch:
        time_generate(engine, prompt, batch, 16, args.temperature, args.top_k)   # warm-up (allocator, threads)
        runs = [time_generate(engine, prompt, batch, args.new_tokens, args.temperature, args.top_k)
                for _ in range(args.repeats)]
        best, ref = max(runs), REFERENCE_TOK_PER_SEC.get(batch)
        ratio = f"{best / ref:.2f}x" if ref else "-"
        seconds = batch * args.new_tokens / best
        flops, moved = run_totals(model, args.prompt_tokens, args.new_tokens, batch)
        print(f"{batch:>5} {best:>11.0f} {statistics.mean(runs):>11.0f} {ref or '-':>10} {ratio:>6} "
              f"{flops / seconds / 1e9:>8.1f} {100 * flops / seconds / peak_flops:>6.1f} "
              f"{moved / seconds / 1e9:>6.1f} {100 * moved / seconds / peak_bandwidth:>6.1f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
