"""
Hardware facts in pure Python (no torch), so both the planner (`nanorun plan`, which must not import torch)
and the training stage (MFU) read the same table: dense BF16 peak FLOPs per GPU (reference/nanochat.md 5.4).
"""


_PEAK_FLOPS = [  # (substring of the device name, flops); the first match wins, so specific names come first
    ("gb200", 2.5e15), ("b200", 2.25e15), ("b100", 1.8e15),
    ("h200 nvl", 836e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("h800 nvl", 989e12), ("h800", 756e12),
    ("a100", 312e12), ("a800", 312e12), ("a40", 149.7e12), ("a30", 165e12),
    ("l40s", 362e12), ("l4", 121e12),
    ("mi355", 2.5e15), ("mi325", 1.3074e15), ("mi300x", 1.3074e15), ("mi300a", 980.6e12),
    ("mi250x", 383e12), ("mi250", 362.1e12),
    ("5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
]


def get_peak_flops(device_name):
    """Dense BF16 peak for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); inf when unknown so MFU reads 0."""
    name = device_name.lower().replace("-", " ").replace("_", " ")
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return float("inf")


