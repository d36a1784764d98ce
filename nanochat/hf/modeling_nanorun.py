"""
nanorun's GPT (the nanochat architecture) as a Hugging Face transformers model, shipped with every
`nanorun export --format hf` directory and loaded with trust_remote_code=True:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(OUT)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=64)

The architecture, top to bottom (tensor shapes: B batch, T tokens, C = n_embd, H heads of D = C / H dims):
  x = rmsnorm(wte(ids))                                    parameter-free RMSNorm everywhere
  smear: x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1}     a cheap bigram signal
  x0 = x; for each layer i:
      x = resid_lambdas[i] * x + x0_lambdas[i] * x0
      attention on rmsnorm(x): q, k, v projections; on alternating layers (the last included) v gets a value
          embedding of the token ids, gated per head by 3 * sigmoid(ve_gate(x[:12])); rotary embeddings (base
          1e5, half-split, rotating by -theta), then RMSNorm of q and k times 1.2; causal softmax attention over a
          sliding window (S layers: a quarter of sequence_len, L layers: all of it; the last layer is L)
      MLP on rmsnorm(x): c_proj(relu(c_fc(x))^2)
      after layer n_layer // 2 the stream is remembered, and backout_lambda times it is subtracted at the end
  logits = 15 * tanh(lm_head(rmsnorm(x)) / 15), cut to vocab_size

The parameter names are nanorun's, so its state dict loads unchanged. generate() uses a KV cache (transformers'
DynamicCache, or any Cache passed as `cache`, `past_key_values` before transformers 5.2x): a step runs only the new
tokens against the cached keys and values, and the smear reads the previous token's embedding from input_ids, which
generation passes in full.
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanorun import NanorunConfig

# transformers 5.x renamed past_key_values to cache (outputs, forward and generate's kwargs): accept both
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def window_sizes(config):
    """Left attention window of each layer in tokens: a query sees itself and `window` keys before it."""
    T = config.sequence_len
    short = min(T, math.ceil(T / 4 / 128) * 128)
    pattern = config.window_pattern.upper()
    sizes = [T if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = T
    return sizes


def rotary(positions, head_dim, theta, dtype):
    """cos, sin of shape (B, T, 1, D/2) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos().to(dtype)[:, :, None, :], freqs.sin().to(dtype)[:, :, None, :]


def apply_rotary(x, cos, sin):
    """x (B, T, H, D): the first and second halves of each head are rotated as pairs."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention_mask_for(T, window, padding, device, past=0):
    """Boolean (B or 1, 1, T, past + T) mask for T queries at positions past.. past+T-1 over every key so far,
    True = attend; None when plain causal attention is exact (nothing cached, no padding, a window covering the
    sequence). padding: (B, past + T) with 0 at padded positions, or None."""
    if past == 0 and padding is None and window >= T - 1:
        return None
    i = torch.arange(past, past + T, device=device)[:, None]
    j = torch.arange(past + T, device=device)[None, :]
    mask = ((j <= i) & (i - j <= window))[None, None]
    if padding is not None:   # padded keys are hidden; every query still sees itself (no all-masked rows)
        mask = mask & (padding[:, None, None, :].bool() | (i == j))
    return mask


class Attention(nn.Module):
    def __init__(self, config, has_value_embedding):
        super().__init__()
        C, H, Hkv = config.n_embd, config.n_head, config.n_kv_head
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, C // H
        self.qk_scale, self.gate_channels = config.qk_scale, config.ve_gate_channels
        self.c_q = nn.Linear(C, H * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, Hkv * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, Hkv * self.head_dim, bias=False)
        self.c_proj = nn.Linear(H * self.head_dim, C, bias=False)
        self.ve_gate = nn.Linear(config.ve_gate_channels, Hkv, bias=False) if has_value_embedding else None

    def forward(self, x, ve, cos, sin, mask, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))       # (B, T, Hkv) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q) * self.qk_scale, rms_norm(k) * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)        # (B, heads, T, D)
        if cache is not None:   # the keys and values of every earlier position, then these
            k, v = cache.update(k, v, layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, has_value_embedding):
        super().__init__()
        self.attn = Attention(config, has_value_embedding)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache=None, layer_idx=0):
        x = x + self.attn(rms_norm(x), ve, cos, sin, mask, cache, layer_idx)
        return x + self.mlp(rms_norm(x))


def has_value_embedding(i, n_layer):
    return i % 2 == (n_layer - 1) % 2


class NanorunForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanorunConfig
    base_model_prefix = "nanorun"   # no submodule has this name: the weights keep nanorun's names
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        L, C, V = config.n_layer, config.n_embd, config.padded_vocab_size
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.windows = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([Block(config, has_value_embedding(i, L)) for i in range(L)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L)
                                           if has_value_embedding(i, L)})
        # from_pretrained overwrites all of these; the values here give a working model from a bare config
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass   # every tensor comes from the exported checkpoint (or the constructors above)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, cache=None, past_key_values=None, use_cache=None,
                return_dict=None, **kwargs):
        """input_ids (B, P + T): with a cache holding P positions only the last T are run (generation passes the
        whole sequence; the one before them feeds the smear). attention_mask covers all P + T positions."""
        config = self.config
        dtype = self.lm_head.weight.dtype
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        ids = input_ids[:, past:] if input_ids.size(1) > past else input_ids   # the new tokens
        B, T = ids.shape
        padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding = attention_mask
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]   # left padding: real tokens from 0
        else:
            positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = rotary(positions, config.n_embd // config.n_head, config.rope_theta, dtype)

        x = rms_norm(self.transformer.wte(ids).to(dtype))
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :config.smear_channels]))   # (B, T, 1)
        previous = x[:, :-1]
        if past > 0:   # the token before the new ones, from the full input_ids
            if input_ids.size(1) <= past:
                raise ValueError("with a KV cache, pass the whole sequence as input_ids (generate() does)")
            previous = torch.cat([rms_norm(self.transformer.wte(input_ids[:, past - 1:past]).to(dtype)), previous], 1)
        else:
            x_first, x = x[:, :1], x[:, 1:]
            gate = gate[:, 1:]
        if padding is not None:
            previous = previous * padding[:, -previous.size(1) - 1:-1, None].to(dtype)
        x = x + gate * previous
        if past == 0:
            x = torch.cat([x_first, x], dim=1)

        x0, x_backout = x, None
        masks = {w: attention_mask_for(T, w, padding, input_ids.device, past) for w in set(self.windows)}
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](ids).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self.windows[i]], cache, i)
            if i == config.n_layer // 2:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        logits = self.lm_head(rms_norm(x))[..., :config.vocab_size].float()
        logits = config.softcap * torch.tanh(logits / config.softcap)

        loss = None
        if labels is not None:   # transformers' convention: labels are the inputs, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, -T:][:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None, past_key_values=None,
                                      use_cache=True, **kwargs):
        # the whole sequence every step: forward runs only what the cache does not hold yet
        cache = cache if cache is not None else past_key_values
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_FIELD: cache, "use_cache": use_cache}
