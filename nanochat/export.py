"""
Export a nanorun checkpoint for other tools: safetensors weights with a JSON config, or a directory that Hugging
Face transformers loads (AutoModelForCausalLM with trust_remote_code=True, AutoTokenizer).

    export_checkpoint(ckpt_dir, step, tokenizer_dir, "out/d4-sft", fmt="hf", stage="sft")

    safetensors:  model.safetensors   the state dict, nanorun's names and dtypes (the config also in its metadata)
                  nanorun.json        model_config, architecture constants, tokenizer, chat special tokens, source
                  tokenizer.json      the tokenizer for the `tokenizers` library (same ids as nanorun's)
    hf:           model.safetensors, config.json (auto_map -> the two files below), configuration_nanorun.py,
                  modeling_nanorun.py (nanochat/hf/: written for nanorun, torch + transformers only),
                  tokenizer.json, tokenizer_config.json (with a chat template rendering conversations as nanorun's
                  engine does), special_tokens_map.json, generation_config.json

Neither format needs transformers or safetensors installed: the safetensors file is written here (an 8-byte
header length, a JSON header, raw little-endian tensor bytes). The output directory must not exist; everything is
written to a temporary sibling and renamed into place at the end, so a failed export leaves nothing behind.
"""

import json
import os
import shutil
import struct
import sys

import torch

from nanochat import rundir
from nanochat.interop import InteropError
from nanochat.scaling import SMEAR_CHANNELS, VE_GATE_CHANNELS, padded_vocab_size

FORMATS = ("safetensors", "hf")
HF_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
SAMPLING = {"temperature": 0.6, "top_k": 50}   # `nanorun chat`'s defaults

# -----------------------------------------------------------------------------
# safetensors (https://github.com/huggingface/safetensors#format)

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as a safetensors file; metadata: {str: str}."""
    if sys.byteorder != "little":
        raise InteropError(f"{path}: safetensors stores little-endian bytes; this machine is big-endian")
    header, offset, ordered = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise InteropError(f"{path}: tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        ordered.append(t)
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in ordered:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# What an export describes


def architecture(config):
    """model_config plus the constants nanorun's GPT fixes (nanochat.gpt), for a reader that rebuilds the model."""
    from nanochat.gpt import QK_SCALE, ROPE_BASE, SOFTCAP
    return {**config, "padded_vocab_size": padded_vocab_size(config["vocab_size"]), "rope_theta": float(ROPE_BASE),
            "qk_scale": QK_SCALE, "softcap": SOFTCAP, "ve_gate_channels": VE_GATE_CHANNELS,
            "smear_channels": SMEAR_CHANNELS}


# A Jinja chat template with the result of nanochat.tokenizer.render_for_completion / render_conversation: BOS, a
# leading system message folded into the first user message, strictly alternating user/assistant turns, assistant
# content as a string or a list of text / python / python_output parts.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "<|bos|>"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('conversation roles must alternate user/assistant, starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{{- (system if loop.first else '') + message['content'] -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def _hf_tokenizer_json(tokenizer):
    """tokenizer.json for the `tokenizers` library: nanorun's ids, and <|bos|> prepended when special tokens are
    added (every document the model saw started with it; the chat template writes its own)."""
    from tokenizers import processors
    hf = tokenizer.hf_tokenizer()
    bos = tokenizer.get_bos_token_id()
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    return hf.to_str()


def _config_json(config, tokenizer, chat, source):
    sp = tokenizer.special_tokens
    return {
        "format": "nanorun", "version": 1, "model_config": config, "architecture": architecture(config),
        "tokenizer": {"file": "tokenizer.json", "pattern": tokenizer.pattern, "vocab_size": tokenizer.get_vocab_size(),
                      "bos_token": "<|bos|>"},
        "special_tokens": dict(sp), "chat": chat,
        "stop_tokens": [sp["<|assistant_end|>"], sp["<|bos|>"]],
        "source": source,
    }


def _hf_config(config, tokenizer):
    sp = tokenizer.special_tokens
    arch = architecture(config)
    return {
        "architectures": ["NanorunForCausalLM"], "model_type": "nanorun",
        "auto_map": {"AutoConfig": "configuration_nanorun.NanorunConfig",
                     "AutoModelForCausalLM": "modeling_nanorun.NanorunForCausalLM"},
        **arch, "bos_token_id": sp["<|bos|>"], "eos_token_id": [sp["<|assistant_end|>"], sp["<|bos|>"]],
        "pad_token_id": sp["<|bos|>"], "tie_word_embeddings": False, "use_cache": True, "dtype": "float32",
    }


def _hf_tokenizer_files(config, tokenizer, chat):
    eos = "<|assistant_end|>" if chat else "<|bos|>"
    specials = {"bos_token": "<|bos|>", "eos_token": eos, "pad_token": "<|bos|>"}
    added = {str(tokenizer.special_tokens[name]): {"content": name, "lstrip": False, "rstrip": False,
                                                   "normalized": False, "single_word": False, "special": True}
             for name in tokenizer.get_special_tokens()}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "added_tokens_decoder": added,
                        "model_max_length": config["sequence_len"], "clean_up_tokenization_spaces": False,
                        "chat_template": CHAT_TEMPLATE}
    return tokenizer_config, specials


def _generation_config(tokenizer):
    sp = tokenizer.special_tokens
    return {"bos_token_id": sp["<|bos|>"], "eos_token_id": [sp["<|assistant_end|>"], sp["<|bos|>"]],
            "pad_token_id": sp["<|bos|>"], "do_sample": True, **SAMPLING, "use_cache": True}


# -----------------------------------------------------------------------------
# The export


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def load_checkpoint_state(ckpt_dir, step):
    """(state dict with nanorun's names and saved dtypes, meta) of one complete step."""
    steps = rundir.checkpoint_steps(ckpt_dir)
    if step not in steps:
        raise InteropError(f"{ckpt_dir}: no complete checkpoint at step {step} "
                           f"(have: {', '.join(map(str, steps)) or 'none'})")
    path = rundir.model_path(ckpt_dir, step)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise InteropError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:200]})") from None
    meta = rundir.read_json(rundir.meta_path(ckpt_dir, step))
    if not isinstance(meta.get("model_config"), dict):
        raise InteropError(f"{rundir.meta_path(ckpt_dir, step)}: no model_config")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}, meta


def export_checkpoint(ckpt_dir, step, tokenizer_dir, out, fmt, stage="base_train", source=None):
    """Write checkpoint `step` of `ckpt_dir` with the tokenizer in `tokenizer_dir` to the new directory `out` in
    format `fmt` (safetensors | hf). Returns the list of files written."""
    from nanochat.tokenizer import Tokenizer
    if fmt not in FORMATS:
        raise InteropError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise InteropError(f"{out}: already exists (an export writes a new directory; remove it or pick another)")
    state, meta = load_checkpoint_state(ckpt_dir, step)
    try:
        tokenizer = Tokenizer.from_directory(tokenizer_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise InteropError(str(e).splitlines()[0]) from None
    config = dict(meta["model_config"])
    if config.get("vocab_size") != tokenizer.get_vocab_size():
        raise InteropError(f"{tokenizer_dir}: {tokenizer.get_vocab_size()} tokens, but the checkpoint's "
                           f"model_config.vocab_size is {config.get('vocab_size')}")
    chat = stage in rundir.CHAT_STAGES or meta.get("stage") in rundir.CHAT_STAGES
    source = {**(source or {}), "stage": stage, "step": step, "checkpoint_dir": ckpt_dir}
    nanorun_json = _config_json(config, tokenizer, chat, source)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), state,
                          {"format": "pt", "nanorun": json.dumps(nanorun_json, sort_keys=True)})
        with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
            f.write(_hf_tokenizer_json(tokenizer))
        if fmt == "safetensors":
            _write_json(os.path.join(tmp, "nanorun.json"), nanorun_json)
        else:
            _write_json(os.path.join(tmp, "config.json"), _hf_config(config, tokenizer))
            for name in ("configuration_nanorun.py", "modeling_nanorun.py"):
                shutil.copyfile(os.path.join(HF_FILES, name), os.path.join(tmp, name))
            tokenizer_config, specials = _hf_tokenizer_files(config, tokenizer, chat)
            _write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config)
            _write_json(os.path.join(tmp, "special_tokens_map.json"), specials)
            _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(tokenizer))
        files = sorted(os.listdir(tmp))
        rundir.fsync_dir(tmp)
        if os.path.lexists(out):
            raise InteropError(f"{out}: appeared while exporting; the export was not written")
        os.rename(tmp, out)
        rundir.fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files
