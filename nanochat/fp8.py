"""
FP8 training through torchao (reference/nanochat.md section 3), and switching it off for evaluation.

    from nanochat.fp8 import convert_to_fp8, fp8_disabled
    n = convert_to_fp8(model, "tensorwise")      # swaps the large nn.Linears for torchao Float8Linear
    with fp8_disabled(model):                     # eval: every Float8Linear runs as a plain Linear again
        val_bpb = evaluate_bpb(model, ...)

Which layers: both dims >= 128 and divisible by 16 (torchao's scaled-mm needs multiples of 16; the small
value-embedding gates (12 -> n_kv_head) and the smear gate are left alone, as in the reference). The model's FLOPs
count every nn.Linear subclass, so MFU stays right with FP8 on.

Eval without FP8: the reference evaluates through the FP8 layers, so its val bpb and CORE move with the
quantization noise of the training recipe. `fp8_disabled` puts a plain bf16/fp32 Linear that shares the same
weight Parameter in place of each Float8Linear and puts the FP8 modules back on exit (also on error), so the
optimizer, the checkpoint keys and the training graph are untouched. Use it on the uncompiled model.
"""

import contextlib

import torch.nn as nn

RECIPES = ("tensorwise", "rowwise")


def fp8_eligible(module, fqn=""):
    return (isinstance(module, nn.Linear) and min(module.in_features, module.out_features) >= 128
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8(model, recipe="tensorwise"):
    """Convert the eligible Linears in place; returns how many were converted."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=fp8_eligible)
    return len(fp8_modules(model))


def is_fp8(module):
    return type(module).__name__ == "Float8Linear"  # by name: torchao is imported only when FP8 is on


def fp8_modules(model):
    """[(parent, attribute name, Float8Linear)] for every FP8 layer in the model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if is_fp8(child):
                found.append((parent, name, child))
    return found


@contextlib.contextmanager
def fp8_disabled(model):
    """Within the block every Float8Linear of `model` is a high-precision Linear sharing its weight."""
    from nanochat.gpt import Linear  # the model's own Linear: fp32 master weight cast to the input dtype

    swapped = []
    try:
        for parent, name, f8 in fp8_modules(model):
            plain = Linear(f8.in_features, f8.out_features, device="meta")
            plain.weight = f8.weight          # the same Parameter object: no copy, gradients land in one place
            plain.train(f8.training)
            setattr(parent, name, plain)
            swapped.append((parent, name, f8))
        yield model
    finally:
        for parent, name, f8 in swapped:
            setattr(parent, name, f8)
