"""
Base-model evaluation stage (reference/nanochat.md sections 8, 9.3): CORE over the eval bundle, train/val bits
per byte, and greedy samples of the reference prompts, for one checkpoint.

    python -m nanochat.stages.base_eval --checkpoint-dir RUN/checkpoints --tokenizer-dir TOK --data-dir DATA \
        --out-dir OUT [--eval core,bpb,sample] [--step N] [--max-per-task -1] [--bundle-source offline|download]
    torchrun --standalone --nproc_per_node=2 -m nanochat.stages.base_eval --config config.json

--config FILE is a JSON object keyed by argparse dest names (flags given explicitly win). When the bundle dir has
no bundle, rank 0 builds it from packaged benchmark data (offline, the default) or downloads the reference zip.
Outputs in --out-dir: events.jsonl, core_{step:06d}.csv, result.json (written last).
"""

import argparse
import os
import sys
import time


def build_parser():
    p = argparse.ArgumentParser(description="nanorun base-model evaluation stage", allow_abbrev=False)
    a = p.add_argument
    a("--config", default=None, help="JSON file of defaults keyed by argparse dest names")
    a("--checkpoint-dir", default=None, help="directory with model_{step:06d}.pt + meta_{step:06d}.json")
    a("--tokenizer-dir", default=None)
    a("--data-dir", default=None, help="data stage directory (needed for bpb)")
    a("--out-dir", default=None)
    a("--eval", default="core,bpb,sample", help="comma list of core, bpb, sample")
    a("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    a("--max-per-task", type=int, default=-1, help="examples per CORE task (-1 = all)")
    a("--device-batch-size", type=int, default=32, help="rows per bpb batch; CORE packs this many sequences' tokens")
    a("--split-tokens", type=int, default=40 * 524288, help="tokens per split for train/val bpb")
    a("--device-type", default="", help="cuda|cpu|mps ('' = autodetect)")
    a("--bundle-dir", default=None, help="CORE bundle (default $NANORUN_HOME/eval_bundle)")
    a("--bundle-source", default="offline", choices=["offline", "download"])
    a("--packages-dir", default=None, help="benchmark packages for the offline build (default $NANORUN_HOME/packages)")
    a("--include-bigbench", action=argparse.BooleanOptionalAction, default=False,
      help="offline build: also convert the 6 BIG-bench tasks (358 MB sdist)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    from nanochat.stage_args import parse_args_with_config
    args = parse_args_with_config(parser, argv, required=("checkpoint_dir", "tokenizer_dir", "out_dir"))
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    bad = sorted(set(args.evals) - {"core", "bpb", "sample"})
    if bad:
        parser.error(f"--eval: unknown {bad} (choose from core, bpb, sample)")
    if "bpb" in args.evals and not args.data_dir:
        parser.error("--data-dir is required for --eval bpb (or 'data_dir' in --config)")
    return args


def fail(message):
    print(f"base_eval: error: {message}", file=sys.stderr)
    sys.exit(2)


def ensure_bundle(bundle_dir, source, packages_dir, include_bigbench):
    """Build or download the bundle when bundle_dir has none (call on rank 0 only). A downloaded bundle
    (core.yaml without our manifest) is kept as is; an offline one is rebuilt only to add BIG-bench."""
    from nanochat.core_bundle import MANIFEST, build_offline_bundle, download_bundle
    have = os.path.exists(os.path.join(bundle_dir, "core.yaml"))
    if source == "download" or (have and not os.path.exists(os.path.join(bundle_dir, MANIFEST))):
        if not have:
            path = download_bundle(os.path.dirname(os.path.abspath(bundle_dir)))
            if os.path.abspath(path) != os.path.abspath(bundle_dir):
                os.rename(path, bundle_dir)
        return
    build_offline_bundle(bundle_dir, packages_dir, include_bigbench=include_bigbench, download=True)


def write_core_csv(path, core):
    from nanochat.common import atomic_write_bytes
    lines = [["Task", "Accuracy", "Centered"]]
    lines += [[label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}"] for label, r in core["tasks"].items()]
    lines.append(["CORE", "", f"{core['core_metric']:.6f}"])
    text = "".join(",".join(row) + "\n" for row in lines)
    atomic_write_bytes(path, text.encode())


def main(argv=None):
    args = parse_args(argv)
    from nanochat.checkpoint import check_model_inputs
    try:
        step = check_model_inputs(args.checkpoint_dir, args.step, args.tokenizer_dir)
    except FileNotFoundError as e:
        fail(str(e))

    import torch
    from nanochat.checkpoint import load_model
    from nanochat.common import EventLog, barrier, compute_cleanup, compute_init, get_base_dir, print0, write_result
    from nanochat.core_eval import evaluate_core
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.stages.base_train import SAMPLE_PROMPTS
    from nanochat.tokenizer import Tokenizer

    ddp, rank, _, world_size, device = compute_init(args.device_type)
    events = EventLog(os.path.join(args.out_dir, "events.jsonl"), rank)
    events.log("status", status="running", args=vars(args))
    model, meta = load_model(args.checkpoint_dir, step, device)
    model.eval()
    tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    seq_len = model.config.sequence_len
    metrics, outputs = {"step": step}, {}
    t0 = time.time()

    # --- CORE -------------------------------------------------------------------
    if "core" in args.evals:
        bundle_dir = args.bundle_dir or os.path.join(get_base_dir(), "eval_bundle")
        packages_dir = args.packages_dir or os.path.join(get_base_dir(), "packages")
        if rank == 0:
            try:
                ensure_bundle(bundle_dir, args.bundle_source, packages_dir, args.include_bigbench)
            except (OSError, ValueError) as e:
                fail(f"CORE bundle: {e}")
        barrier()

        def on_task(label, r):
            print0(f"  {label:<34} accuracy {r['accuracy']:.4f}  centered {r['centered']:+.4f}  (n={r['n']})")
            for name in ("accuracy", "centered"):
                events.log("eval", step=step, suite="core", task=label, metric=name, value=r[name], n=r["n"])

        with torch.no_grad():
            core = evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=args.max_per_task,
                                 max_seq_len=getattr(model, "rotary_seq_len", None),
                                 batch_tokens=args.device_batch_size * seq_len, on_task=on_task)
        print0(f"CORE metric: {core['core_metric']:.4f} over {len(core['tasks'])} tasks"
               + (f" (missing: {', '.join(core['missing'])})" if core["missing"] else ""))
        events.log("eval", step=step, suite="core", task="CORE", metric="core_metric", value=core["core_metric"],
                   n=len(core["tasks"]))
        events.metric(step, **{"core/metric": core["core_metric"]})
        metrics.update(core_metric=core["core_metric"], core_partial=core["partial"], core_tasks=len(core["tasks"]),
                       core_missing=core["missing"])
        csv_path = os.path.join(args.out_dir, f"core_{step:06d}.csv")
        if rank == 0:
            write_core_csv(csv_path, core)
        outputs["core_csv"] = csv_path

    # --- bits per byte ----------------------------------------------------------
    if "bpb" in args.evals:
        from nanochat.dataloader import DataLoader
        token_bytes = tokenizer.token_bytes().to(device)
        dbs = args.device_batch_size
        tokens_per_step = dbs * seq_len * world_size
        split_steps = max(1, args.split_tokens // tokens_per_step)  # split_tokens rounded down to whole steps
        for split in ("train", "val"):
            loader = DataLoader(args.data_dir, tokenizer, dbs, seq_len, split=split, rank=rank,
                                world_size=world_size, device=device)
            batches = ((x.contiguous(), y.contiguous()) for x, y in loader)
            bpb = evaluate_bpb(model, batches, split_steps, token_bytes)
            print0(f"{split} bpb: {bpb:.6f}")
            events.metric(step, **{f"{split}/bpb": bpb})
            metrics[f"{split}_bpb"] = bpb

    # --- samples (rank 0) -------------------------------------------------------
    if "sample" in args.evals and rank == 0:
        from nanochat.engine import Engine
        engine = Engine(model, tokenizer)
        bos = tokenizer.get_bos_token_id()
        samples = []
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=bos)
            out, _ = engine.generate_batch(ids, num_samples=1, max_tokens=16, temperature=0)
            text = prompt + tokenizer.decode(out[0][len(ids):])
            print0(f"sample: {text!r}")
            events.log("sample", step=step, prompt=prompt, text=text)
            samples.append(text)
        out, _ = engine.generate_batch([bos], num_samples=8, max_tokens=min(128, seq_len - 1), temperature=1.0)
        for row in out:
            text = tokenizer.decode(row[1:])
            events.log("sample", step=step, prompt="", text=text)
            samples.append(text)
        metrics["num_samples"] = len(samples)

    metrics["eval_seconds"] = time.time() - t0
    if rank == 0:
        write_result(args.out_dir, "base_eval", metrics=metrics, outputs=outputs)
    events.log("status", status="done")
    events.close()
    compute_cleanup()  # after a barrier: rank 0 samples alone, the others must not tear the group down under it


if __name__ == "__main__":
    main()
