"""
Inference engine: a KV cache, token sampling, batched streaming generation with the calculator tool, and
context-overflow trimming (reference section 10).

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                   # one token per sample per step; mask 0 = forced (tool output)
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)
    ids, kept = fit_conversation(tokenizer, messages, prompt_budget(model.config.sequence_len, 256))

The prompt is prefilled once at batch 1; its cache is copied into a num_samples-row decode cache, and every
step runs a single-token forward. A row stops at "<|assistant_end|>" (if the tokenizer has it) or "<|bos|>".
Tool use: tokens between <|python_start|> and <|python_end|> are decoded and given to use_calculator(); a
result is forced into the row as <|output_start|> str(result) <|output_end|> (mask 0: not sampled).
"""

import ast
import math
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# The calculator tool. Never eval(): the expression is parsed with `ast` and only a small tree of numbers,
# arithmetic and "literal".count("literal") is walked. ** is rejected (as the reference does) so that no
# expression can build a huge number; MAX_MAGNITUDE guards what multiplication can still reach.

MAX_EXPR_CHARS = 1000
MAX_MAGNITUDE = 10 ** 30
MAX_STRING_CHARS = 10_000

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class _Rejected(Exception):
    pass


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rejected(f"not a number: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("not finite")
    if abs(value) > MAX_MAGNITUDE:
        raise _Rejected("number too large")
    return value


def _string(node):
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        raise _Rejected("count() takes string literals only")
    if len(node.value) > MAX_STRING_CHARS:
        raise _Rejected("string too long")
    return node.value


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return _number(-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _number(_BINOPS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        return _string(node.func.value).count(_string(node.args[0]))   # "strawberry".count("r")
    raise _Rejected(f"{type(node).__name__} is not allowed")


def use_calculator(expr):
    """Evaluate a calculator expression the model wrote; the result (int or float) or None when rejected.
    Allowed: numbers, + - * / // %, unary minus, parentheses, and "text".count("t"). Commas are dropped
    first (the model writes 1,234). Rejected: **, names, calls other than .count on literals, attribute
    access, huge numbers, division by zero."""
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > MAX_EXPR_CHARS or "**" in expr:
        return None
    try:
        return _evaluate(ast.parse(expr, mode="eval"))
    except (_Rejected, SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


# -----------------------------------------------------------------------------
# Context overflow. A chat grows with every turn; a prompt that does not leave room for the reply inside the
# model's sequence_len is trimmed by dropping the OLDEST whole turns (BOS and the newest user turn stay), and
# only when the newest turn alone is too long is it cut from the left.

def prompt_budget(sequence_len, max_tokens):
    """Tokens a prompt may take so that prompt + max_tokens fits in sequence_len; at least half the context
    stays for the prompt (a longer reply is then cut at sequence_len by the engine)."""
    return max(sequence_len - (max_tokens or 0), sequence_len // 2, 1)


def trim_tokens(tokens, budget, bos=None, turn_start=None):
    """A token list cut to at most `budget` tokens. A leading `bos` is kept. With `turn_start` (the id of
    <|user_start|>), whole turns are dropped oldest first: the result restarts at the first turn_start that
    leaves it short enough. Without one, or when the last turn alone is too long, the oldest tokens go (and
    turn_start is put back at the front so the turn still reads as one)."""
    tokens = list(tokens)
    if len(tokens) <= budget:
        return tokens
    head = tokens[:1] if bos is not None and tokens and tokens[0] == bos else []
    if turn_start is not None:
        for i in range(len(head), len(tokens)):
            if tokens[i] == turn_start and len(head) + len(tokens) - i <= budget:
                return head + tokens[i:]
        head = head + [turn_start]
    keep = max(budget - len(head), 0)
    return head[:budget] + (tokens[-keep:] if keep else [])


def fit_conversation(tokenizer, conversation, budget):
    """Render a chat for the next assistant reply within `budget` tokens. conversation: {"messages": [...]}
    or the list, ending with the user's message (a trailing empty assistant placeholder is fine). The
    oldest user/assistant pairs are dropped until it fits (a leading system message is kept); returns
    (prompt_ids ending in <|assistant_start|>, the messages kept)."""
    messages = list(conversation["messages"] if isinstance(conversation, dict) else conversation)
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("fit_conversation: the conversation must end with a user message")
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        kept = system + turns
        ids = tokenizer.render_for_completion({"messages": kept + [{"role": "assistant", "content": ""}]})
        if len(ids) <= budget or len(turns) <= 1:
            break
        turns = turns[2:]   # the oldest user message and the assistant's answer to it
    if len(ids) > budget:   # the newest turn alone is too long: keep its end (the question is usually there)
        ids = trim_tokens(ids, budget, tokenizer.get_bos_token_id(), tokenizer.encode_special("<|user_start|>"))
    return ids, kept


class TextStream:
    """UTF-8 safe incremental decoding: push(token) returns the new text, or "" while the tokens so far end
    inside a multi-byte character (the decoded text then ends with U+FFFD, which is held back)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = []
        self.printed = 0    # characters of the decoded text already returned

    def push(self, token):
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self):
        """What is still held back once generation ended (an incomplete character decodes as U+FFFD)."""
        text = self.tokenizer.decode(self.tokens)
        rest, self.printed = text[self.printed:], len(text)
        return rest

    def text(self):
        return self.tokenizer.decode(self.tokens)


# -----------------------------------------------------------------------------

class KVCache:
    """k_cache/v_cache (L, B, T_max, Hkv, D); cache_seqlens int32 (B,) (one position for every row);
    prev_embedding (B, 1, C) holds the last token's normalized embedding for smear during decode."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=COMPUTE_DTYPE):
        self.n_layers = num_layers
        self.k_cache = torch.zeros(num_layers, batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.pos = 0    # == cache_seqlens[0], kept in Python so reading it never syncs with the device
        self.prev_embedding = None

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        c = model.config
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, model.lm_head.weight.device)

    def reset(self):
        self.cache_seqlens.zero_()
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self):
        return self.pos

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens
        self.pos += num_tokens

    def prefill(self, other):
        """Copy a (usually batch-1) cache's filled prefix into this one, broadcasting over rows."""
        pos = other.get_pos()
        if pos > self.k_cache.size(2):
            raise ValueError(f"KVCache.prefill: {pos} cached positions do not fit in length {self.k_cache.size(2)}")
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        self.pos = pos
        if other.prev_embedding is not None:
            B = self.k_cache.size(1)
            self.prev_embedding = other.prev_embedding.expand(B, -1, -1).clone()


def _sample_from_probs(probs, generator, block=256):
    """probs (B, V) -> ids (B, 1) by inverting the CDF with one uniform per row, in two levels: find the block
    of `block` entries holding the draw from the (B, V/block) block masses, then the entry inside it. A cumsum over
    the whole row is slow on CPU for B > 1 (~0.7 ms per row at V=32768); this reads probs once (a vectorized sum).
    Entries of probability 0 are never picked."""
    B, V = probs.shape
    nb = -(-V // block)
    if nb * block != V:
        probs = F.pad(probs, (0, nb * block - V))
    blocks = probs.view(B, nb, block)
    mass = blocks.sum(dim=-1).double()                                                    # (B, nb)
    cdf = mass.cumsum(dim=-1)
    u = torch.rand(B, 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)                         # (B, 1) block index
    inner = blocks.gather(1, b.unsqueeze(-1).expand(B, 1, block)).squeeze(1).double().cumsum(dim=-1)
    rest = (u - (cdf.gather(1, b) - mass.gather(1, b))).clamp_(min=0)                     # the draw inside block b
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 2 ** -40))    # rounding must not step past the block's mass
    return b * block + torch.searchsorted(inner, rest, right=True)


@torch.inference_mode()
def sample_next_token(logits, generator=None, temperature=1.0, top_k=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 is argmax; top_k restricts to the k best.
    Over the full vocabulary this inverts the CDF with ONE uniform per row (_sample_from_probs):
    torch.multinomial draws an exponential for every vocabulary entry (~1.2 ms per row at V=32768 on this CPU,
    more than the whole forward at batch 8). Same distribution; a given seed draws different tokens than
    torch.multinomial would."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)
        return idx.gather(1, choice)
    return _sample_from_probs(F.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1), generator)


# -----------------------------------------------------------------------------
# The single-token decode step for nanochat.gpt.GPT. It computes exactly what GPT.forward computes for T=1
# (same ops in the same order, so the same floats: tests/test_engine.py checks logits and greedy tokens against
# the full forward) minus the per-call overhead that dominates a ~30-op layer at batch 1 on CPU: module
# __call__ dispatch, per-step weight casts (a full copy of the model per token under bf16), scalar-parameter
# casts and the smear concatenation. Any other model (scripted test models, a compiled wrapper) gets
# model(ids, kv_cache=cache). Keep this in step with GPT.forward.

def decode_weights(model):
    """What decode_step reads, cast once per generate() call to the compute dtype, or None when `model` is
    not a nanochat GPT (the engine then calls the model itself)."""
    from nanochat.gpt import GPT  # noqa: PLC0415 (the engine also drives stand-in models in tests)
    if not isinstance(model, GPT):
        return None
    dt, t = COMPUTE_DTYPE, model.transformer

    def w(linear):
        return linear.weight.to(dt)

    layers = []
    for i, block in enumerate(t.h):
        a, m = block.attn, block.mlp
        layers.append({"q": w(a.c_q), "k": w(a.c_k), "v": w(a.c_v), "o": w(a.c_proj), "fc": w(m.c_fc),
                       "proj": w(m.c_proj), "ve_gate": w(a.ve_gate) if a.ve_gate is not None else None,
                       "ve": model.value_embeds[str(i)].weight if str(i) in model.value_embeds else None,
                       "window": model.window_sizes[i], "H": a.n_head, "Hkv": a.n_kv_head, "D": a.head_dim})
    lm_head = w(model.lm_head)
    return {"wte": t.wte.weight, "smear_gate": w(model.smear_gate), "lm_head": lm_head, "layers": layers,
            # (C, V) copy for batch 1: a row vector times this runs as a GEMM, ~2.3x faster on CPU than F.linear's
            # gemv over the (V, C) weight (bench/decode_speed.py); same math, other summation order
            "lm_head_t": lm_head[:model.config.vocab_size].t().contiguous(),
            # scalar parameters as Python floats, rounded to the compute dtype exactly as `.to(x.dtype)` does
            "resid": model.resid_lambdas.detach().to(dt).tolist(), "x0": model.x0_lambdas.detach().to(dt).tolist(),
            "smear_lambda": model.smear_lambda.detach().to(dt).item(),
            "backout_lambda": model.backout_lambda.detach().to(dt).item()}


@torch.inference_mode()
def decode_step(model, weights, ids, cache):
    """ids (B, 1) int64 -> logits (B, vocab_size) fp32 for the next position; writes k/v at cache.pos and
    advances the cache by one. `weights` from decode_weights(model)."""
    from nanochat.attention import attention  # noqa: PLC0415
    from nanochat.gpt import QK_SCALE, SOFTCAP, apply_rotary, norm  # noqa: PLC0415
    from nanochat.scaling import SMEAR_CHANNELS, VE_GATE_CHANNELS  # noqa: PLC0415
    B, pos = ids.size(0), cache.pos
    if pos + 1 > model.cos.size(1):
        raise ValueError(f"sequence too long: position {pos} + 1 tokens > rotary table {model.cos.size(1)}")
    cos, sin = model.cos[:, pos:pos + 1], model.sin[:, pos:pos + 1]                     # (1, 1, 1, D/2)
    x = norm(F.embedding(ids, weights["wte"]).to(COMPUTE_DTYPE))                           # (B, 1, C)
    gate = weights["smear_lambda"] * torch.sigmoid(F.linear(x[..., :SMEAR_CHANNELS], weights["smear_gate"]))
    prev = cache.prev_embedding
    x_new = x if prev is None else x + gate * prev.to(x.dtype).expand(B, 1, -1)
    cache.prev_embedding = x
    x = x0 = x_new
    x_backout = None
    for i, lw in enumerate(weights["layers"]):
        x = weights["resid"][i] * x + weights["x0"][i] * x0
        H, Hkv, D = lw["H"], lw["Hkv"], lw["D"]
        h = norm(x)
        q = F.linear(h, lw["q"]).view(B, 1, H, D)
        k = F.linear(h, lw["k"]).view(B, 1, Hkv, D)
        v = F.linear(h, lw["v"]).view(B, 1, Hkv, D)
        if lw["ve"] is not None:
            ve = F.embedding(ids, lw["ve"]).to(x.dtype)
            g = 3 * torch.sigmoid(F.linear(h[..., :VE_GATE_CHANNELS], lw["ve_gate"]))       # (B, 1, Hkv)
            v = v + g.unsqueeze(-1) * ve.view(B, 1, Hkv, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        y = attention(q, k, v, lw["window"], kv_cache=cache, layer_idx=i)
        x = x + F.linear(y.reshape(B, 1, -1), lw["o"])
        x = x + F.linear(F.relu(F.linear(norm(x), lw["fc"])).square(), lw["proj"])
        if i == len(weights["layers"]) // 2:
            x_backout = x
    if x_backout is not None:
        x = x - weights["backout_lambda"] * x_backout
    cache.advance(1)
    # the head reads 33.5 MB of fp32 weights per step at vocab 32768: pick the fastest layout of the same product
    # (bench/decode_speed.py; on the 2-core CPU F.linear took 2.7 ms at batch 1 and 3.5 ms at batch 8)
    h = norm(x)[:, 0]                                                                        # (B, C)
    if B == 1:
        logits = (h @ weights["lm_head_t"]).float()                        # (1, V) GEMM on the (C, V) copy: 1.2 ms
    else:
        head = weights["lm_head"][:model.config.vocab_size]
        logits = (head @ h.t()).t().contiguous().float()                   # (V, C) @ (C, B): 1.9 ms at batch 8
    return logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)    # = SOFTCAP * tanh(logits / SOFTCAP), in place


class RowState:
    """Per-sample generation state."""

    def __init__(self, tokens):
        self.tokens = list(tokens)   # prompt + generated so far
        self.forced = deque()        # tokens to emit next regardless of sampling (tool outputs)
        self.in_python = False       # between <|python_start|> and <|python_end|>
        self.python_tokens = []      # the calculator expression being written
        self.completed = False


def _special(tokenizer, name):
    """A special token's id, or None when the tokenizer does not have it (tool use is then off)."""
    try:
        return tokenizer.encode_special(name)
    except (KeyError, ValueError):
        return None


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        names = ("<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                 "<|user_start|>")
        self.special = {name: _special(tokenizer, name) for name in names}

    def _stop_tokens(self):
        stops = {self.tokenizer.get_bos_token_id()}
        if self.special["<|assistant_end|>"] is not None:
            stops.add(self.special["<|assistant_end|>"])
        return stops

    def _tool_step(self, row, token):
        """Advance a row's calculator state machine with the token it just emitted."""
        sp = self.special
        if sp["<|python_start|>"] is None or sp["<|output_start|>"] is None:
            return
        if token == sp["<|python_start|>"]:
            row.in_python, row.python_tokens = True, []
        elif token == sp["<|python_end|>"] and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([sp["<|output_start|>"], *self.tokenizer.encode(str(result)),
                                   sp["<|output_end|>"]])
        elif row.in_python:
            row.python_tokens.append(token)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yields (token_column, token_masks): lists of length num_samples per step; mask 1 = sampled,
        0 = forced (calculator output). Stops at max_tokens (sequence_len when None), at the end of the model's
        position table, or when every row hit a stop token. A prompt too long for the position table is
        trimmed with trim_tokens (oldest turns first) instead of failing."""
        if not tokens:
            raise ValueError("Engine.generate: the prompt must contain at least one token")
        model = self.model
        device = model.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        stops = self._stop_tokens()
        sequence_len = model.config.sequence_len
        max_positions = getattr(model, "rotary_seq_len", None) or 10 * sequence_len  # the model raises past it
        tokens = list(tokens)
        if len(tokens) >= max_positions:
            tokens = trim_tokens(tokens, prompt_budget(sequence_len, max_tokens), self.tokenizer.get_bos_token_id(),
                                 self.special["<|user_start|>"])

        # 1. prefill the prompt once at batch 1
        prefill_cache = KVCache.for_model(model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prefill_cache)[:, -1, :].expand(num_samples, -1)   # (num_samples, V)

        # 2. a decode cache for every sample, seeded with the prompt
        limit = sequence_len if max_tokens is None else len(tokens) + max_tokens
        cache = KVCache.for_model(model, num_samples, min(max(limit, len(tokens)), max_positions))
        cache.prefill(prefill_cache)
        del prefill_cache

        weights = decode_weights(model)   # None: a stand-in model, called as model(ids, kv_cache=cache)
        rows = [RowState(tokens) for _ in range(num_samples)]
        generated = 0
        while True:
            if max_tokens is not None and generated >= max_tokens:
                break
            if cache.get_pos() >= cache.k_cache.size(2) or all(r.completed for r in rows):
                break
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for row, tok in zip(rows, sampled):
                forced = bool(row.forced)
                nxt = row.forced.popleft() if forced else tok
                column.append(nxt)
                masks.append(0 if forced else 1)
                row.tokens.append(nxt)
                if nxt in stops:
                    row.completed = True
                self._tool_step(row, nxt)
            generated += 1
            yield column, masks
            if cache.get_pos() >= cache.k_cache.size(2) or all(r.completed for r in rows):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            if weights is not None:
                logits = decode_step(model, weights, ids, cache)
            else:
                logits = model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: returns (results, masks), per row the prompt + generated tokens without the stop
        token, and the matching masks (0 for prompt tokens and tool outputs)."""
        stops = self._stop_tokens()
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if tok in stops:
                    done[i] = True
                    continue
                results[i].append(tok)
                masks[i].append(mask)
            if all(done):
                break
        return results, masks
