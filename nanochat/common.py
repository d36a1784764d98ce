"""
Shared runtime helpers for every nanochat stage: base directory, device and dtype policy,
distributed init (gloo on CPU, NCCL on CUDA), rank-0 printing, atomic torch saves, and the stage's event log
(`events.jsonl`, mirrored to wandb on request) and success marker (`result.json`), whose file formats are
nanochat.rundir's (the run-directory contract).

Nothing here imports specs/registry/runners/tui: a stage is a plain torch program that only writes files.
"""

import os
import sys
import uuid

import torch
import torch.distributed as dist

from nanochat import rundir
from nanochat.rundir import atomic_write_bytes, fsync_dir

# -----------------------------------------------------------------------------
# Paths


def get_base_dir():
    """$NANORUN_HOME or ~/.cache/nanorun; created on first use."""
    base = rundir.home()
    os.makedirs(base, exist_ok=True)
    return base


# -----------------------------------------------------------------------------
# Atomic writes (tmp + fsync + rename): the JSON/bytes writers are the run-directory contract's (nanochat.rundir);
# the torch one lives here because rundir is torch-free.


def atomic_torch_save(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


# -----------------------------------------------------------------------------
# Device, dtype and distributed


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _detect_compute_dtype():
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
        if name not in table:
            raise ValueError(f"NANOCHAT_DTYPE={name!r}: expected one of bfloat16, float16, float32")
        return table[name]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


# The activation/matmul dtype. Master weights stay fp32 (see gpt.Linear). Override with NANOCHAT_DTYPE.
COMPUTE_DTYPE = _detect_compute_dtype()


def is_ddp_requested():
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def keep_freed_memory():
    """CPU training: make glibc malloc keep freed memory instead of returning it to the OS.

    Every step allocates and frees the same large tensors (a 32 MB weight gradient, a chunk's logits). By
    default glibc serves large allocations (from 128 KB, the threshold adapting up to 32 MB) with a fresh
    mmap and unmaps them on free, so every step pays a page fault per 4 KB on first touch: ~10% of a bf16 step at the
    issue-3 benchmark shape (bench/RESULTS.md). Turning mmap off and the trim threshold up makes freed blocks
    reusable; the process's resident memory stays at its peak. No-op where there is no glibc (macOS, musl),
    and when NANOCHAT_KEEP_MEMORY=0. Returns whether it applied."""
    if os.environ.get("NANOCHAT_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok = mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1 and ok
    return ok


_INDUCTOR_WORKS = {}


def inductor_works(device):
    """Whether torch.compile can build and run a kernel on this device here (a C++ compiler on CPU, Triton on
    GPU). Checked once per device type with a tiny function; a failure is printed, not raised, so that features
    that are only on by default (the CPU optimizer compile) can stay off instead of stopping a run."""
    device = torch.device(device)
    if device.type not in _INDUCTOR_WORKS:
        try:
            fn = torch.compile(lambda x: x * 2.0 + 1.0, dynamic=False)
            ok = bool((fn(torch.ones(8, device=device)) == 3.0).all())
        except Exception as e:
            print0(f"torch.compile is unavailable on {device.type} ({type(e).__name__}: {str(e)[:200]})")
            ok = False
        _INDUCTOR_WORKS[device.type] = ok
    return _INDUCTOR_WORKS[device.type]


def skip_vector_isa_probe():
    """Before its first CPU kernel, inductor dry-builds and loads a test program for every vector ISA that
    /proc/cpuinfo lists (AVX-512 VNNI, AVX-512, AVX2 here): ~10 s of gcc on a cold cache (14.7 -> 4.4 s for the
    first loss kernel, measured), most of what compiling nanochat.loss costs in a short CPU run. The ISA it then
    uses is the one ATen already runs its own kernels with (torch.backends.cpu.get_cpu_capability()), so the CPU
    and the OS support it; trusting the flags (inductor's TORCHINDUCTOR_VEC_ISA_OK=1; the AVX-512 bf16/VNNI
    sub-checks still run) leaves only the toolchain, and a build failure there sends the loss kernels and the
    default-on optimizer compile (inductor_works) to eager, as before. A value the user set is kept."""
    if "TORCHINDUCTOR_VEC_ISA_OK" in os.environ:
        return
    os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "1"
    cfg = sys.modules.get("torch._inductor.config")  # read at import: set it too if inductor is loaded already
    if cfg is not None and cfg.cpp.vec_isa_ok is None:
        cfg.cpp.vec_isa_ok = True


def compute_init(device_type=""):
    """Seed, pick the device and join the process group when launched by torchrun.
    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type cuda requested but CUDA is not available")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
        keep_freed_memory()
        if device_type == "cpu":
            skip_vector_isa_probe()
    if ddp and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup(sync=True):
    """Tear the process group down; with sync, after a barrier, so no rank closes its gloo connections while
    another still uses them (under load that aborted the slower rank: "terminate called without an active
    exception"). A failing stage passes sync=False: its peers may never arrive. Gloo can still report a peer
    that finished the barrier first and closed its sockets ("Connection closed by peer"); by then every rank
    has done its work (or failed already), so that is a warning, not a failed stage."""
    if dist.is_available() and dist.is_initialized():
        try:
            if sync:
                dist.barrier()
            dist.destroy_process_group()
        except RuntimeError as e:  # never hide a stage's own error behind this one either
            print(f"warning: process group teardown: {str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)


def run_stage(events, stage, fn, **fields):
    """The frame of a training stage's main: log status "running" (stage + fields), return fn(); an exception is
    logged as status "failed" ("Type: message") and re-raised; the event log and the process group are closed
    either way."""
    events.log("status", status="running", stage=stage, **fields)
    ok = False
    try:
        result = fn()
        ok = True
        return result
    except BaseException as e:
        events.log("status", status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        events.close()
        compute_cleanup(sync=ok)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def synchronize(device):
    """Wait for the device's queued work (timing must not measure asynchronous dispatch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_caps(device, ddp=False):
    """The capability record of the device this process computes on (nanochat.hardware), with the CPU's measured
    matmul peaks (cached per machine by nanochat.probe). Under DDP rank 0 measures and broadcasts, so ranks that
    share a CPU never time each other's matmuls."""
    from nanochat import probe
    caps = None
    if not ddp or dist.get_rank() == 0:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            caps = {"device_type": "cuda", "name": props.name, "compute_capability": [props.major, props.minor],
                    "memory_bytes": props.total_memory, "matmul_flops": {}, "source": "probed",
                    "compute_units": getattr(props, "multi_processor_count", None)}
        else:
            caps = probe.local_caps(device.type, measure=False)
            if device.type == "cpu" and caps.get("source") != "injected":
                dtypes = probe.cpu_dtypes_to_measure(caps, dtype_name(COMPUTE_DTYPE))
                caps["matmul_flops"] = probe.measured_peaks(caps, dtypes)
    if ddp:
        box = [caps]
        dist.broadcast_object_list(box, src=0)
        caps = box[0]
    return caps


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def describe_compute_dtype(caps):
    """(reason, warning) for the dtype this process computes in: what `auto` decides on this device and whether
    the dtype in force is pathologically slow here. Logged at the start of every training stage."""
    from nanochat.hardware import resolve_dtype
    name = dtype_name(COMPUTE_DTYPE)
    auto = resolve_dtype("auto", caps)
    explicit = resolve_dtype(name, caps)
    if auto["dtype"] == name:
        return auto["reason"], explicit["warning"]
    return f"set explicitly; auto would pick {auto['dtype']} ({auto['reason']})", explicit["warning"]


def log_device(events, device, ddp=False):
    """Print and record (an events.jsonl "device" line) the compute dtype in force and why, with the device's
    capability record; warn when the dtype is pathologically slow here. Returns (caps, dtype_reason)."""
    caps = device_caps(device, ddp)
    reason, warning = describe_compute_dtype(caps)
    print0(f"compute dtype {dtype_name(COMPUTE_DTYPE)} ({reason}) on {device.type} {caps.get('name') or ''}".rstrip())
    if warning:
        print0(f"warning: {warning}")
    events.log("log", message="device", compute_dtype=dtype_name(COMPUTE_DTYPE), dtype_reason=reason,
               dtype_warning=warning, device_name=caps.get("name"), matmul_flops=caps.get("matmul_flops"))
    return caps, reason


def peak_memory_mib(device):
    """Peak memory so far in MiB: allocated tensors on CUDA, the process's peak resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


# -----------------------------------------------------------------------------
# Stage outputs: events.jsonl (appended as things happen) and result.json (written last = success), as
# nanochat.rundir writes them


class EventLog(rundir.EventLog):
    """The stage's events.jsonl (nanochat.rundir.EventLog), with its metrics mirrored to Weights & Biases when
    wandb_run names a run ("dummy" = off, as in the reference)."""

    def __init__(self, path, rank=0, wandb_run=None, wandb_project="nanorun", config=None):
        super().__init__(path, rank)
        self._wandb = None
        if self.enabled and wandb_run and wandb_run != "dummy":
            self._wandb = _wandb_init(wandb_run, wandb_project, config, os.path.dirname(os.path.abspath(path)))

    def metric(self, step, **values):
        values = super().metric(step, **values)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        return values

    def close(self):
        super().close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_init(run_name, project, config, out_dir):
    """Mirror metrics to Weights & Biases. WANDB_MODE=offline works without network (files under out_dir/wandb).
    The run id is kept in out_dir/wandb/run_id, so a stage resumed in the same directory continues its run."""
    try:
        import wandb
    except ImportError:
        raise ValueError(f"--run {run_name}: wandb logging needs the wandb package "
                         f"(pip install 'nanorun[wandb]'), or use --run dummy") from None
    id_path = os.path.join(out_dir, "wandb", "run_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # the shape of the ids wandb makes itself
        os.makedirs(os.path.dirname(id_path), exist_ok=True)
        atomic_write_bytes(id_path, (run_id + "\n").encode())
    return wandb.init(project=project, name=run_name, id=run_id, resume="allow", config=config or {}, dir=out_dir)


write_result = rundir.write_result  # result.json, the success marker (stages import it from here)
