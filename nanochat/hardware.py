"""
Hardware facts and decisions in pure Python (no torch), so both the planner (`nanorun plan`, which must not import
torch) and the training stage read the same tables and make the same choices: dense BF16 peak FLOPs per GPU
(reference/nanochat.md 5.4), peak memory bandwidth for inference MBU, GPU compute capability and memory, and the
compute dtype that `dtype: auto` resolves to for a capability record (what `nanochat.probe` reads off a machine).

    resolve_dtype("auto", {"device_type": "cpu", "flags": ["avx2"], ...})
    # {"dtype": "float32", "reason": "auto: CPU has no native bf16 (no avx512_bf16/amx_bf16)", "warning": None}

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


# -----------------------------------------------------------------------------
# GPU compute capability and memory, for planning a GPU run on a machine that has none (the spec's `gpu` name).
# (words, (major, minor), memory in bytes); the first match wins. Memory is the part's usual size; a probed GPU
# (nvidia-smi / torch) replaces it with what the device reports.
GiB = 1024 ** 3
_GPU_FACTS = [
    (("gb200",), (10, 0), 186 * GiB), (("b200",), (10, 0), 180 * GiB), (("b100",), (10, 0), 180 * GiB),
    (("h200",), (9, 0), 141 * GiB), (("gh200",), (9, 0), 96 * GiB),
    (("h100", "nvl"), (9, 0), 94 * GiB), (("h100",), (9, 0), 80 * GiB), (("h800",), (9, 0), 80 * GiB),
    (("a100", "40gb"), (8, 0), 40 * GiB), (("a100",), (8, 0), 80 * GiB), (("a800",), (8, 0), 80 * GiB),
    (("a40",), (8, 6), 48 * GiB), (("a30",), (8, 0), 24 * GiB), (("a10g",), (8, 6), 24 * GiB), (("a10",), (8, 6), 24 * GiB),
    (("l40s",), (8, 9), 48 * GiB), (("l40",), (8, 9), 48 * GiB), (("l4",), (8, 9), 24 * GiB),
    (("5090",), (12, 0), 32 * GiB), (("4090",), (8, 9), 24 * GiB), (("3090",), (8, 6), 24 * GiB),
    (("v100", "32gb"), (7, 0), 32 * GiB), (("v100",), (7, 0), 16 * GiB), (("t4",), (7, 5), 16 * GiB),
    (("p100",), (6, 0), 16 * GiB),
    # AMD Instinct (ROCm runs the CUDA code path): bf16 matrix cores, so they stand in at the sm_80 feature level
    (("mi355x",), (8, 0), 288 * GiB), (("mi325x",), (8, 0), 256 * GiB), (("mi300x",), (8, 0), 192 * GiB),
    (("mi300a",), (8, 0), 128 * GiB), (("mi250x",), (8, 0), 64 * GiB), (("mi250",), (8, 0), 64 * GiB),
]


def known_gpu_names():
    """The GPU names the tables know, as a spec would spell them ("H100", "A100 40GB", "RTX 4090", ...)."""
    names = []
    for keys, _, _ in _GPU_FACTS:
        names.append(" ".join(k.upper() if not k.isdigit() else f"RTX {k}" for k in keys))
    return names


def gpu_facts(device_name):
    """(compute capability, memory bytes) of a GPU name, or (None, None) when the table does not know it."""
    words = _words(device_name)
    for keys, cc, mem in _GPU_FACTS:
        if words.issuperset(keys):
            return cc, mem
    return None, None


# -----------------------------------------------------------------------------
# dtype: auto. A capability record is a JSON-able dict (nanochat.probe builds it; tests inject their own):
#   device_type  "cpu" | "cuda" | "mps"
#   name         CPU model or GPU name
#   arch         "x86_64" | "arm64" | ...
#   flags        CPU feature flags (lower case, as /proc/cpuinfo spells them; macOS FEAT_BF16 -> "bf16")
#   compute_capability  [major, minor] for CUDA, else None
#   matmul_flops {dtype: measured dense matmul FLOP/s} (CPU; {} when not measured)
DTYPES = ("bfloat16", "float16", "float32")

# On CPU the compiled optimizer step saves 0.1-0.45 s per step at vocab 32768 (AdamW over the embedding tables)
# but only ~2-8% of a step at the demo's vocab 4096, and its first compile costs ~40 s with a cold inductor cache
# (bench/RESULTS.md): base_train turns it on by default only for CPU runs at least this long
COMPILE_OPTIMIZER_MIN_STEPS = 500
# Eager bf16/fp16 on CPU trains measurably worse than the compiled model (the reference always compiles): at depth
# 6, 400 steps, eager ended 0.031 val bpb behind while the compiled run tracked the reference (issue 16,
# bench/RESULTS.md). Eager fp32 matches the reference. base_train therefore compiles by default on CPU when the
# compute dtype is a half type and the run is at least this long (the first compile costs ~1-1.5 min and a
# compiled d6 step is ~13% faster, so it about pays for itself here)
COMPILE_MODEL_MIN_STEPS = 200
SLOW_FACTOR = 4.0   # an explicit dtype measured this many times slower than the fastest is warned about

# CPU features that mean a bf16 matmul runs on native instructions: x86 AVX-512 BF16 or AMX-BF16, Arm's BF16
# extension (Linux /proc/cpuinfo "bf16", macOS hw.optional.arm.FEAT_BF16 -> "bf16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# and a native fp16 matmul: Intel AMX-FP16 (Granite Rapids), Arm FP16 arithmetic ("asimdhp", macOS FEAT_FP16)
_CPU_FP16_FLAGS = ("amx_fp16", "avx512_fp16", "asimdhp", "fp16")


def default_compile(device_type, dtype, num_iterations):
    """(on, why) for base_train's model compile left unset; the caller still checks that torch.compile works."""
    if device_type == "cuda":
        return True, "CUDA"
    if device_type != "cpu" or dtype == "float32":
        return False, f"{dtype} on {device_type}: eager matches the reference's compiled numerics"
    if num_iterations < COMPILE_MODEL_MIN_STEPS:
        return False, f"{num_iterations} steps < {COMPILE_MODEL_MIN_STEPS}: the compile would not pay for itself"
    return True, f"{dtype} on CPU: eager trains worse than the compiled model (issue 16)"


def cpu_native_dtypes(caps):
    flags = set(caps.get("flags") or ())
    native = ["float32"]
    if flags & set(_CPU_BF16_FLAGS):
        native.append("bfloat16")
    if flags & set(_CPU_FP16_FLAGS):
        native.append("float16")
    return native


def _cc(caps):
    cc = caps.get("compute_capability")
    return tuple(cc) if cc else None


def relative_speeds(caps):
    """{dtype: dense matmul FLOP/s (CPU: measured) or relative speed (GPU: from the architecture)} for the dtypes
    whose speed is known; the fastest is the yardstick for "pathologically slow"."""
    kind = caps.get("device_type")
    if kind == "cpu":
        return {k: v for k, v in (caps.get("matmul_flops") or {}).items() if v}
    if kind == "cuda":
        cc = _cc(caps)
        if cc is None:
            return {}
        if cc >= (8, 0):   # tensor cores in bf16/fp16; fp32 matmuls run as TF32 (set_float32_matmul_precision high)
            return {"bfloat16": 1.0, "float16": 1.0, "float32": 0.5}
        if cc >= (7, 0):   # V100 125 vs 15.7 TFLOP/s, T4 65 vs 8.1: fp16 tensor cores, no bf16 units
            return {"float16": 1.0, "float32": 1 / 8, "bfloat16": 1 / 16}
        return {"float32": 1.0, "float16": 1.0, "bfloat16": 1 / 16}
    return {}


def resolve_dtype(requested, caps):
    """The compute dtype for `requested` ("auto" or an explicit dtype) on the device `caps` describes.
    Returns {"dtype", "reason", "warning"}; warning is a sentence when an explicit dtype is >= SLOW_FACTOR slower
    than the device's fastest (allowed, but the user should know) or when auto had to guess."""
    kind = caps.get("device_type", "cpu")
    speeds = relative_speeds(caps)
    if requested not in ("auto", None):
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}: expected auto, {', '.join(DTYPES)}")
        warning = None
        if speeds and requested in speeds:
            best = max(speeds, key=speeds.get)
            ratio = speeds[best] / speeds[requested]
            if ratio >= SLOW_FACTOR:
                warning = (f"dtype {requested} is {ratio:.0f}x slower than {best} on this {kind} "
                           f"({_speed_words(caps, requested, best)}); dtype: auto would pick the fast one")
        elif kind == "cpu" and requested != "float32" and requested not in cpu_native_dtypes(caps):
            warning = f"dtype {requested} is not native on this CPU ({caps.get('name') or 'unknown'}): expect it to be slow"
        return {"dtype": requested, "reason": "explicit", "warning": warning}

    if kind == "cpu":
        if "bfloat16" not in cpu_native_dtypes(caps):
            return {"dtype": "float32", "reason": "auto: CPU has no native bf16 (no avx512_bf16/amx_bf16)",
                    "warning": None}
        bf16, fp32 = speeds.get("bfloat16"), speeds.get("float32")
        if not (bf16 and fp32):
            return {"dtype": "float32", "reason": "auto: CPU has native bf16 but no matmul was measured to confirm it",
                    "warning": None}
        if bf16 > fp32:
            return {"dtype": "bfloat16", "reason": f"auto: CPU has native bf16, measured {bf16 / fp32:.1f}x fp32 "
                                                   f"({bf16 / 1e9:.0f} vs {fp32 / 1e9:.0f} GFLOP/s)", "warning": None}
        return {"dtype": "float32", "reason": f"auto: CPU has native bf16 but measured bf16 matmul is not faster "
                                              f"({bf16 / 1e9:.0f} vs {fp32 / 1e9:.0f} GFLOP/s)", "warning": None}
    if kind == "cuda":
        cc = _cc(caps)
        if cc is None:
            return {"dtype": "bfloat16", "reason": "auto: GPU not in the table, assumed compute capability >= 8.0",
                    "warning": f"unknown GPU {caps.get('name')!r}: dtype auto assumed bf16 support"}
        sm = f"sm_{cc[0]}{cc[1]}"
        if cc >= (8, 0):
            return {"dtype": "bfloat16", "reason": f"auto: {sm} has bf16 tensor cores", "warning": None}
        if cc >= (7, 0):
            return {"dtype": "float16", "reason": f"auto: {sm} has no bf16; fp16 tensor cores with loss scaling",
                    "warning": None}
        return {"dtype": "float32", "reason": f"auto: {sm} has no tensor cores", "warning": None}
    if kind == "mps":
        return {"dtype": "float32", "reason": "auto: MPS runs bf16 about 17% slower per step than fp32 (reference)",
                "warning": None}
    return {"dtype": "float32", "reason": f"auto: {kind}", "warning": None}


def _speed_words(caps, slow, fast):
    if caps.get("device_type") == "cpu":
        m = caps.get("matmul_flops") or {}
        return f"measured matmul {m[slow] / 1e9:.1f} vs {m[fast] / 1e9:.1f} GFLOP/s"
    cc = _cc(caps)
    return f"sm_{cc[0]}{cc[1]}" if cc else "by its architecture"


def mfu_peak_flops(caps, dtype, processes_per_device=1):
    """The MFU denominator per process: a GPU's table peak (dense bf16, the reference's convention), or on a CPU the
    best measured dense matmul rate among the dtypes the run computes in (its compute dtype, and fp32, which the
    master weights, optimizer and loss use), split between the processes that share the CPU. Returns
    (flops, description); inf when unknown (MFU then reads 0)."""
    kind = caps.get("device_type")
    if kind == "cpu":
        m = caps.get("matmul_flops") or {}
        used = {d: m[d] for d in {dtype, "float32"} if m.get(d)}
        if not used:
            return float("inf"), "no measured CPU peak"
        best = max(used, key=used.get)
        share = f" / {processes_per_device} processes" if processes_per_device > 1 else ""
        return used[best] / processes_per_device, f"measured {best} matmul peak {used[best] / 1e9:.1f} GFLOP/s{share}"
    peak = get_peak_flops(caps.get("name") or "", caps.get("compute_units"))
    if peak == float("inf"):
        return peak, f"{caps.get('name')!r} not in the peak table"
    return peak, f"table peak {peak / 1e12:.0f} TFLOP/s (dense bf16) for {caps.get('name')}"
