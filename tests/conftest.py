"""Shared pytest fixtures and helpers. Coordinate: only ADD fixtures here, never remove others'."""

import hashlib
import json
import os
import time

import pytest

# -----------------------------------------------------------------------------
# Run-directory trees, as the runner and the stages write them (used by registry, CLI and TUI tests)

CORE_TASK_NAMES = [f"task{i:02d}" for i in range(22)]


def _key(*parts):
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def make_run_tree(home, name="cpu_demo", seed=0, status="success", *, run_id=None, core_metric=0.3, core_tasks=22,
                  val_bpb=0.8, total_training_time=3600.0, total_flops=1e18, num_steps=20, created_at=None,
                  hardware=None, depth=4, git_commit="abc1234", tags=("test",), real_names=False, recipe="r0"):
    """Write $home/runs/<run_id>/run.json plus the stage directories tok_train (shared by every run of this
    helper, like a real content-addressed tokenizer), base_train and base_eval. Returns the run directory.

    status="success": every stage has result.json; base_train logs num_steps metric points (train_loss every
    step, val_bpb every 5) and 2 samples; base_eval logs accuracy+centered eval events for `core_tasks` CORE tasks.
    status="running": base_train is mid-way (no result.json, a partial last line), base_eval pending.
    status="interrupted": like "running" but the run and base_train were stopped (Ctrl-C): base_train has
    started_at/finished_at and no wall_seconds.
    core_metric=None: base_eval failed (no result.json).
    real_names=True: metric names and events as the real stages write them: base_train logs train/loss,
    train/tok_per_sec, val/bpb; base_eval adds the aggregate eval event (task "CORE", metric core_metric, n = task
    count), logs core/metric, train/bpb, val/bpb and its result.json has core_tasks and core_missing.
    recipe: runs of one name and recipe share a recipe_hash (seeds of one recipe); None = no recipe_hash recorded."""
    run_id = run_id or f"{name}-{_key(name, seed, status, *([recipe] if recipe != 'r0' else []))[:8]}"
    created_at = created_at if created_at is not None else time.time() - 7200
    hardware = hardware or {"nodes": 1, "gpus_per_node": 8, "gpu": "H100-SXM", "usd_per_gpu_hour": 3.0,
                            "device_type": "cuda"}
    stages = []

    def stage(kind, key, st, files):
        sdir = os.path.join(home, "stages", f"{kind}-{key[:8]}")
        os.makedirs(sdir, exist_ok=True)
        _write_json(os.path.join(sdir, "config.json"), {"stage": kind, "depth": depth})
        for fname, content in files.items():
            if isinstance(content, str):
                with open(os.path.join(sdir, fname), "w") as f:
                    f.write(content)
            else:
                _write_json(os.path.join(sdir, fname), content)
        done = st in ("success", "cached")
        stages.append({"stage": kind, "key": key, "dir": sdir, "status": st,
                       "started_at": created_at + 10,
                       "finished_at": created_at + 100 if done or st == "interrupted" else None,
                       "wall_seconds": 90.0 if done else None, "exit_code": 0 if done else None,
                       "error": None if st != "failed" else "exit code 1"})

    def events(lines, partial=False):
        text = "".join(json.dumps(line) + "\n" for line in lines)
        return text + ('{"time": 1, "kind": "metric", "st' if partial else "")

    t = created_at
    stage("tok_train", _key("tok_train"), "success",
          {"events.jsonl": events([{"time": t, "kind": "status", "status": "done"}]),
           "result.json": {"stage": "tok_train", "status": "success", "finished_at": t,
                           "metrics": {"vocab_size": 32768, "compression": 4.5}, "outputs": {}}})

    running = status in ("running", "pending", "interrupted")
    steps = num_steps // 2 if running else num_steps
    loss_name, tps_name, bpb_name = ("train/loss", "train/tok_per_sec", "val/bpb") if real_names else \
        ("train_loss", "tok_per_sec", "val_bpb")
    tt = t + 10  # base_train logs after its stage started
    train = [{"time": tt + s, "kind": "metric", "step": s,
              "values": {loss_name: 5.0 - s * 0.01, tps_name: 1000.0 + s}} for s in range(steps)]
    train += [{"time": tt + s, "kind": "metric", "step": s, "values": {bpb_name: val_bpb + 0.5 - s * 0.5 / num_steps}}
              for s in range(0, steps, 5)]
    train += [{"time": tt + steps, "kind": "sample", "step": steps, "prompt": p, "text": p + " something"}
              for p in ("The capital of France is", "If yesterday was Friday, then")]
    files = {"events.jsonl": events(train, partial=running)}
    if not running:
        files["result.json"] = {"stage": "base_train", "status": "success", "finished_at": t + steps, "outputs": {},
                                "metrics": {"val_bpb": val_bpb, "min_val_bpb": val_bpb,
                                            "total_training_time": total_training_time, "total_flops": total_flops,
                                            "num_iterations": num_steps, "mfu": 40.0, "tok_per_sec": 1e6}}
    base_key = _key(run_id, "base_train")
    stage("base_train", base_key, ("interrupted" if status == "interrupted" else "running") if running else "success",
          files)

    if not running:
        evs = []
        for task in CORE_TASK_NAMES[:core_tasks]:
            evs.append({"time": t, "kind": "eval", "step": steps, "suite": "core", "task": task,
                        "metric": "accuracy", "value": 0.5, "n": 100})
            evs.append({"time": t, "kind": "eval", "step": steps, "suite": "core", "task": task,
                        "metric": "centered", "value": core_metric if core_metric is not None else 0.0, "n": 100})
        if real_names and core_metric is not None:
            evs.append({"time": t, "kind": "eval", "step": steps, "suite": "core", "task": "CORE",
                        "metric": "core_metric", "value": core_metric, "n": core_tasks})
            evs.append({"time": t, "kind": "metric", "step": steps,
                        "values": {"core/metric": core_metric, "train/bpb": val_bpb - 0.01, "val/bpb": val_bpb}})
        files = {"events.jsonl": events(evs)}
        if core_metric is not None:
            files["result.json"] = {"stage": "base_eval", "status": "success", "finished_at": t, "outputs": {},
                                    "metrics": {"core_metric": core_metric, "core_partial": core_tasks < 22,
                                                "val_bpb": val_bpb}}
            if real_names:
                files["result.json"]["metrics"].update(core_tasks=core_tasks,
                                                       core_missing=CORE_TASK_NAMES[core_tasks:])
        stage("base_eval", _key(run_id, "base_eval"), "success" if core_metric is not None else "failed", files)
    else:
        stage("base_eval", _key(run_id, "base_eval"), "pending", {})

    run = {"run_id": run_id, "name": name, "spec_path": f"specs/{name}.yaml", "spec_yaml": f"name: {name}\n",
           "spec_hash": _key("spec", name, seed, recipe),
           **({"recipe_hash": _key("recipe", name, recipe)} if recipe is not None else {}), "plan": {"run_id": run_id, "stages": [{"stage": "base_train",
                                                                                   "params": {"depth": depth}}]},
           "status": status, "created_at": created_at, "started_at": created_at + 1,
           "finished_at": None if status in ("running", "pending") else created_at + 300,
           "git_commit": git_commit, "host": "testhost",
           "hardware": hardware, "tags": list(tags), "seed": seed, "stages": stages}
    run_dir = os.path.join(home, "runs", run_id)
    _write_json(os.path.join(run_dir, "run.json"), run)
    return run_dir


@pytest.fixture
def nanorun_home(tmp_path, monkeypatch):
    """A fresh $NANORUN_HOME in tmp_path (tests never touch ~/.cache)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NANORUN_HOME", str(home))
    return str(home)


# -----------------------------------------------------------------------------
# Tiny pretraining data + tokenizer (data/tokenizer owner). Session-scoped: build once, treat as read-only.

def _tiny_texts(seed, n_docs):
    import random
    rng = random.Random(seed)
    words = ("the of and to in is was that for on with as by at from his her they have which this be river king "
             "ship whale island government people nation sea night morning letter garden running walked spoke "
             "quickly however because although question answer").split()
    docs = []
    for _ in range(n_docs):
        syllables = "ka lo mi ra sen tor vel an qu ix bre dol fa gin hu".split()

        def word():  # common words plus made-up ones, so BPE has merges to learn beyond the word list
            if rng.random() < 0.7:
                return rng.choice(words)
            return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        sentences = [" ".join(word() for _ in range(rng.randint(4, 14))).capitalize() + "."
                     for _ in range(rng.randint(1, 12))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A `data` stage directory: manifest.json + 2 train parquet shards (200 docs each, row groups of 32)
    and 1 val shard (64 docs). Use with nanochat.dataloader.DataLoader or --data-dir of tok_train."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("tiny_data")
    paths = []
    for k, n in enumerate((200, 200, 64)):
        path = str(root / f"shard_{k:05d}.parquet")
        pq.write_table(pa.table({"text": _tiny_texts(k, n)}), path, row_group_size=32)
        paths.append(path)
    manifest = {"train": [{"source": "parquet", "weight": 1.0, "files": paths[:2]}],
                "val": {"source": "parquet", "files": paths[2:]}, "documents": 400, "bytes": 0}
    _write_json(str(root / "manifest.json"), manifest)
    return str(root)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_data_dir, tmp_path_factory):
    """A saved tokenizer (vocab 512 incl. the 9 specials) trained on tiny_data_dir's train split;
    load with nanochat.tokenizer.Tokenizer.from_directory(path)."""
    import pyarrow.parquet as pq
    from nanochat.tokenizer import train_tokenizer
    with open(os.path.join(tiny_data_dir, "manifest.json")) as f:
        files = json.load(f)["train"][0]["files"]
    texts = [t for p in files for t in pq.read_table(p).column("text").to_pylist()]
    path = str(tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer")
    train_tokenizer(iter(texts), 512).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer_dir, tmp_path_factory):
    """A depth-1 GPT with random weights saved at step 5, for chat/serve tests. The reference init would make
    every argmax the same, and the stop tokens' logits are zeroed so replies run on."""
    import torch
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    config = GPTConfig(sequence_len=48, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = build_model(config, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.lm_head.weight[tok.special_tokens["<|bos|>"]] = 0.0
        model.lm_head.weight[tok.special_tokens["<|assistant_end|>"]] = 0.0
    directory = str(tmp_path_factory.mktemp("tiny_ckpt") / "checkpoints")
    save_checkpoint(directory, 5, model.state_dict(), None, {"model_config": vars(config)})
    return directory


# -----------------------------------------------------------------------------
# The capability record every test runs against (nanochat.probe reads NANORUN_CAPS instead of this machine): an
# AVX2-only 2-core CPU with fixed matmul peaks, so no test depends on the host CPU and no test measures matmuls.
# Tests of the probe itself delete NANORUN_CAPS with monkeypatch.

TEST_CPU_CAPS = {"device_type": "cpu", "name": "Test CPU (AVX2 only)", "arch": "x86_64", "flags": ["avx2", "fma"],
                 "cores": 2, "memory_bytes": 24 * 2 ** 30, "compute_capability": None,
                 "matmul_flops": {"float32": 1.2e11, "bfloat16": 1.0e9}}


@pytest.fixture(autouse=True, scope="session")
def pinned_capabilities(tmp_path_factory):
    path = tmp_path_factory.mktemp("caps") / "caps.json"
    path.write_text(json.dumps({"cpu": TEST_CPU_CAPS}))
    mp = pytest.MonkeyPatch()
    mp.setenv("NANORUN_CAPS", str(path))
    yield str(path)
    mp.undo()
