"""
Hardware facts in pure Python (no torch), so both the planner (`nanorun plan`, which must not import torch)
and the training stage (MFU) read the same tables: dense BF16 peak FLOPs per GPU (reference/nanochat.md 5.4)
and peak memory bandwidth for inference MBU.

    get_peak_flops("NVIDIA H100 80GB HBM3")      # 989e12
    get_peak_flops("NVIDIA L40")                 # inf: not in the table (and not an "L4")
    get_peak_bandwidth("NVIDIA H200")            # 4.8e12 bytes/s

Names are matched by whole words, not substrings: "L40" is not "L4", "RTX A4000" is not "A40", "GB200" is
not "B200". A device name is lower-cased and split at every character that is not a letter or digit
("NVIDIA A100-SXM4-80GB" -> nvidia, a100, sxm4, 80gb); an entry matches when all of its words are among them.
"""

import re

# (words that must all appear, value); the first match wins, so the entries with more words come first.
_PEAK_FLOPS = [
    (("gb200",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("gh200",), 989e12),  # not in the reference's table: Grace Hopper's GPU is an H100/H200-class Hopper die
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l4",), 121e12),
    (("mi355x",), 2.5e15), (("mi355",), 2.5e15),
    (("mi325x",), 1.3074e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15), (("mi300a",), 980.6e12),
    (("mi250x",), 383e12), (("mi250",), 362.1e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
]

# Intel Data Center GPU Max (Ponte Vecchio): 512 BF16 FLOPs per clock per compute unit (Xe core) at 1.3 GHz,
# so the peak depends on the part's compute-unit count (torch.xpu.get_device_properties().max_compute_units).
_INTEL_PVC = (("data", "center", "gpu", "max"), ("pvc",))
INTEL_PVC_FLOPS_PER_CU = 512 * 1.3e9

# Peak HBM bandwidth in bytes/s, for decode MBU. H100 SXM, H200, B200 and A100 are the reference's figures;
# H100 PCIe (2.0e12) and NVL (3.9e12) are NVIDIA's datasheet values, here so that they do not read as SXM.
_PEAK_BANDWIDTH = [
    (("b200",), 8e12), (("h200",), 4.8e12),
    (("h100", "nvl"), 3.9e12), (("h100", "pcie"), 2.0e12), (("h100",), 3.35e12),
    (("a100",), 2.0e12),
]


def _words(device_name):
    return set(re.split(r"[^a-z0-9]+", device_name.lower())) - {""}


def _lookup(table, device_name):
    words = _words(device_name)
    for keys, value in table:
        if words.issuperset(keys):
            return value
    return float("inf")


def get_peak_flops(device_name, compute_units=None):
    """Dense BF16 peak for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); inf when unknown so MFU reads 0.
    An Intel Data Center GPU Max needs `compute_units` (inf without it)."""
    words = _words(device_name)
    if any(words.issuperset(keys) for keys in _INTEL_PVC):
        return INTEL_PVC_FLOPS_PER_CU * compute_units if compute_units else float("inf")
    return _lookup(_PEAK_FLOPS, device_name)


def get_peak_bandwidth(device_name):
    """Peak memory bandwidth in bytes/s for a GPU name; inf when unknown so MBU reads 0."""
    return _lookup(_PEAK_BANDWIDTH, device_name)
