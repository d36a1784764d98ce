"""
Read a capability record off this machine (what nanochat.hardware decides from): CPU model and the feature flags that
matter, cores, memory, GPUs (through nvidia-smi), and measured dense matmul peaks per dtype.

Everything but the measurement is torch-free and fast, so `nanorun plan` and `nanorun doctor` can call it. A
measurement imports torch (in a subprocess when the caller has not imported it) and is cached per machine in
$NANORUN_HOME/hardware/, keyed by the CPU, its flags, the core count, the torch version and OMP_NUM_THREADS.

    python -m nanochat.probe                         # the record of this machine, measured, as JSON
    python -m nanochat.probe --measure cpu float32   # measure one device's peaks (what the subprocess runs)

NANORUN_CAPS=caps.json replaces the probe with the records in that file (the test suite pins one this way).
NANORUN_HIDE_CPU_FLAGS=avx512_bf16,amx_bf16 makes the probe not see those flags: a machine with native bf16 then
resolves `dtype: auto` the way an AVX2-only machine does (for benchmarks and for checking that path by hand).
"""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from nanochat import rundir
from nanochat.hardware import gpu_facts

# CPU flags worth recording (the rest of /proc/cpuinfo's list says nothing about matmul speed)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_fp16", "amx_int8", "neon", "asimd", "asimdhp", "bf16", "i8mm", "sve", "sve2", "fp16")


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _sysctl(name):
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def memory_bytes():
    """Physical memory, capped by the cgroup limit when the process runs in one (containers, Slurm)."""
    total = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    if total is None and sys.platform == "darwin":
        total = int(_sysctl("hw.memsize") or 0) or None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = _read(path).strip()
        if limit.isdigit() and total and int(limit) < total:
            total = int(limit)
    return total


def cpu_record():
    """{"device_type": "cpu", "name", "arch", "flags", "cores", "memory_bytes"}; torch-free."""
    name, flags = platform.processor() or platform.machine(), set()
    info = _read("/proc/cpuinfo")
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    if sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string") or name
        if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags.add("bf16")
        if _sysctl("hw.optional.arm.FEAT_FP16") == "1":
            flags.add("fp16")
        if platform.machine() == "arm64":
            flags.add("neon")
    hidden = {f.strip() for f in os.environ.get("NANORUN_HIDE_CPU_FLAGS", "").split(",") if f.strip()}
    return {"device_type": "cpu", "name": name, "arch": platform.machine(),
            "flags": sorted((flags & set(CPU_FLAGS)) - hidden), "hidden_flags": sorted(hidden),
            "cores": cpu_count(), "memory_bytes": memory_bytes(), "compute_capability": None, "matmul_flops": {},
            "source": "probed"}


def gpu_records():
    """One record per NVIDIA GPU that nvidia-smi lists (torch-free); [] when there is none or no nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    records = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        name, mem_mib, cc = parts[0], parts[1], parts[2]
        try:
            major, minor = (int(x) for x in cc.split("."))
            capability = [major, minor]
        except ValueError:
            table_cc, _ = gpu_facts(name)
            capability = list(table_cc) if table_cc else None
        records.append({"device_type": "cuda", "name": name, "compute_capability": capability,
                        "memory_bytes": int(float(mem_mib)) * 1024 ** 2 if mem_mib.replace(".", "").isdigit() else None,
                        "matmul_flops": {}, "source": "probed"})
    return records


def table_record(gpu_name):
    """A GPU record from the tables alone, for planning a GPU spec on a machine without that GPU."""
    cc, mem = gpu_facts(gpu_name)
    return {"device_type": "cuda", "name": gpu_name, "compute_capability": list(cc) if cc else None,
            "memory_bytes": mem, "matmul_flops": {}, "source": "table"}


# -----------------------------------------------------------------------------
# Measured matmul peaks (torch), cached per machine


def _torch_version():
    try:
        from importlib.metadata import version
        return version("torch")
    except Exception:
        return "unknown"


def fingerprint(record):
    # OMP_NUM_THREADS: a peak timed with fewer threads than cores is another machine's peak
    blob = json.dumps([record.get("device_type"), record.get("name"), record.get("flags"), record.get("cores"),
                       _torch_version(), os.environ.get("OMP_NUM_THREADS")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_path(record, home=None):
    return os.path.join(rundir.hardware_dir(home), f"{record['device_type']}-{fingerprint(record)}.json")


def measure_matmul_peaks(device_type, dtypes, sizes=(512, 1024, 2048), rounds=3, budget_s=0.15, min_reps=2):
    """{dtype: best dense (n, n) @ (n, n) rate in FLOP/s over `sizes`}. The dtypes are measured in alternating
    rounds (a burst of load elsewhere then hits all of them, not one), each size for about `budget_s` per round
    (at least `min_reps` products into a preallocated output, after a warmup). A dtype slower than ~10 GFLOP/s
    at 512^3 (no native instructions) is measured at that size only, so probing a slow dtype stays short."""
    import torch
    device = torch.device(device_type)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    best = {d: 0.0 for d in dtypes}
    slow = set()
    operands = {}
    for _ in range(rounds):
        for d in dtypes:
            for n in sizes:
                if d in slow and n > sizes[0]:
                    break
                if (d, n) not in operands:
                    a = torch.randn(n, n, device=device).to(getattr(torch, d))
                    b = torch.randn(n, n, device=device).to(getattr(torch, d))
                    operands[d, n] = (a, b, torch.mm(a, b))
                a, b, out = operands[d, n]
                sync()
                reps, spent, fastest = 0, 0.0, float("inf")
                while reps < min_reps or spent < budget_s:
                    t0 = time.perf_counter()
                    torch.mm(a, b, out=out)
                    sync()
                    dt = time.perf_counter() - t0
                    fastest, spent, reps = min(fastest, dt), spent + dt, reps + 1
                    if spent > 4 * budget_s:
                        break
                best[d] = max(best[d], 2 * n ** 3 / fastest)
                if best[d] < 1e10:
                    slow.add(d)
    return best


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def measured_peaks(record, dtypes, home=None, refresh=False):
    """{dtype: FLOP/s} for `dtypes` on the device of `record`, from the cache or measured now (in this process when
    torch is already imported, else in a subprocess so the caller stays torch-free), and written to the cache."""
    path = _cache_path(record, home)
    cached = {}
    if not refresh:
        try:
            cached = rundir.read_json(path, {}).get("matmul_flops", {})
        except (OSError, rundir.RunDirError):
            cached = {}
    missing = [d for d in dtypes if d not in cached]
    if missing:
        env = {**os.environ}
        busy = _load_average() > (record.get("cores") or 1)
        if "torch" in sys.modules:
            fresh = measure_matmul_peaks(record["device_type"], missing)
        else:
            out = subprocess.run([sys.executable, "-m", "nanochat.probe", "--measure", record["device_type"],
                                  ",".join(missing)], capture_output=True, text=True, env=env, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"matmul measurement failed: {out.stderr.strip().splitlines()[-1:]}")
            fresh = json.loads(out.stdout)
        cached.update(fresh)
        if busy:   # a measurement taken while other work runs would pin a wrong choice: use it, don't keep it
            return {d: cached[d] for d in dtypes}
        rundir.atomic_write_json(path, {"record": {k: record.get(k) for k in ("device_type", "name", "flags", "cores")},
                                        "torch": _torch_version(), "matmul_flops": cached, "measured_at": time.time()})
    return {d: cached[d] for d in dtypes}


def cpu_dtypes_to_measure(record, requested=None):
    """fp32 always (MFU, and the yardstick); bf16 where the CPU has it natively (dtype auto must confirm it beats
    fp32); an explicitly requested dtype (to warn when it is pathologically slow)."""
    from nanochat.hardware import cpu_native_dtypes
    wanted = ["float32"] + [d for d in cpu_native_dtypes(record) if d == "bfloat16"]
    if requested and requested not in ("auto", *wanted):
        wanted.append(requested)
    return wanted


def injected_caps(device_type):
    """The record NANORUN_CAPS (a JSON file: {"cpu": {...}, "cuda": {...}}) gives for `device_type`, else None. The
    test suite sets it so that no test depends on the host CPU; a user can pin a record the same way."""
    path = os.environ.get("NANORUN_CAPS")
    if not path:
        return None
    with open(path) as f:
        records = json.load(f)
    record = records.get(device_type)
    return None if record is None else {**record, "source": "injected"}


def local_caps(device_type, requested=None, measure=True, home=None):
    """The capability record of this machine's `device_type`, with the matmul peaks dtype resolution needs."""
    injected = injected_caps(device_type)
    if injected is not None:
        return injected
    if device_type == "cpu":
        record = cpu_record()
        if measure:
            record["matmul_flops"] = measured_peaks(record, cpu_dtypes_to_measure(record, requested), home)
        return record
    if device_type == "cuda":
        gpus = gpu_records()
        if not gpus:
            return None
        record = dict(gpus[0], device_count=len(gpus))
        return record
    if device_type == "mps":
        if sys.platform != "darwin" or platform.machine() != "arm64":
            return None
        return {"device_type": "mps", "name": cpu_record()["name"], "compute_capability": None,
                "memory_bytes": memory_bytes(), "matmul_flops": {}, "source": "probed"}
    return None


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("DEVICE", "DTYPES"), help="measure and print {dtype: FLOP/s}")
    args = parser.parse_args(argv)
    if args.measure:
        device, dtypes = args.measure
        print(json.dumps(measure_matmul_peaks(device, dtypes.split(","))))
        return
    record = cpu_record()
    record["matmul_flops"] = measured_peaks(record, ["float32", "bfloat16", "float16"])
    print(json.dumps({"cpu": record, "gpus": gpu_records()}, indent=2))


if __name__ == "__main__":
    main()
