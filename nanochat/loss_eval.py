"""
Bits per byte: the tokenizer-independent validation loss (reference/nanochat.md section 8).

    bpb = sum(loss_nats over tokens with bytes > 0) / (ln 2 * sum(bytes of those target tokens))

Special tokens have 0 bytes and ignored targets (-1) count as 0 bytes, so neither contributes.
Under torchrun both sums are all-reduced (SUM), so every rank returns the same number.

    from nanochat.loss_eval import evaluate_bpb
    bpb = evaluate_bpb(model, val_batches, steps=40, token_bytes=token_bytes)  # token_bytes: int (vocab,)
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Average bits per byte over `steps` batches of (inputs, targets), each int64 (B, T).
    model(x, y, loss_reduction="none") must return the per-token loss in nats, shape (B, T).
    token_bytes[id] = number of UTF-8 bytes of token id (0 for special tokens)."""
    device = token_bytes.device
    acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            break
        loss = model(x, y, loss_reduction="none").view(-1).to(acc)  # (B*T,) nats
        y = y.view(-1).to(token_bytes.device)
        valid = y >= 0
        # index with 0 where the target is ignored, then zero those entries: no negative indexing
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, torch.zeros_like(y))],
                                torch.zeros_like(y)).to(torch.int64)
        counted = num_bytes > 0
        total_nats += (loss.to(device) * counted).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = int(total_bytes.item())
    if total_bytes == 0:
        return float("inf")
    return float(total_nats.item()) / (math.log(2) * total_bytes)
