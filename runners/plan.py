"""
Spec -> Plan: every number each stage will use, resolved before anything runs.

A Plan is an ordered list of StagePlans. Each stage has a fully resolved `params` dict (what its
`config.json` holds, minus file paths) and a content key = sha256(stage, params, upstream keys, stage
version). Same key => same output => the stage is reused (a tokenizer is trained once for every run that
shares data + vocab; a re-apply after a crash resumes the stage in the same directory).

    from runners.plan import make_plan
    plan = make_plan(specs.load("specs/d12.yaml"))
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

from nanochat import scaling
from nanochat.hardware import get_peak_flops
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
# achieved training FLOP/s per CPU node, measured on the 2-core dev machine at d4/seq 512 (bench/RESULTS.md)
ASSUMED_CPU_FLOPS = {"float32": 7.5e10, "bfloat16": 1.8e11}


def get_home():
    return os.environ.get("NANORUN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "nanorun")


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
    env: dict = field(default_factory=dict)  # environment the stage runs with (part of its key)

    @property
    def dir_name(self):
        return f"{self.name}-{self.key[:8]}"

    def stage_dir(self, home=None):
        return os.path.join(home or get_home(), "stages", self.dir_name)


@dataclass(frozen=True)
class Plan:
    spec: object
    run_id: str
    spec_hash: str
    stages: list
    derived: dict

    def stage(self, name):
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self):
        return {
            "run_id": self.run_id, "spec_name": self.spec.name, "spec_hash": self.spec_hash,
            "derived": self.derived,
            "stages": [{"stage": s.name, "key": s.key, "dir_name": s.dir_name, "upstream": list(s.upstream),
                        "nproc_per_node": s.nproc_per_node, "nnodes": s.nnodes, "params": s.params, "env": s.env,
                        "estimate": s.estimate} for s in self.stages],
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


def _stage_params(spec, name, derived):
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
        dtype = t.pop("dtype", None)
        compile_ = t.pop("compile", None)
        if t.get("compile_optimizer") is None:  # left to base_train's default (and out of the content key)
            t.pop("compile_optimizer", None)
        params = {**m, **t, "run": run or "dummy", "device_type": device_type, "seed": spec.seed,
                  "compile": (1 if device_type == "cuda" else 0) if compile_ is None else int(compile_),
                  "dtype": dtype, "resume_from_step": -2}
        params["vocab_size"] = derived["vocab_size"]  # informative; base_train reads the tokenizer
        return params
    if name == "base_eval":
        params = {"device_type": device_type, **opts}
        if params.get("device_batch_size") is None:
            params["device_batch_size"] = spec.train.device_batch_size
        if "bundle" in params:  # spec name -> stage flag name
            params["bundle_source"] = params.pop("bundle")
        return params
    return {"device_type": device_type, "seed": spec.seed, **opts}  # sft, rl, chat_eval: their options as given


def _derive(spec):
    """Scaling laws resolved for the pretraining stage (nanochat.scaling is the one place they live)."""
    m, t, hw = spec.model, spec.train, spec.hardware
    world = hw.nodes * hw.gpus_per_node
    vocab = spec_vocab_size(spec)
    try:
        return scaling.resolve_training(
            m.depth, vocab_size=vocab, aspect_ratio=m.aspect_ratio, head_dim=m.head_dim, max_seq_len=m.max_seq_len,
            window_pattern=m.window_pattern, num_iterations=t.num_iterations, target_flops=t.target_flops,
            target_param_data_ratio=t.target_param_data_ratio, device_batch_size=t.device_batch_size,
            total_batch_size=t.total_batch_size, world_size=world, embedding_lr=t.embedding_lr,
            unembedding_lr=t.unembedding_lr, matrix_lr=t.matrix_lr, scalar_lr=t.scalar_lr,
            weight_decay=t.weight_decay)
    except ValueError as e:
        raise SpecError(f"{spec.name}: train: {e}") from None


def _estimate(spec, name, derived):
    hw = spec.hardware
    if name != "base_train":
        return {}
    flops = derived["total_flops"]
    if _device_type(spec) == "cpu":
        rate = ASSUMED_CPU_FLOPS.get(spec.train.dtype or "float32", ASSUMED_CPU_FLOPS["float32"]) * hw.nodes
    else:
        rate = get_peak_flops(hw.gpu) * ASSUMED_GPU_MFU * hw.nodes * hw.gpus_per_node
    seconds = flops / rate if rate != float("inf") else 0.0
    usd = seconds / 3600 * hw.nodes * hw.gpus_per_node * hw.usd_per_gpu_hour
    return {"flops": flops, "seconds": seconds, "usd": usd}


def make_plan(spec):
    names = list(stage_names(spec))
    derived = _derive(spec) if "base_train" in names else {}
    keys, stages = {}, []
    for name in names:
        params = _stage_params(spec, name, derived)
        upstream = tuple(u for u in STAGE_UPSTREAM[name] if u in keys)
        if name == "chat_eval":  # evaluate the model its `source` option names (sft or rl), not both
            source = params.get("source", "rl" if "rl" in keys else "sft")
            upstream = tuple(u for u in upstream if u not in ("sft", "rl") or u == source)
        # the compute dtype applies to every torch stage (the model trained in bf16 is evaluated in bf16)
        env = {"NANOCHAT_DTYPE": spec.train.dtype} if spec.train.dtype and name in MULTI_PROCESS_STAGES else {}
        key = stage_key(name, params, [keys[u] for u in upstream], env)
        keys[name] = key
        nproc, nnodes = _world(spec, name)
        stages.append(StagePlan(name=name, module=f"nanochat.stages.{name}", params=params, upstream=upstream,
                                key=key, nproc_per_node=nproc, nnodes=nnodes, estimate=_estimate(spec, name, derived),
                                env=env))
    h = spec_hash(spec)
    return Plan(spec=spec, run_id=f"{spec.name}-{h[:8]}", spec_hash=h, stages=stages, derived=derived)


def stage_available(stage):
    """Whether this nanorun has an implementation of the stage (the spec schema knows stages before the code does)."""
    import importlib.util
    return importlib.util.find_spec(stage.module) is not None


def stage_state(stage_dir):
    """done | partial (has checkpoints or events: a re-apply resumes it) | pending."""
    if os.path.exists(os.path.join(stage_dir, "result.json")):
        return "done"
    ckpt = os.path.join(stage_dir, "checkpoints")
    if os.path.isdir(ckpt) and any(f.startswith("meta_") for f in os.listdir(ckpt)):
        return "partial"
    if os.path.exists(os.path.join(stage_dir, "events.jsonl")):
        return "partial"
    return "pending"
