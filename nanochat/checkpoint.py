"""
Checkpoints of a training stage: one directory, one set of files per saved step.

    model_{step:06d}.pt             rank 0: model state_dict
    optim_{step:06d}_rank{r}.pt     every rank: its optimizer state_dict
    state_{step:06d}_rank{r}.pt     every rank: anything else rank-local (dataloader state), if given
    meta_{step:06d}.json            rank 0, written LAST after a barrier: the step's completion marker

Every file is written atomically (tmp + fsync + rename), and a step counts only once its meta file exists,
so a crash mid-save leaves the previous step as the last complete one.

    save_checkpoint(dir, step, model.state_dict(), opt.state_dict(), meta, rank, rank_state=loader.state_dict())
    model, meta = load_model(dir)           # newest complete step, on CPU in fp32
"""

import json
import os
import re

import torch

from nanochat.common import atomic_torch_save, atomic_write_json, barrier


def _model_path(d, step):
    return os.path.join(d, f"model_{step:06d}.pt")


def _optim_path(d, step, rank):
    return os.path.join(d, f"optim_{step:06d}_rank{rank}.pt")


def _state_path(d, step, rank):
    return os.path.join(d, f"state_{step:06d}_rank{rank}.pt")


def _meta_path(d, step):
    return os.path.join(d, f"meta_{step:06d}.json")


def save_checkpoint(ckpt_dir, step, model_state, optim_state, meta, rank=0, rank_state=None):
    """Collective when torch.distributed is initialized: every rank must call it."""
    os.makedirs(ckpt_dir, exist_ok=True)
    if rank == 0:
        atomic_torch_save(model_state, _model_path(ckpt_dir, step))
    if optim_state is not None:
        atomic_torch_save(optim_state, _optim_path(ckpt_dir, step, rank))
    if rank_state is not None:
        atomic_torch_save(rank_state, _state_path(ckpt_dir, step, rank))
    barrier()  # every rank's files are on disk before the step is declared complete
    if rank == 0:
        atomic_write_json(_meta_path(ckpt_dir, step), {**meta, "step": step})
    barrier()


def list_steps(ckpt_dir):
    """Complete steps (those with a meta file), ascending."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = [int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"meta_(\d+)\.json", f))]
    return sorted(s for s in steps if os.path.exists(_model_path(ckpt_dir, s)))


def find_last_step(ckpt_dir):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    return steps[-1]


def _check_step(ckpt_dir, step):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not found in {ckpt_dir} (have: {', '.join(map(str, steps))})")


def load_checkpoint(ckpt_dir, step, device="cpu", rank=0, load_optimizer=True):
    """-> (model_state, optim_state or None, meta, rank_state or None) for one complete step."""
    _check_step(ckpt_dir, step)
    model_state = torch.load(_model_path(ckpt_dir, step), map_location=device, weights_only=True)
    optim_state = None
    if load_optimizer:
        path = _optim_path(ckpt_dir, step, rank)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint step {step} in {ckpt_dir} has no optimizer file for rank {rank} "
                                    "(resume needs the same world size as the run that saved it)")
        optim_state = torch.load(path, map_location=device, weights_only=False)
    rank_state = None
    if os.path.exists(_state_path(ckpt_dir, step, rank)):
        rank_state = torch.load(_state_path(ckpt_dir, step, rank), map_location="cpu", weights_only=False)
    with open(_meta_path(ckpt_dir, step)) as f:
        meta = json.load(f)
    return model_state, optim_state, meta, rank_state


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
