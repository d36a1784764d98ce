"""
Inference engine: a KV cache, token sampling and batched streaming generation (reference section 10).

    engine = Engine(model, tokenizer)
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                   # one token per sample per step
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

The prompt is prefilled once at batch 1; its cache is copied into a num_samples-row decode cache, and every
step runs a single-token forward. A row stops at "<|assistant_end|>" (if the tokenizer has it) or "<|bos|>".
Forced tokens (a row's `forced` queue) are where tool outputs (the calculator, a later issue) will be injected.
"""

from collections import deque

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE


class KVCache:
    """k_cache/v_cache (L, B, T_max, Hkv, D); cache_seqlens int32 (B,) (one position for every row);
    prev_embedding (B, 1, C) holds the last token's normalized embedding for smear during decode."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=COMPUTE_DTYPE):
        self.n_layers = num_layers
        self.k_cache = torch.zeros(num_layers, batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        c = model.config
        return cls(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, model.lm_head.weight.device)

    def reset(self):
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self):
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens

    def prefill(self, other):
        """Copy a (usually batch-1) cache's filled prefix into this one, broadcasting over rows."""
        pos = other.get_pos()
        if pos > self.k_cache.size(2):
            raise ValueError(f"KVCache.prefill: {pos} cached positions do not fit in length {self.k_cache.size(2)}")
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is not None:
            B = self.k_cache.size(1)
            self.prev_embedding = other.prev_embedding.expand(B, -1, -1).clone()


@torch.no_grad()
def sample_next_token(logits, generator=None, temperature=1.0, top_k=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 is argmax; top_k restricts to the k best."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class RowState:
    """Per-sample generation state."""

    def __init__(self, tokens):
        self.tokens = list(tokens)   # prompt + generated so far
        self.forced = deque()        # tokens to emit next regardless of sampling (tool outputs)
        self.completed = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _stop_tokens(self):
        stops = {self.tokenizer.get_bos_token_id()}
        try:
            stops.add(self.tokenizer.encode_special("<|assistant_end|>"))
        except (KeyError, ValueError):
            pass
        return stops

    @torch.no_grad()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yields (token_column, token_masks): lists of length num_samples per step; mask 1 = sampled,
        0 = forced. Stops at max_tokens, at the model's sequence_len, or when every row hit a stop token."""
        if not tokens:
            raise ValueError("Engine.generate: the prompt must contain at least one token")
        model = self.model
        device = model.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        stops = self._stop_tokens()

        # 1. prefill the prompt once at batch 1
        prefill_cache = KVCache.for_model(model, 1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, kv_cache=prefill_cache)[:, -1, :].expand(num_samples, -1)   # (num_samples, V)

        # 2. a decode cache for every sample, seeded with the prompt
        limit = model.config.sequence_len if max_tokens is None else len(tokens) + max_tokens
        cache = KVCache.for_model(model, num_samples, max(limit, len(tokens)))
        cache.prefill(prefill_cache)
        del prefill_cache

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
                # (tool use hooks in here: watch for <|python_start|>/<|python_end|> and queue outputs)
            generated += 1
            yield column, masks
            if cache.get_pos() >= cache.k_cache.size(2):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: returns (results, masks), per row the prompt + generated tokens without the stop
        token, and the matching masks (0 for prompt tokens)."""
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
