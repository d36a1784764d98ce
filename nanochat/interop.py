"""
Import nanochat checkpoints: read a nanochat base directory (or a flat directory holding the same files) and write
its tokenizer and checkpoints as nanorun stage directories, so every nanorun command works on them.

    $NANOCHAT_BASE_DIR (reference/nanochat.md section 21)   or a flat directory (as often on the hub)
      tokenizer/tokenizer.pkl          a pickled tiktoken Encoding           tokenizer.pkl, token_bytes.pt
      tokenizer/token_bytes.pt         int32 bytes per token                 model_NNNNNN.pt, meta_NNNNNN.json
      base_checkpoints/<tag>/model_NNNNNN.pt + meta_NNNNNN.json
      chatsft_checkpoints/<tag>/...    chatrl_checkpoints/<tag>/...

    found = find_nanochat(path, tag="d20")               # what is there: tokenizer, one checkpoint per source
    imported = import_nanochat(found)   # stage dirs under $NANORUN_HOME/stages; runners writes the run.json

The tokenizer pickle is read by a restricted unpickler that builds nothing but the Encoding's plain data (a
dict of strings, bytes and ints): no code from the file runs. Checkpoints are read with torch.load(weights_only=True).
Each stage directory is content-addressed (key = hash of the source files), written in a temporary directory and
renamed, so an import is idempotent and never leaves half a stage behind. Anything unusable raises InteropError,
one line naming the file and the problem.
"""

import codecs
import hashlib
import io
import json
import os
import pickle
import re
import shutil

from nanochat import rundir

IMPORT_VERSION = 1   # bump when an imported stage's files change for the same source files
SOURCES = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
STAGE_OF = {"base": "base_train", "sft": "sft", "rl": "rl"}   # nanochat source -> nanorun stage


class InteropError(ValueError):
    """A source or target that cannot be imported/exported, in one line naming the file (the CLI: exit 2)."""


# -----------------------------------------------------------------------------
# The tokenizer pickle, without running code from it


class _Refused(pickle.UnpicklingError):
    """The pickle asked for something other than what a tiktoken Encoding needs."""


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state the pickle hands to __setstate__."""

    def __setstate__(self, state):
        self.state = state


def _latin1_encode(text, encoding="latin1"):
    """codecs.encode as protocol-2 pickles use it to spell bytes; nothing else is let through."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("the pickle calls codecs.encode with unexpected arguments")
    return codecs.encode(text, "latin1")


class _TokenizerUnpickler(pickle.Unpickler):
    ALLOWED = {("tiktoken.core", "Encoding"): _EncodingState, ("_codecs", "encode"): _latin1_encode}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"the pickle asks for {module}.{name}, and only a tiktoken Encoding "
                           f"(tiktoken.core.Encoding) is allowed")
        return self.ALLOWED[(module, name)]


def read_tokenizer_pickle(path):
    """(pattern, mergeable_ranks {bytes: int}, special_tokens {name: id}) from nanochat's tokenizer.pkl (a pickled
    tiktoken Encoding) or nanorun's own (a dict). InteropError naming the file for anything else."""
    try:
        with open(path, "rb") as f:
            obj = _TokenizerUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise InteropError(f"{path}: missing (a nanochat checkpoint needs its tokenizer)") from None
    except _Refused as e:
        raise InteropError(f"{path}: not a tiktoken encoding: {e}") from None
    except Exception as e:  # truncated or garbage bytes raise all sorts of errors from the pickle machine
        raise InteropError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if isinstance(obj, _EncodingState):
        state = getattr(obj, "state", None)
        if isinstance(state, str):
            raise InteropError(f"{path}: a reference to tiktoken's built-in encoding {state!r}, not a trained "
                               f"nanochat tokenizer")
        if not isinstance(state, dict):
            raise InteropError(f"{path}: not a tiktoken encoding (its state is a {type(state).__name__})")
        pattern, ranks, special = state.get("pat_str"), state.get("mergeable_ranks"), state.get("special_tokens")
    elif isinstance(obj, dict) and "mergeable_ranks" in obj:   # nanorun's own tokenizer.pkl
        from nanochat.tokenizer import SPECIAL_TOKENS
        pattern, ranks = obj.get("pattern"), obj.get("mergeable_ranks")
        names = obj.get("special_tokens") or SPECIAL_TOKENS
        special = {n: len(ranks or {}) + i for i, n in enumerate(names)} if isinstance(names, list) else None
    else:
        raise InteropError(f"{path}: not a tiktoken encoding (the pickle holds a {type(obj).__name__})")
    if not isinstance(pattern, str):
        raise InteropError(f"{path}: not a tiktoken encoding (no split pattern)")
    if not isinstance(ranks, dict) or not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items()):
        raise InteropError(f"{path}: not a tiktoken encoding (mergeable ranks are not bytes -> int)")
    if not isinstance(special, dict) or not all(isinstance(k, str) and type(v) is int for k, v in special.items()):
        raise InteropError(f"{path}: not a tiktoken encoding (special tokens are not str -> int)")
    return pattern, ranks, special


def load_tokenizer(path):
    """nanorun's Tokenizer from a nanochat tokenizer.pkl: the same ranks, pattern and special-token ids."""
    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
    pattern, ranks, special = read_tokenizer_pickle(path)
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if special != expected:
        got = ", ".join(f"{k}={v}" for k, v in sorted(special.items(), key=lambda kv: kv[1]))
        raise InteropError(f"{path}: special tokens {got or '(none)'} are not nanochat's 9 chat tokens "
                           f"(<|bos|> ... <|output_end|> right after the {len(ranks)} mergeable ranks)")
    try:
        return Tokenizer(ranks, pattern)
    except ValueError as e:
        raise InteropError(f"{path}: unusable mergeable ranks ({e})") from None


# -----------------------------------------------------------------------------
# Finding what a nanochat directory holds


def _steps(directory):
    """Steps with both model_N.pt and meta_N.json (nanochat writes model then meta), ascending."""
    try:
        names = set(os.listdir(directory))
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"model_(\d+)\.pt", n))
                  and f"meta_{m.group(1)}.json" in names)


def _files(directory, step):
    """(model path, meta path) of a step, spelled as nanochat spells them (zero-padded to 6 digits)."""
    for name in os.listdir(directory):
        m = re.fullmatch(r"model_(\d+)\.pt", name)
        if m and int(m.group(1)) == step:
            return os.path.join(directory, name), os.path.join(directory, f"meta_{m.group(1)}.json")
    raise InteropError(f"{directory}: no model file for step {step}")


def _default_tag(tags, parents):
    """The reference's choice: the deepest d<N> tag, else the most recently modified directory."""
    depths = [(int(m.group(1)), t) for t in tags if (m := re.match(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: max(os.path.getmtime(os.path.join(p, t)) for p in parents
                                       if os.path.isdir(os.path.join(p, t))))


def find_nanochat(path, tag=None, step=None, sources=None):
    """What to import from `path` -> {"path", "layout": "base_dir"|"flat", "tag", "tokenizer": pkl path,
    "checkpoints": [{"source", "stage", "dir", "step", "model", "meta"}], "notes": [...]}. One checkpoint per
    source (base, sft, rl): step `step` where it has it, else its newest. `sources` limits the sources (a flat
    directory is taken as `sources[0]`, default base)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise InteropError(f"{path}: not a directory")
    wanted = list(sources or SOURCES)
    for s in wanted:
        if s not in SOURCES:
            raise InteropError(f"--source {s}: expected one of {', '.join(SOURCES)}")
    notes = []
    parents = {s: os.path.join(path, SOURCES[s]) for s in SOURCES if os.path.isdir(os.path.join(path, SOURCES[s]))}
    if parents:
        layout, tokenizer = "base_dir", os.path.join(path, "tokenizer", "tokenizer.pkl")
        tags = sorted({t for p in parents.values() for t in os.listdir(p) if os.path.isdir(os.path.join(p, t))})
        if not tags:
            raise InteropError(f"{path}: {', '.join(SOURCES[s] for s in parents)} hold no <tag> directory "
                               f"(expected e.g. base_checkpoints/d20/model_NNNNNN.pt)")
        if tag is None:
            tag = _default_tag(tags, list(parents.values()))
        elif tag not in tags:
            raise InteropError(f"{path}: no checkpoints tagged {tag!r} (tags: {', '.join(tags)})")
        candidates = [(s, os.path.join(parents[s], tag)) for s in wanted
                      if s in parents and os.path.isdir(os.path.join(parents[s], tag))]
    elif _steps(path):
        layout, tokenizer = "flat", os.path.join(path, "tokenizer.pkl")
        if not os.path.exists(tokenizer) and os.path.exists(os.path.join(path, "tokenizer", "tokenizer.pkl")):
            tokenizer = os.path.join(path, "tokenizer", "tokenizer.pkl")
        source = wanted[0] if sources else "base"
        if not sources:
            notes.append("flat directory: imported as a base model (pass --source sft or rl for a chat model)")
        tag = tag or os.path.basename(path)
        candidates = [(source, path)]
    else:
        raise InteropError(f"{path}: not a nanochat checkpoint directory (expected tokenizer/tokenizer.pkl and "
                           f"base_checkpoints/<tag>/model_NNNNNN.pt + meta_NNNNNN.json, or those files in one "
                           f"directory)")
    if not os.path.isfile(tokenizer):
        raise InteropError(f"{tokenizer}: missing (a nanochat checkpoint needs its tokenizer; copy the "
                           f"tokenizer/ directory it was trained with next to the checkpoints)")
    checkpoints = []
    for source, directory in candidates:
        steps = _steps(directory)
        if not steps:
            notes.append(f"{directory}: no model_NNNNNN.pt with its meta_NNNNNN.json, skipped")
            continue
        if step is not None and step not in steps:
            notes.append(f"{directory}: no step {step} (has {', '.join(map(str, steps))}), skipped")
            continue
        chosen = steps[-1] if step is None else step
        model, meta = _files(directory, chosen)
        checkpoints.append({"source": source, "stage": STAGE_OF[source], "dir": directory, "step": chosen,
                            "model": model, "meta": meta})
    if not checkpoints:
        where = ", ".join(d for _, d in candidates) or path
        raise InteropError(f"{where}: no checkpoint to import" + (f" at step {step}" if step is not None else "")
                           + (f" for --source {','.join(wanted)}" if sources else ""))
    return {"path": path, "layout": layout, "tag": tag, "tokenizer": tokenizer, "checkpoints": checkpoints,
            "notes": notes}


# -----------------------------------------------------------------------------
# Checkpoints: read, clean, check against the config, fill what older checkpoints lack

# The reference's own patches (checkpoint_manager: window_pattern "L", resid_lambdas 1, x0_lambdas 0) and, for
# parameters it added later without a patch, the value that switches the feature off, which is the architecture
# an older checkpoint was trained with: smear and backout at 0, value embeddings and their gates at 0.
CONFIG_DEFAULTS = {"window_pattern": "L"}
FEATURE_GROUPS = {
    "resid_lambdas": (("resid_lambdas",), "1.0 (the reference's default)"),
    "x0_lambdas": (("x0_lambdas",), "0.0 (the reference's default)"),
    "smear": (("smear_gate.weight", "smear_lambda"), "0 (smear off, as before it existed)"),
    "backout": (("backout_lambda",), "0 (backout off, as before it existed)"),
    "value embeddings": (("value_embeds.", "ve_gate."), "0 (no value embeddings, as before they existed)"),
}


def _group_of(name):
    for group, (prefixes, _) in FEATURE_GROUPS.items():
        if any(name == p or (p.endswith(".") and (name.startswith(p) or f".{p}" in name)) for p in prefixes):
            return group
    return None


def read_meta(meta_path):
    meta = rundir.read_json(meta_path, shape=None) if os.path.exists(meta_path) else None
    if not isinstance(meta, dict):
        raise InteropError(f"{meta_path}: " + ("missing" if meta is None else "not a JSON object"))
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise InteropError(f"{meta_path}: no model_config object (not a nanochat checkpoint meta)")
    return meta


def model_config_from_meta(meta, meta_path, notes):
    """The GPTConfig fields of a nanochat meta, with the reference's default for a missing window_pattern."""
    from dataclasses import fields

    from nanochat.gpt import GPTConfig
    config = dict(meta["model_config"])
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InteropError(f"{meta_path}: model_config has fields this version does not know: {', '.join(unknown)}")
    for name, value in CONFIG_DEFAULTS.items():
        if name not in config:
            config[name] = value
            notes.append(f"{meta_path}: no model_config.{name}: using the reference's default {value!r}")
    missing = sorted(known - set(config))
    if missing:
        raise InteropError(f"{meta_path}: model_config lacks {', '.join(missing)}")
    for name, value in config.items():
        if name != "window_pattern" and (type(value) is not int or value < 1):
            raise InteropError(f"{meta_path}: model_config.{name} must be a positive integer (got {value!r})")
    return config


def _shape(t):
    return "(" + ", ".join(map(str, t.shape)) + ")"


def load_state(model_path, meta_path, config, notes):
    """The checkpoint's state dict with nanorun's names (no `_orig_mod.`), every tensor the config's model has,
    each of the config's shape (dtypes as saved). InteropError naming the file for anything else."""
    import torch

    from nanochat.gpt import GPT, GPTConfig
    try:   # memory-mapped: a multi-GB checkpoint is read as it is written out, not held in memory
        try:
            raw = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            raw = torch.load(model_path, map_location="cpu", weights_only=True)   # a legacy (non-zip) file
    except Exception as e:
        raise InteropError(f"{model_path}: not a weights-only state dict ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise InteropError(f"{model_path}: not a state dict of tensors")
    state = {k.removeprefix("_orig_mod."): v for k, v in raw.items()}
    try:
        with torch.device("meta"):
            expected = {k: v for k, v in GPT(GPTConfig(**config)).state_dict().items()}
    except ValueError as e:
        raise InteropError(f"{meta_path}: unusable model_config ({e})") from None
    described = ", ".join(f"{k}={config[k]}" for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size"))
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InteropError(f"{meta_path}: model_config ({described}) does not match {os.path.basename(model_path)}: "
                           f"it has {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, which "
                           f"this config's model does not")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise InteropError(f"{meta_path}: model_config ({described}) does not match "
                               f"{os.path.basename(model_path)}: {name} is {_shape(t)}, the config gives "
                               f"{_shape(expected[name])}")
    missing = sorted(set(expected) - set(state))
    by_group = {}
    for name in missing:
        by_group.setdefault(_group_of(name), []).append(name)
    if None in by_group:
        raise InteropError(f"{model_path}: missing {by_group[None][0]}"
                           f"{f' and {len(by_group[None]) - 1} more' if len(by_group[None]) > 1 else ''}")
    for group, names in by_group.items():
        present = [k for k in expected if _group_of(k) == group and k in state]
        if present:   # half a feature is a broken checkpoint, not an older one
            raise InteropError(f"{model_path}: has {present[0]} but lacks {names[0]}")
        for name in names:
            fill = torch.ones if group == "resid_lambdas" else torch.zeros
            state[name] = fill(expected[name].shape, dtype=torch.float32)
        notes.append(f"{model_path}: no {group} ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''}): "
                     f"set to {FEATURE_GROUPS[group][1]}")
    return {k: state[k] for k in expected}   # the model's own order


# -----------------------------------------------------------------------------
# Writing stage directories


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(stage, **parts):
    blob = json.dumps({"import": "nanochat", "version": IMPORT_VERSION, "stage": stage, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _publish(tmp, final):
    """Move a complete temporary stage directory into place; if another import got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if rundir.stage_state(final) != "done":
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    rundir.fsync_dir(os.path.dirname(final))


def _write_stage(stage, key, home, fill):
    """Create stages/<stage>-<key8> by fill(tmp_dir) in a temporary sibling, renamed into place when complete.
    An existing done directory is reused. Returns (directory, reused)."""
    final = rundir.stage_dir(stage, key, home)
    if rundir.stage_state(final) == "done":
        return final, True
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.import-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if os.path.isdir(final):   # an unfinished directory of an earlier attempt: nothing in it is ours
            shutil.rmtree(final)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def import_nanochat(found, home=None, echo=print):
    """Write the tokenizer and checkpoints `found` (find_nanochat) as nanorun stage directories. Returns
    {"stages": [{"stage", "key", "dir", "reused", "step", "source", "meta"}], "model_config", "notes", "digests"}:
    what runners needs to write the run record. Every check runs before anything is written."""
    import torch

    from nanochat.common import atomic_torch_save
    home = home or rundir.home()
    notes = list(found["notes"])
    tokenizer = load_tokenizer(found["tokenizer"])
    tok_digest = file_digest(found["tokenizer"])
    loaded, config0 = [], None
    for ck in found["checkpoints"]:
        meta = read_meta(ck["meta"])
        config = model_config_from_meta(meta, ck["meta"], notes)
        if config["vocab_size"] != tokenizer.get_vocab_size():
            raise InteropError(f"{found['tokenizer']}: {tokenizer.get_vocab_size()} tokens, but {ck['meta']} has "
                               f"model_config.vocab_size {config['vocab_size']}")
        state = load_state(ck["model"], ck["meta"], config, notes)
        digests = {"model": file_digest(ck["model"]), "meta": file_digest(ck["meta"])}
        loaded.append((ck, meta, config, state, digests))
        config0 = config0 or config
    token_bytes = os.path.join(os.path.dirname(found["tokenizer"]), "token_bytes.pt")
    if os.path.exists(token_bytes):
        try:
            theirs = torch.load(token_bytes, map_location="cpu", weights_only=True)
            if not torch.equal(theirs.to(torch.int32), tokenizer.token_bytes()):
                notes.append(f"{token_bytes}: differs from the raw byte lengths of the tokens (an older nanochat "
                             f"counted through str); nanorun's bits per byte use the raw lengths")
        except Exception:
            notes.append(f"{token_bytes}: unreadable, recomputed from the tokenizer")

    stages = []
    tok_key = _key("tok_train", tokenizer=tok_digest)

    def fill_tokenizer(tmp):
        tokenizer.save(os.path.join(tmp, "tokenizer"))
        rundir.write_result(tmp, "tok_train", {"vocab_size": tokenizer.get_vocab_size()},
                            outputs={"tokenizer_dir": os.path.join(rundir.stage_dir("tok_train", tok_key, home),
                                                                   "tokenizer")},
                            imported={"format": "nanochat", "file": found["tokenizer"], "sha256": tok_digest})

    directory, reused = _write_stage("tok_train", tok_key, home, fill_tokenizer)
    stages.append({"stage": "tok_train", "key": tok_key, "dir": directory, "reused": reused})
    for ck, meta, config, state, digests in loaded:
        stage, step = ck["stage"], ck["step"]
        key = _key(stage, upstream=tok_key, step=step, **digests)
        final = rundir.stage_dir(stage, key, home)

        def fill_checkpoint(tmp, ck=ck, meta=meta, config=config, state=state, digests=digests, stage=stage,
                            step=step, final=final):
            ckpt = os.path.join(tmp, "checkpoints")
            new_meta = {**meta, "step": step, "model_config": config, "world_size": 1,
                        "imported": {"format": "nanochat", "source": ck["source"], "model": ck["model"],
                                     "meta": ck["meta"], **{f"{k}_sha256": v for k, v in digests.items()}}}
            if stage in rundir.CHAT_STAGES:
                new_meta["stage"] = stage
            atomic_torch_save(state, rundir.model_path(ckpt, step))
            rundir.atomic_write_json(rundir.meta_path(ckpt, step), new_meta)
            metrics = {"step": step, "depth": config["n_layer"],
                       "params_total": sum(t.numel() for t in state.values())}
            if isinstance(meta.get("val_bpb"), (int, float)):
                metrics["val_bpb"] = float(meta["val_bpb"])
            rundir.write_result(tmp, stage, metrics,
                                outputs={"checkpoint_dir": os.path.join(final, "checkpoints"), "last_step": step},
                                imported=new_meta["imported"])

        directory, reused = _write_stage(stage, key, home, fill_checkpoint)
        stages.append({"stage": stage, "key": key, "dir": directory, "reused": reused, "step": step,
                       "source": ck["source"], "meta": meta})
    for s in stages:
        echo(f"[{s['stage']}] {'already imported' if s['reused'] else 'imported'}: {s['dir']}")
    return {"stages": stages, "model_config": config0, "notes": notes,
            "digests": {"tokenizer": tok_digest, **{ck["source"]: d for ck, _, _, _, d in loaded}}}
