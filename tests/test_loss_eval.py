"""Bits per byte: hand-computed values, special tokens and ignored targets excluded, inf with no bytes."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb


class UniformModel(nn.Module):
    """Equal logits over the vocabulary: every counted token costs ln(V) nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        return F.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                               reduction=loss_reduction).view(y.shape)


def test_bpb_matches_hand_computation():
    vocab = 8
    token_bytes = torch.tensor([1, 2, 3, 1, 4, 2, 1, 0])  # id 7 is a special token (0 bytes)
    x = torch.zeros(2, 4, dtype=torch.long)
    y = torch.tensor([[0, 1, 2, 7], [4, -1, 5, 6]])  # one special, one ignored target
    bpb = evaluate_bpb(UniformModel(vocab), [(x, y)], steps=1, token_bytes=token_bytes)
    counted = 6  # tokens with bytes > 0
    total_bytes = 1 + 2 + 3 + 4 + 2 + 1
    assert bpb == pytest.approx(counted * math.log(vocab) / (math.log(2) * total_bytes))


def test_bpb_sums_over_steps_and_stops_at_steps():
    token_bytes = torch.tensor([1, 1, 1, 1])
    x = torch.zeros(1, 3, dtype=torch.long)
    batches = [(x, torch.tensor([[0, 1, 2]])), (x, torch.tensor([[3, 3, 3]])), (x, torch.tensor([[-1, -1, -1]]))]
    model = UniformModel(4)
    assert evaluate_bpb(model, batches, steps=2, token_bytes=token_bytes) == pytest.approx(2.0)  # ln4/ln2 per byte
    assert evaluate_bpb(model, iter(batches), steps=10, token_bytes=token_bytes) == pytest.approx(2.0)


def test_bpb_is_inf_without_bytes():
    token_bytes = torch.tensor([0, 0, 3])
    x = torch.zeros(1, 2, dtype=torch.long)
    assert evaluate_bpb(UniformModel(3), [(x, torch.tensor([[0, -1]]))], 1, token_bytes) == float("inf")
    assert evaluate_bpb(UniformModel(3), [], 5, token_bytes) == float("inf")


def test_better_model_has_lower_bpb():
    class Peaked(UniformModel):
        def forward(self, x, y, loss_reduction="mean"):
            logits = torch.zeros(*x.shape, self.vocab)
            logits.scatter_(-1, y.clamp(min=0).unsqueeze(-1), 5.0)
            return F.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                                   reduction=loss_reduction).view(y.shape)
    token_bytes = torch.ones(16, dtype=torch.long)
    x = torch.zeros(2, 5, dtype=torch.long)
    batches = [(x, torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0)))]
    assert evaluate_bpb(Peaked(16), batches, 1, token_bytes) < evaluate_bpb(UniformModel(16), batches, 1, token_bytes)
