"""
`nanorun doctor`: what this machine is to nanorun. Devices, the CPU and the flags that matter, native dtypes,
measured matmul peaks, memory, attention backends, library versions, and what every `auto` in a spec resolves to
here. Torch-free until it measures (nanochat.probe measures in a subprocess and caches the result per machine).

    from runners.doctor import doctor_report, render_doctor
    print(render_doctor(doctor_report()))
"""

import importlib.util
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

from nanochat import probe
from nanochat.hardware import (COMPILE_MODEL_MIN_STEPS, COMPILE_OPTIMIZER_MIN_STEPS, DTYPES, cpu_native_dtypes,
                               mfu_peak_flops, resolve_dtype)

PACKAGES = ("nanorun", "torch", "torchao", "flash-attn", "triton", "numpy", "tiktoken", "tokenizers", "pyarrow",
            "duckdb", "textual", "wandb")


def _version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def attention_backends(device_type, cc=None, torch_version=None):
    """Backends nanochat.attention can use on `device_type`, best first, found without importing torch."""
    found = []
    if device_type == "cuda":
        if cc and cc[0] == 9 and importlib.util.find_spec("flash_attn_interface"):
            found.append("fa3")
        if importlib.util.find_spec("flash_attn"):
            found.append("flash_attn")
    major_minor = tuple(int(x) for x in (torch_version or "0.0").split("+")[0].split(".")[:2])
    if major_minor >= (2, 5):
        found.append("flex")
    found.append("sdpa")
    return found


def auto_attention(device_type, dtype, available):
    """What nanochat.attention.choose_backend("auto") picks (the same rule, torch-free)."""
    if "fa3" in available and dtype == "bfloat16":
        return "fa3"
    if "flash_attn" in available and dtype in ("bfloat16", "float16"):
        return "flash_attn"
    return "flex" if device_type == "cuda" and "flex" in available else "sdpa"


def doctor_report(measure=True, refresh=False):
    """The machine as a JSON-able dict; `measure=False` skips the matmul timing (then dtype auto on a CPU with
    native bf16 stays at fp32 and says why), `refresh=True` times the matmuls again instead of reading the cache."""
    torch_version = _version("torch")
    cpu = probe.local_caps("cpu", measure=False)
    if measure and cpu.get("source") != "injected":
        cpu["matmul_flops"] = probe.measured_peaks(cpu, list(DTYPES), refresh=refresh)
    gpus = probe.gpu_records()
    devices = [{**cpu, "native_dtypes": cpu_native_dtypes(cpu)}]
    for gpu in gpus:
        devices.append({**gpu, "native_dtypes": [d for d in DTYPES if resolve_dtype(d, gpu)["warning"] is None]})
    default_device = "cuda" if gpus else ("mps" if sys.platform == "darwin" and platform.machine() == "arm64"
                                          else "cpu")
    resolved = {}
    for dev in devices:
        kind = dev["device_type"]
        if kind in resolved:
            continue
        dtype = resolve_dtype("auto", dev)
        backends = attention_backends(kind, dev.get("compute_capability"), torch_version)
        peak, peak_source = mfu_peak_flops(dev, dtype["dtype"])
        resolved[kind] = {
            "dtype": dtype["dtype"], "dtype_reason": dtype["reason"],
            "attention_backends": backends, "attention": auto_attention(kind, dtype["dtype"], backends),
            "compile": True if kind == "cuda" else (
                f"on for {dtype['dtype']} runs of >= {COMPILE_MODEL_MIN_STEPS} steps (when torch.compile works)"
                if kind == "cpu" and dtype["dtype"] != "float32" else False),
            "compile_optimizer": "with compile" if kind == "cuda"
            else f"on for runs of >= {COMPILE_OPTIMIZER_MIN_STEPS} steps (when torch.compile works)",
            "mfu_peak_flops": None if peak == float("inf") else peak, "mfu_peak_source": peak_source,
        }
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {name: _version(name) for name in PACKAGES},
        "devices": devices, "device_type_auto": default_device, "auto": resolved,
    }


def _gib(n):
    return f"{n / 2**30:.1f} GiB" if n else "?"


def render_doctor(report):
    lines = [f"python {report['python']} on {report['platform']}", ""]
    for dev in report["devices"]:
        kind = dev["device_type"]
        if kind == "cpu":
            hidden = f" (hidden: {' '.join(dev['hidden_flags'])})" if dev.get("hidden_flags") else ""
            lines.append(f"cpu      {dev['name']} ({dev.get('arch')}), {dev['cores']} cores, {_gib(dev['memory_bytes'])}")
            lines.append(f"         flags {' '.join(dev['flags']) or '-'}{hidden}")
        else:
            cc = dev.get("compute_capability")
            lines.append(f"{kind:<8} {dev['name']}, {'sm_%d%d' % tuple(cc) if cc else 'sm ?'}, {_gib(dev.get('memory_bytes'))}")
        lines.append(f"         native dtypes {', '.join(dev['native_dtypes'])}")
        if dev.get("matmul_flops"):
            lines.append("         measured matmul " + ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in dev["matmul_flops"].items())
                         + " GFLOP/s")
    lines += ["", f"auto     device_type -> {report['device_type_auto']}"]
    for kind, r in report["auto"].items():
        lines.append(f"  {kind:<6} dtype -> {r['dtype']} ({r['dtype_reason']})")
        lines.append(f"         attention -> {r['attention']} (available: {', '.join(r['attention_backends'])})")
        comp = r["compile"] if isinstance(r["compile"], str) else ("on" if r["compile"] else "off")
        lines.append(f"         compile -> {comp}, compile_optimizer -> {r['compile_optimizer']}")
        peak = f"{r['mfu_peak_flops']:.3g} FLOP/s" if r["mfu_peak_flops"] else "unknown"
        lines.append(f"         MFU peak -> {peak} ({r['mfu_peak_source']})")
    lines += ["", "versions " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
              "missing  " + (", ".join(k for k, v in report["versions"].items() if not v) or "-")]
    return "\n".join(lines)
