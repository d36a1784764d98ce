"""
Checkpoints of a training stage: one directory, one set of files per saved step.

    model_{step:06d}.pt             rank 0: model state_dict
    optim_{step:06d}_rank{r}.pt     every rank: its optimizer state_dict (a shard, see nanochat.optim)
    state_{step:06d}_rank{r}.pt     every rank: anything else rank-local (dataloader state), if given
    meta_{step:06d}.json            rank 0, written LAST after a barrier: the step's completion marker

Every file is written atomically (tmp + fsync + rename), and a step counts only once its meta file exists,
so a crash mid-save leaves the previous step as the last complete one. The meta records the world size
that wrote the step; loading with another world size merges every old optimizer shard into one unsharded
state (MuonAdamW.load_state_dict re-shards it), and remap_loader_states() restarts dataloader cursors.
Rewriting a step removes its meta first, so a save killed midway never leaves old and new files passing for
one complete step; remove_partial_files() clears the temporaries such a kill leaves. Across nodes the
directory must be on a filesystem every node sees (rank 0 writes model + meta, each rank its own shards).

    save_checkpoint(dir, step, model.state_dict(), opt.state_dict(), meta, rank, rank_state=loader.state_dict())
    model, meta = load_model(dir)           # newest complete step, on CPU in fp32
    model_state, optim_state, meta, rank_state = load_checkpoint(dir, step, device, rank, world_size)
"""

import os
import re

import torch

import torch.distributed as dist

from nanochat.common import atomic_torch_save, barrier, print0
from nanochat.rundir import atomic_write_json, checkpoint_steps, fsync_dir, read_json
from nanochat.rundir import meta_path as _meta_path
from nanochat.rundir import model_path as _model_path


def _optim_path(d, step, rank):
    return os.path.join(d, f"optim_{step:06d}_rank{rank}.pt")


def _state_path(d, step, rank):
    return os.path.join(d, f"state_{step:06d}_rank{rank}.pt")


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_checkpoint(ckpt_dir, step, model_state, optim_state, meta, rank=0, rank_state=None):
    """Collective when torch.distributed is initialized: every rank must call it."""
    os.makedirs(ckpt_dir, exist_ok=True)
    meta_path = _meta_path(ckpt_dir, step)
    if os.path.exists(meta_path):  # overwriting a step: it stops being complete before any file of it changes
        if rank == 0:
            os.remove(meta_path)
            fsync_dir(ckpt_dir)
        barrier()
    if rank == 0:
        atomic_torch_save(model_state, _model_path(ckpt_dir, step))
    if optim_state is not None:
        atomic_torch_save(optim_state, _optim_path(ckpt_dir, step, rank))
    if rank_state is not None:
        atomic_torch_save(rank_state, _state_path(ckpt_dir, step, rank))
    barrier()  # every rank's files are on disk before the step is declared complete
    if rank == 0:
        atomic_write_json(_meta_path(ckpt_dir, step), {**meta, "step": step, "world_size": _world_size()})
    barrier()


def remove_partial_files(ckpt_dir):
    """Delete the temporary files of saves that were killed before their rename (name.tmp.PID); call it before
    this run saves anything."""
    if not os.path.isdir(ckpt_dir):
        return []
    partial = [f for f in os.listdir(ckpt_dir) if re.fullmatch(r".+\.tmp\.\d+", f)]
    for f in partial:
        os.remove(os.path.join(ckpt_dir, f))
    return partial


def list_steps(ckpt_dir):
    """Complete steps (a meta file beside its model file), ascending: the rule of nanochat.rundir.checkpoint_steps."""
    return checkpoint_steps(ckpt_dir)


def find_last_step(ckpt_dir):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    return steps[-1]


def check_model_inputs(ckpt_dir, step, tokenizer_dir):
    """What an evaluation stage needs before it starts torch: a complete checkpoint step and a tokenizer.
    Returns the step to load (the newest when step is None) or raises FileNotFoundError with one clear line."""
    steps = list_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (expected model_NNNNNN.pt + meta_NNNNNN.json)")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not in {ckpt_dir} (have: {', '.join(map(str, steps))})")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    return steps[-1] if step is None else step


def _check_step(ckpt_dir, step):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not found in {ckpt_dir} (have: {', '.join(map(str, steps))})")


def load_checkpoint(ckpt_dir, step, device="cpu", rank=0, load_optimizer=True, world_size=None):
    """-> (model_state, optim_state or None, meta, rank_state or None) for one complete step.
    world_size (default: the current process group's) differing from the saved one: optim_state is every
    old shard merged into one unsharded state, and rank_state is None (see load_rank_states)."""
    _check_step(ckpt_dir, step)
    world_size = _world_size() if world_size is None else world_size
    model_state = torch.load(_model_path(ckpt_dir, step), map_location=device, weights_only=True)
    meta = read_json(_meta_path(ckpt_dir, step))  # RunDirError (a ValueError) naming a corrupt file
    saved_world = meta.get("world_size", 1)
    optim_state = None
    if load_optimizer:
        ranks = [rank] if saved_world == world_size else range(saved_world)
        shards = []
        for r in ranks:
            path = _optim_path(ckpt_dir, step, r)
            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint step {step} in {ckpt_dir} has no optimizer file for rank {r} "
                                        f"(it was saved by {saved_world} ranks)")
            shards.append(torch.load(path, map_location=device, weights_only=False))
        if saved_world == world_size:
            optim_state = shards[0]
        else:
            from nanochat.optim import merge_optimizer_shards
            print0(f"checkpoint step {step} was saved by {saved_world} ranks, loading on {world_size}: "
                   "merging the optimizer shards")
            optim_state = merge_optimizer_shards(shards)
    rank_state = None
    if saved_world == world_size and os.path.exists(_state_path(ckpt_dir, step, rank)):
        rank_state = torch.load(_state_path(ckpt_dir, step, rank), map_location="cpu", weights_only=False)
    return model_state, optim_state, meta, rank_state


def load_rank_states(ckpt_dir, step, saved_world_size):
    """Every old rank's rank-local state of one step, in rank order (None where a rank saved none)."""
    out = []
    for r in range(saved_world_size):
        path = _state_path(ckpt_dir, step, r)
        out.append(torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None)
    return out


def remap_loader_states(old_states, ranks, world_size, groups_per_source):
    """Dataloader states for loaders (rank in `ranks`, of `world_size`) from the states of a run whose loaders
    were split differently. An exact data resume is impossible then (rows were packed per old rank), so every
    new loader restarts, per source, just past the furthest row group any old loader had read (in its
    epoch); buffered and pending documents are dropped. groups_per_source: total row groups of each train source."""
    old_world = old_states[0]["world_size"]
    starts = []  # per source: (epoch, first global row group not yet read by anyone), taken
    for i, groups in enumerate(groups_per_source):
        best = None
        for st in old_states:
            src = st["sources"][i]
            p, r = src["position"], st["rank"]
            # last global row group this loader read: units are groups r, r+W, ... (or all groups, doc-strided)
            last = (p - 1) * old_world + r if groups >= old_world else p - 1
            key = (src["epoch"], last)
            best = key if best is None or key > best else best
        taken = max(st["sources"][i]["taken"] for st in old_states)
        starts.append((best[0], best[1] + 1, taken))
    out = []
    for rank in ranks:
        sources = []
        for i, groups in enumerate(groups_per_source):
            epoch, nxt, taken = starts[i]
            if groups >= world_size:
                n_units = len(range(rank, groups, world_size))
                pos = max(0, -(-(nxt - rank) // world_size))       # first own unit at global group >= nxt
            else:
                n_units, pos = groups, nxt
            if pos >= n_units:
                epoch, pos = epoch + 1, 0
            sources.append({"name": old_states[0]["sources"][i]["name"], "position": pos, "epoch": epoch,
                            "taken": taken})
        out.append({**{k: v for k, v in old_states[0].items() if k not in ("sources", "buffer", "pending")},
                    "rank": rank, "world_size": world_size, "sources": sources, "buffer": [], "pending": []})
    return out


def clean_model_state(state, device):
    """Strip torch.compile's "_orig_mod." prefix; bf16 -> fp32 off-GPU (CPU/MPS matmuls want fp32)."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("_orig_mod.")
        if torch.device(device).type != "cuda" and v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v
    return out


def load_model(ckpt_dir, step=None, device="cpu"):
    """Rebuild the GPT saved in ckpt_dir (newest complete step by default) -> (model, meta)."""
    from nanochat.gpt import GPT, GPTConfig

    step = find_last_step(ckpt_dir) if step is None else step
    model_state, _, meta, _ = load_checkpoint(ckpt_dir, step, device, load_optimizer=False)
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rotary buffers (not saved) and dtypes
    state = clean_model_state(model_state, device)
    # match the dtypes init_weights chose (e.g. fp32 on CPU even if saved in bf16)
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model, meta
