"""
Spec -> Plan: every number each stage will use, resolved before anything runs.

A Plan is an ordered list of StagePlans. Each stage has a fully resolved `params` dict (what its
`config.json` holds, minus file paths) and a content key = sha256(stage, params, upstream keys, stage
version). Same key => same output => the stage is reused (a tokenizer is trained once for every run that
shares data + vocab; a re-apply after a crash resumes the stage in the same directory).

    from runners.plan import make_plan
    plan = make_plan(specs.load("specs/d12.yaml"))
"""

import difflib
import hashlib
import json
from dataclasses import dataclass, field

from nanochat import memory, probe, rundir, scaling
from nanochat.hardware import default_compile, get_peak_flops, known_gpu_names, mfu_peak_flops, resolve_dtype
from specs import spec_hash, stage_names, stage_options
from specs import vocab_size as spec_vocab_size
from specs.errors import SpecError

# Bump a stage's version when its code changes what it produces: its key (and every downstream key) changes.
STAGE_VERSIONS = {"data": 1, "tok_train": 1, "base_train": 1, "base_eval": 1, "sft": 1, "rl": 1, "chat_eval": 1}
STAGE_UPSTREAM = {"data": [], "tok_train": ["data"], "base_train": ["data", "tok_train"],
                  "base_eval": ["data", "tok_train", "base_train"], "sft": ["tok_train", "base_train"],
                  "rl": ["tok_train", "sft"], "chat_eval": ["tok_train", "sft", "rl"]}
# launched under torchrun; data and tok_train are single-process
MULTI_PROCESS_STAGES = {"base_train", "base_eval", "sft", "rl", "chat_eval"}

# Planning assumptions for the time estimate (the real figures come from the run and land in the registry).
ASSUMED_GPU_MFU = 0.45        # reference: ~41% at d12, ~59% at d24 on 8xH100
# achieved / measured matmul peak on CPU: 0.52-0.69 at d4/seq 512 on the 2-core dev machines (bench/RESULTS.md)
ASSUMED_CPU_MFU = 0.5
ASSUMED_CPU_FLOPS = 7.5e10    # when no peak could be measured: the fp32 rate of a 2-core machine
MEMORY_MARGIN = 0.9           # a device batch must fit this fraction of the device's memory (estimate error, others)
DEFAULT_DEVICE_BATCH = 32     # the reference's default, for device_batch_size auto when the memory is unknown


@dataclass(frozen=True)
class StagePlan:
    name: str
    module: str
    params: dict
    upstream: tuple
    key: str
    nproc_per_node: int
    nnodes: int
    estimate: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)   # peak per device vs capacity (training and eval stages)
    env: dict = field(default_factory=dict)  # environment the stage runs with (part of its key)

    @property
    def dir_name(self):
        return rundir.stage_dir_name(self.name, self.key)

    def stage_dir(self, home=None):
        return rundir.stage_dir(self.name, self.key, home)


@dataclass(frozen=True)
class Plan:
    spec: object
    run_id: str
    spec_hash: str
    stages: list
    derived: dict
    hardware: dict = field(default_factory=dict)   # {"device": capability record, "dtype": resolve_dtype(...)}

    def stage(self, name):
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self):
        return {
            "run_id": self.run_id, "spec_name": self.spec.name, "spec_hash": self.spec_hash,
            "derived": self.derived, "hardware": self.hardware,
            "stages": [{"stage": s.name, "key": s.key, "dir_name": s.dir_name, "upstream": list(s.upstream),
                        "nproc_per_node": s.nproc_per_node, "nnodes": s.nnodes, "params": s.params, "env": s.env,
                        "estimate": s.estimate, "memory": s.memory} for s in self.stages],
            "totals": {
                "flops": sum(s.estimate.get("flops", 0) for s in self.stages),
                "seconds": sum(s.estimate.get("seconds", 0) for s in self.stages),
                "usd": sum(s.estimate.get("usd", 0) for s in self.stages),
            },
        }


def stage_key(name, params, upstream_keys, env=None):
    payload = {"stage": name, "version": STAGE_VERSIONS[name], "params": params, "upstream": list(upstream_keys)}
    if env:
        payload["env"] = env
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _dump(model):
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else dict(model)


def _world(spec, stage):
    hw = spec.hardware
    if stage not in MULTI_PROCESS_STAGES:
        return 1, 1
    return hw.gpus_per_node, hw.nodes


def _device_type(spec):
    hw = spec.hardware
    if getattr(hw, "device_type", ""):
        return hw.device_type
    return "cpu" if hw.gpu.lower() == "cpu" else "cuda"


def device_caps(spec):
    """The capability record `auto` resolves against: this machine's device when it has the spec's kind (probed,
    matmul peaks measured once and cached), else the spec's GPU from the tables (planning for another machine)."""
    kind = _device_type(spec)
    if kind == "cuda":
        local = probe.local_caps("cuda")
        if local:
            return local
        record = probe.table_record(spec.hardware.gpu)
        if record["compute_capability"] is None:   # a typo would plan as "~0s, ~$0.00"
            close = difflib.get_close_matches(spec.hardware.gpu.upper(), known_gpu_names(), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known_gpu_names())}"
            raise SpecError(f"{spec.name}: hardware.gpu: unknown GPU {spec.hardware.gpu!r}{hint}")
        return record
    if kind == "mps":
        return probe.local_caps("mps") or {"device_type": "mps", "name": "Apple GPU (MPS)", "matmul_flops": {},
                                           "compute_capability": None, "memory_bytes": None, "source": "table"}
    try:
        caps = probe.local_caps(kind, requested=spec.train.dtype)
    except (RuntimeError, OSError, ValueError) as e:   # no torch, a broken install: resolve without measurements
        caps = {**probe.local_caps(kind, measure=False), "measure_error": str(e)}
    return caps


def resolve_hardware(spec, caps):
    """What the spec's `auto` fields become on the device `caps` describes, and why."""
    dtype = resolve_dtype(spec.train.dtype, caps)
    peak, peak_source = mfu_peak_flops(caps, dtype["dtype"])
    return {"device": caps, "dtype": dtype, "peak_flops": peak if peak != float("inf") else None,
            "peak_source": peak_source}


def _stage_params(spec, name, derived, dtype):
    """The resolved config of one stage, keyed by the stage's argparse dest names."""
    opts = _dump(stage_options(spec, name) or {})
    device_type = _device_type(spec)
    if name == "data":
        data = _dump(spec.data)
        return {"train": data["train"], "val": data.get("val")}
    if name == "tok_train":
        tok = _dump(spec.tokenizer)
        return {"vocab_size": tok["vocab_size"], "max_chars": tok["max_chars"], "doc_cap": tok["doc_cap"], **opts}
    if name == "base_train":
        m, t = _dump(spec.model), _dump(spec.train)
        run = t.pop("wandb_run", None)
        t.pop("dtype", None)
        if t.get("compile") is None:  # left to base_train's default (nanochat.hardware.default_compile)
            t.pop("compile", None)
        if t.get("compile_optimizer") is None:  # left to base_train's default (and out of the content key)
            t.pop("compile_optimizer", None)
        t["device_batch_size"] = derived["device_batch_size"]   # auto resolved from the memory estimate
        params = {**m, **t, "run": run or "dummy", "device_type": device_type, "seed": spec.seed,
                  "dtype": dtype, "resume_from_step": -2}
        if "compile" in params:
            params["compile"] = int(params["compile"])
        params["vocab_size"] = derived["vocab_size"]  # informative; base_train reads the tokenizer
        return params
    if name == "base_eval":
        params = {"device_type": device_type, **opts}
        if params.get("device_batch_size") in (None, "auto"):
            params["device_batch_size"] = derived.get("device_batch_size", DEFAULT_DEVICE_BATCH)
        if "bundle" in params:  # spec name -> stage flag name
            params["bundle_source"] = params.pop("bundle")
        return params
    return {"device_type": device_type, "seed": spec.seed, **opts}  # sft, rl, chat_eval: their options as given


def fmt_seconds(s):
    """A duration for plans and progress lines: 42s, 12.5min, 3.20h."""
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.2f}h"


def _resolve(spec, device_batch_size):
    m, t, hw = spec.model, spec.train, spec.hardware
    return scaling.resolve_from(m, t, vocab_size=spec_vocab_size(spec), device_batch_size=device_batch_size,
                                world_size=hw.world_size)


def memory_capacity(spec, caps):
    """Bytes one process may use: a GPU's memory, or the machine's memory shared by the processes on it."""
    total = caps.get("memory_bytes")
    if not total:
        return None
    return total // spec.hardware.gpus_per_node if caps.get("device_type") in ("cpu", "mps") else total


def _memory_kwargs(spec, dtype, num_iterations):
    kind = _device_type(spec)
    compile_ = (spec.train.compile if spec.train.compile is not None
                else default_compile(kind, dtype, num_iterations)[0])
    return {"dtype": dtype, "world_size": spec.hardware.world_size, "device_type": kind,
            "attention_backend": "flex" if kind == "cuda" else "sdpa", "compile": bool(compile_)}


def _derive(spec, caps, dtype):
    """Scaling laws resolved for the pretraining stage (nanochat.scaling is the one place they live), with the
    device batch chosen from the memory estimate (nanochat.memory) when it is auto, or checked when it is not."""
    requested = spec.train.device_batch_size
    try:
        derived = _resolve(spec, 1 if requested == "auto" else requested)
    except ValueError as e:
        raise SpecError(f"{spec.name}: train: {e}") from None
    capacity = memory_capacity(spec, caps)
    kwargs = _memory_kwargs(spec, dtype, derived["num_iterations"])
    where = "device memory" if capacity else "memory unknown"
    if requested == "auto":
        if capacity is None:
            fits = [b for b in memory.batch_candidates(derived, spec.hardware.world_size) if b <= DEFAULT_DEVICE_BATCH]
            chosen, why = (fits[0] if fits else 1), f"auto: {where}, the reference default {DEFAULT_DEVICE_BATCH} or less"
        else:
            chosen = memory.pick_device_batch_size(derived, capacity, margin=MEMORY_MARGIN, **kwargs)
            if chosen is None:
                raise SpecError(f"{spec.name}: train.device_batch_size: " + memory.memory_refusal(
                    derived, capacity, device_batch_size=1, margin=MEMORY_MARGIN, **kwargs))
            why = f"auto: the largest power of two whose estimate fits {MEMORY_MARGIN:.0%} of the {where}"
        derived = _resolve(spec, chosen)
    else:
        why = "spec"
        refusal = capacity and memory.memory_refusal(derived, capacity, device_batch_size=requested,
                                                     margin=MEMORY_MARGIN, **kwargs)
        if refusal:
            raise SpecError(f"{spec.name}: train.device_batch_size: {refusal}")
    derived["device_batch_size_reason"] = why
    return derived


def _fits(estimate, capacity):
    return {"per_device_bytes": estimate["per_device_bytes"], "device_capacity_bytes": capacity,
            "fits": None if capacity is None else estimate["per_device_bytes"] <= MEMORY_MARGIN * capacity,
            "margin": MEMORY_MARGIN, "breakdown": estimate["breakdown"], "peak_at": estimate.get("peak_at")}


def _memory(spec, name, params, derived, caps, dtype):
    """The peak-memory estimate of one stage per device, against the device's capacity (plan --json: memory)."""
    if not derived or name not in MULTI_PROCESS_STAGES:
        return {}
    capacity = memory_capacity(spec, caps)
    kwargs = _memory_kwargs(spec, dtype, derived["num_iterations"])
    T = derived["sequence_len"]
    if name == "base_train":
        est = memory.estimate_training_memory(derived, device_batch_size=derived["device_batch_size"], **kwargs)
    elif name == "sft":
        rows = params.get("device_batch_size") or derived["device_batch_size"]
        seq = params.get("max_seq_len") or T
        est = memory.estimate_training_memory(derived, device_batch_size=rows, stage="sft", sequence_len=seq,
                                              **{**kwargs, "compile": False})
    elif name == "rl":
        est = memory.estimate_training_memory(derived, device_batch_size=params.get("device_batch_size", 8),
                                              stage="rl", **{**kwargs, "compile": False})
    else:   # base_eval: no-grad forwards of device_batch_size rows (+ sampling); chat_eval: batched generation
        rows = params.get("device_batch_size") if name == "base_eval" else params.get("batch_size", 8)
        est = memory.estimate_inference_memory(derived, batch_size=rows or 1, dtype=dtype,
                                               device_type=kwargs["device_type"], sequence_len=T,
                                               attention_backend=kwargs["attention_backend"])
    return _fits(est, capacity)


def _estimate(spec, name, derived, hardware):
    hw = spec.hardware
    if name != "base_train":
        return {}
    flops = derived["total_flops"]
    if _device_type(spec) == "cpu":
        rate = (hardware.get("peak_flops") or ASSUMED_CPU_FLOPS / ASSUMED_CPU_MFU) * ASSUMED_CPU_MFU * hw.nodes
    else:
        rate = get_peak_flops(hw.gpu) * ASSUMED_GPU_MFU * hw.nodes * hw.gpus_per_node
    seconds = flops / rate if rate != float("inf") else 0.0
    usd = seconds / 3600 * hw.nodes * hw.gpus_per_node * hw.usd_per_gpu_hour
    return {"flops": flops, "seconds": seconds, "usd": usd}


def make_plan(spec, caps=None):
    """Resolve `spec`; `caps` (a capability record, see nanochat.hardware) replaces probing this machine."""
    names = list(stage_names(spec))
    caps = caps if caps is not None else device_caps(spec)
    hardware = resolve_hardware(spec, caps)
    dtype = hardware["dtype"]["dtype"]
    derived = _derive(spec, caps, dtype) if "base_train" in names else {}
    keys, stages = {}, []
    for name in names:
        params = _stage_params(spec, name, derived, dtype)
        upstream = tuple(u for u in STAGE_UPSTREAM[name] if u in keys)
        if name == "chat_eval":  # evaluate the model its `source` option names (sft or rl), not both
            source = params.get("source", "rl" if "rl" in keys else "sft")
            upstream = tuple(u for u in upstream if u not in ("sft", "rl") or u == source)
        # the compute dtype applies to every torch stage (the model trained in bf16 is evaluated in bf16)
        env = {"NANOCHAT_DTYPE": dtype} if name in MULTI_PROCESS_STAGES else {}
        key = stage_key(name, params, [keys[u] for u in upstream], env)
        keys[name] = key
        nproc, nnodes = _world(spec, name)
        stages.append(StagePlan(name=name, module=f"nanochat.stages.{name}", params=params, upstream=upstream,
                                key=key, nproc_per_node=nproc, nnodes=nnodes,
                                estimate=_estimate(spec, name, derived, hardware),
                                memory=_memory(spec, name, params, derived, caps, dtype), env=env))
    h = spec_hash(spec)
    return Plan(spec=spec, run_id=f"{spec.name}-{h[:8]}", spec_hash=h, stages=stages, derived=derived,
                hardware=hardware)


def stage_available(stage):
    """Whether this nanorun has an implementation of the stage (the spec schema knows stages before the code does)."""
    import importlib.util
    return importlib.util.find_spec(stage.module) is not None
