"""nanochat.fp8: which layers go FP8, and evaluation with FP8 switched off (torchao runs on CPU)."""

import pytest
import torch

from nanochat.gpt import GPTConfig, build_model

torchao_float8 = pytest.importorskip("torchao.float8")
from nanochat.fp8 import convert_to_fp8, fp8_disabled, fp8_modules  # noqa: E402

CONFIG = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)


def pair():
    torch.manual_seed(0)
    plain = build_model(CONFIG)
    f8 = build_model(CONFIG)
    f8.load_state_dict(plain.state_dict())
    return plain, f8


def test_conversion_skips_small_layers_and_rejects_unknown_recipe():
    _, model = pair()
    n = convert_to_fp8(model, "rowwise")
    names = {f"{type(p).__name__}.{name}" for p, name, _ in fp8_modules(model)}
    assert n == len(fp8_modules(model)) > 0
    assert "MLP.c_fc" in names and "GPT.lm_head" in names
    for block in model.transformer.h:  # the 12-channel value-embedding gates stay high precision
        if block.attn.ve_gate is not None:
            assert type(block.attn.ve_gate).__name__ == "Linear"
    assert type(model.smear_gate).__name__ == "Linear"
    with pytest.raises(ValueError, match="fp8 recipe"):
        convert_to_fp8(model, "mxfp4")


def test_fp8_disabled_gives_the_high_precision_model_and_restores_fp8():
    plain, model = pair()
    convert_to_fp8(model, "tensorwise")
    idx = torch.randint(0, 320, (2, 64))
    with torch.no_grad():
        want = plain(idx, idx)
        quantized = model(idx, idx)
        with fp8_disabled(model):
            assert fp8_modules(model) == []
            got = model(idx, idx)
    assert got == want                       # exactly the unconverted model: same weights, same kernels
    assert quantized != want                 # FP8 really quantizes
    assert len(fp8_modules(model)) > 0       # back to FP8 afterwards
    # the weights are shared, not copied: a training step after an eval still reaches the optimizer's tensors
    loss = model(idx, idx)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.h[0].mlp.c_fc.weight.grad is not None


def test_fp8_restored_after_an_error_inside():
    _, model = pair()
    convert_to_fp8(model)
    with pytest.raises(RuntimeError):
        with fp8_disabled(model):
            raise RuntimeError("eval failed")
    assert len(fp8_modules(model)) > 0


def test_conversion_keeps_flops_and_matmul_params():
    """base_train calls estimate_flops() after convert_to_fp8: the count must include the Float8Linears.
    n_embd 256, head_dim 128: every attention/MLP projection and lm_head (256 -> 320) qualifies."""
    config = GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)
    model = build_model(config)
    flops, matmul = model.estimate_flops(), model.num_matmul_params()
    decode = model.estimate_decode_flops(100)
    n = convert_to_fp8(model, "tensorwise")
    assert n == 2 * 6 + 1                            # c_q, c_k, c_v, c_proj, c_fc, mlp.c_proj per layer + lm_head
    assert type(model.lm_head).__name__ == type(model.transformer.h[1].mlp.c_proj).__name__ == "Float8Linear"
    assert model.num_matmul_params() == matmul
    assert model.estimate_flops() == flops
    assert model.estimate_decode_flops(100) == decode
