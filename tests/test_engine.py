"""Engine tests: temperature-0 engine output equals the model's naive full-recompute generate, sampling
reproducibility, first-token diversity across samples, stop tokens, max_tokens, KVCache.prefill.
Run: .venv/bin/pytest tests/test_engine.py"""

import torch

from nanochat.engine import Engine, KVCache, decode_step, decode_weights, sample_next_token
from nanochat.gpt import GPTConfig, build_model

VOCAB = 300
BOS, ASSISTANT_END = 290, 294


class ByteTokenizer:
    """Minimal stand-in with the interface the engine uses: bytes 0..255 plus a few specials."""

    specials = {"<|bos|>": BOS, "<|assistant_end|>": ASSISTANT_END}

    def get_bos_token_id(self):
        return BOS

    def encode_special(self, name):
        return self.specials[name]

    def encode(self, text, prepend=None):
        return ([prepend] if prepend is not None else []) + list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def get_vocab_size(self):
        return VOCAB


def random_model(seed=0, **kw):
    """A tiny model with every weight randomized (the reference init zeroes projections and nearly zeroes the
    head, which would make argmax ties likely and leave attention untested)."""
    cfg = dict(sequence_len=32, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    cfg.update(kw)
    model = build_model(GPTConfig(**cfg), "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.lm_head.weight.mul_(4)
    return model.eval()


def test_engine_temperature_zero_matches_naive_generate():
    model = random_model()
    engine = Engine(model, ByteTokenizer())
    for prompt in ([BOS, 5, 6, 7], [BOS] + list(range(40, 60))):
        naive = list(model.generate(prompt, max_tokens=25, temperature=0.0))
        cached = [col[0] for col, _ in engine.generate(prompt, max_tokens=25, temperature=0.0)]
        stop = next((i for i, t in enumerate(naive) if t in (BOS, ASSISTANT_END)), None)
        expected = naive if stop is None else naive[:stop + 1]
        assert cached == expected
        assert len(expected) >= 5


def test_decode_step_equals_full_forward():
    """The engine's single-token path computes GPT.forward's floats: value embeddings, smear (switched on),
    backout, and windows shorter than the context (sequence_len 16 with up to 35 cached positions). The KV cache
    is bit-identical; the logits differ only by the head's summation order (another matmul layout, faster)."""
    model = random_model(seed=8, n_layer=4, window_pattern="SSSL", sequence_len=16)
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    prefill = KVCache.for_model(model, 1, 10)
    with torch.no_grad():
        model(prompt, kv_cache=prefill)
    fast, slow = KVCache.for_model(model, 3, 40), KVCache.for_model(model, 3, 40)
    fast.prefill(prefill)
    slow.prefill(prefill)
    weights = decode_weights(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        ids = torch.randint(0, 256, (3, 1), generator=g)
        logits = decode_step(model, weights, ids, fast)
        with torch.no_grad():
            expected = model(ids, kv_cache=slow)[:, -1]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        assert torch.equal(fast.k_cache, slow.k_cache) and fast.get_pos() == slow.get_pos()
    assert fast.get_pos() == 35 and fast.cache_seqlens.tolist() == [35, 35, 35]
    assert decode_weights(torch.nn.Linear(2, 2)) is None    # other models are called as model(ids, kv_cache=...)


def test_decode_step_batch_one_matches_full_forward():
    """Batch 1 takes the transposed-head GEMM (another summation order): equal up to float rounding."""
    model = random_model(seed=9, n_layer=4, window_pattern="SSSL", sequence_len=16)
    fast, slow = KVCache.for_model(model, 1, 30), KVCache.for_model(model, 1, 30)
    weights = decode_weights(model)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        ids = torch.randint(0, 256, (1, 1), generator=g)
        logits = decode_step(model, weights, ids, fast)
        with torch.no_grad():
            expected = model(ids, kv_cache=slow)[:, -1]
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert logits.argmax() == expected.argmax()


def test_full_vocabulary_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -float("inf")]]).repeat(40000, 1)
    for temperature in (1.0, 2.0):
        ids = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=temperature)
        assert ids.shape == (40000, 1)
        freq = torch.bincount(ids[:, 0], minlength=5).float() / len(ids)
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        assert freq[4] == 0 and torch.allclose(freq, expected, atol=0.01), (freq, expected)
    one_hot = torch.full((3, 7), -float("inf"))
    one_hot[:, 6] = 0.0                                     # the last entry is the only possible one
    assert sample_next_token(one_hot, torch.Generator().manual_seed(0)).flatten().tolist() == [6, 6, 6]
    # a vocabulary of several sampling blocks (256) plus a remainder: every draw lands on an allowed entry,
    # in proportion to its probability
    logits = torch.full((20000, 1000), -float("inf"))
    allowed = torch.tensor([3, 255, 256, 700, 999])
    logits[:, allowed] = torch.tensor([0.0, 1.0, 0.5, 2.0, -1.0])
    ids = sample_next_token(logits, torch.Generator().manual_seed(1))[:, 0]
    assert set(ids.tolist()) == set(allowed.tolist())
    freq = torch.bincount(ids, minlength=1000)[allowed].float() / len(ids)
    assert torch.allclose(freq, torch.softmax(logits[0, allowed], dim=-1), atol=0.015), freq


def test_generate_batch_rows_agree_at_temp0_and_masks():
    model = random_model(seed=1)
    engine = Engine(model, ByteTokenizer())
    prompt = [BOS, 10, 11, 12]
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=0.0)
    assert results[0] == results[1] == results[2]
    assert masks[0][:4] == [0, 0, 0, 0] and all(m == 1 for m in masks[0][4:])
    assert results[0][:4] == prompt and len(results[0]) <= 14


def test_seeded_sampling_is_reproducible_and_first_tokens_differ():
    model = random_model(seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)      # flat distribution: samples must disagree
    engine = Engine(model, ByteTokenizer())
    a, _ = engine.generate_batch([BOS, 1, 2], num_samples=8, max_tokens=6, temperature=1.0, seed=7)
    b, _ = engine.generate_batch([BOS, 1, 2], num_samples=8, max_tokens=6, temperature=1.0, seed=7)
    c, _ = engine.generate_batch([BOS, 1, 2], num_samples=8, max_tokens=6, temperature=1.0, seed=8)
    assert a == b and a != c
    assert len({row[3] for row in a}) > 1     # the first sampled token is drawn independently per row


def test_stop_token_and_max_tokens():
    model = random_model(seed=3)
    with torch.no_grad():   # make <|assistant_end|> overwhelmingly likely after any token
        model.lm_head.weight.zero_()
        model.lm_head.weight[ASSISTANT_END] = 1.0
    engine = Engine(model, ByteTokenizer())
    cols = list(engine.generate([BOS, 3], num_samples=2, max_tokens=10, temperature=0.0))
    assert cols == [([ASSISTANT_END, ASSISTANT_END], [1, 1])]
    results, _ = engine.generate_batch([BOS, 3], num_samples=2, max_tokens=10, temperature=0.0)
    assert results == [[BOS, 3], [BOS, 3]]
    model2 = random_model(seed=4)
    n = len(list(Engine(model2, ByteTokenizer()).generate([BOS], max_tokens=4, temperature=1.0)))
    assert 1 <= n <= 4


def test_sample_next_token_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next_token(logits, g, temperature=1.0, top_k=2)
    assert set(ids.flatten().tolist()) == {1, 2}
    assert sample_next_token(logits[:1], g, temperature=0.0).item() == 1


def test_kv_cache_prefill_copies_prefix():
    src = KVCache(1, 2, 8, 4, 3, "cpu", torch.float32)
    src.k_cache.normal_()
    src.v_cache.normal_()
    src.advance(5)
    src.prev_embedding = torch.randn(1, 1, 16)
    dst = KVCache(4, 2, 12, 4, 3, "cpu", torch.float32)
    dst.prefill(src)
    assert dst.get_pos() == 5 and dst.prev_embedding.shape == (4, 1, 16)
    assert torch.equal(dst.k_cache[:, 3, :5], src.k_cache[:, 0, :5])
    assert dst.k_cache[:, :, 5:].abs().sum() == 0
    dst.reset()
    assert dst.get_pos() == 0 and dst.prev_embedding is None


# -----------------------------------------------------------------------------
# Calculator tool

from nanochat.engine import TextStream, fit_conversation, prompt_budget, trim_tokens, use_calculator  # noqa: E402


def test_calculator_arithmetic():
    assert use_calculator("1 + 2") == 3
    assert use_calculator("2 * (3 + 4) - 5") == 9
    assert use_calculator("-3 * -2") == 6
    assert use_calculator("7 / 2") == 3.5
    assert use_calculator("7 // 2") == 3 and use_calculator("7 % 4") == 3
    assert use_calculator("1,234 + 1") == 1235          # commas as the model writes thousands
    assert use_calculator("0.1 * 3") == 0.1 * 3
    assert use_calculator(' "strawberry".count("r") ') == 3
    assert use_calculator("'banana'.count('an') + 1") == 3


def test_calculator_rejections():
    rejected = [
        "2 ** 10", "2**100**100", "pow(2, 10)", "__import__('os').system('true')", "open('x')", "x + 1",
        "'a' * 5", "'abc'.upper()", "'abc'.count(x)", "(1).real", "[1, 2]", "1 if 1 else 2", "lambda: 1",
        "1 / 0", "5 % 0", "True + 1", "1 +", "", "   ", "1; 2", "9" * 40, "10" + "*99999999" * 5,
        "1e308 * 10", "'ab'.count('a', 1)", "().__class__", "1 << 1000", "(" * 500 + "1" + ")" * 500,
        "'x'.count('x') ** 2", "1 " * 600,
    ]
    for expr in rejected:
        assert use_calculator(expr) is None, expr


# -----------------------------------------------------------------------------
# The tool state machine, driven by a scripted model

class ScriptedModel(torch.nn.Module):
    """Emits `script[i]` as its i-th generated token (one-hot logits) whatever it is fed, and records every
    token fed to it; the engine must override the script with forced tool output."""

    def __init__(self, script, vocab, prompt_len, sequence_len=64):
        super().__init__()
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1,
                                n_embd=8)
        self.lm_head = torch.nn.Linear(8, vocab, bias=False)
        self.script, self.vocab, self.prompt_len, self.fed = list(script), vocab, prompt_len, []

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        self.fed.extend(idx[0].tolist())
        kv_cache.advance(T)
        i = kv_cache.get_pos() - self.prompt_len          # index of the token to emit next
        logits = torch.zeros(B, T, self.vocab)
        logits[:, -1, self.script[min(i, len(self.script) - 1)]] = 10.0
        return logits


def test_calculator_output_is_forced_with_mask_zero(tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    sp = tok.encode_special
    expr = tok.encode("1 + 2")
    filler = tok.encode("9")[0]            # what the model "wants" while the tool output is forced
    result = tok.encode("3")
    n_forced = 2 + len(result)
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>")] + [filler] * n_forced + [sp("<|assistant_end|>")]
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "add"},
                                                     {"role": "assistant", "content": ""}]})
    model = ScriptedModel(script, tok.get_vocab_size(), len(prompt))
    cols = list(Engine(model, tok).generate(prompt, max_tokens=30, temperature=0.0))
    tokens = [c[0] for c, _ in cols]
    masks = [m[0] for _, m in cols]
    k = len(expr) + 2
    assert tokens[:k] == script[:k] and masks[:k] == [1] * k
    assert tokens[k:k + n_forced] == [sp("<|output_start|>"), *result, sp("<|output_end|>")]
    assert masks[k:k + n_forced] == [0] * n_forced
    assert tokens[k + n_forced:] == [sp("<|assistant_end|>")] and masks[-1] == 1
    assert filler not in tokens
    assert model.fed[len(prompt):] == tokens[:-1]       # the model was fed the forced tokens
    assert "<|output_start|>3<|output_end|>" in tok.decode(tokens)
    # generate_batch keeps the forced tokens with mask 0 and drops the stop token
    model2 = ScriptedModel(script, tok.get_vocab_size(), len(prompt))
    results, batch_masks = Engine(model2, tok).generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0)
    assert results[0] == results[1] == prompt + tokens[:-1]
    assert batch_masks[0] == [0] * len(prompt) + masks[:-1]


def test_rejected_calculator_call_forces_nothing(tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode("2 ** 64"), sp("<|python_end|>"), *tok.encode("ok"),
              sp("<|assistant_end|>")]
    model = ScriptedModel(script, tok.get_vocab_size(), 1)
    cols = list(Engine(model, tok).generate([tok.get_bos_token_id()], max_tokens=30, temperature=0.0))
    assert [c[0] for c, _ in cols] == script
    assert all(m == [1] for _, m in cols)


# -----------------------------------------------------------------------------
# Context overflow

def test_trim_tokens_drops_oldest_whole_turns():
    U = 7   # turn start
    toks = [BOS, U, 1, 1, 1, U, 2, 2, U, 3, 3, 3]
    assert trim_tokens(toks, 20, BOS, U) == toks
    assert trim_tokens(toks, 10, BOS, U) == [BOS, U, 2, 2, U, 3, 3, 3]
    assert trim_tokens(toks, 7, BOS, U) == [BOS, U, 3, 3, 3]
    assert trim_tokens(toks, 4, BOS, U) == [BOS, U, 3, 3]                # last turn alone too long: cut left
    assert trim_tokens(toks, 5, BOS) == [BOS, U, 3, 3, 3]                # raw: just the newest tokens
    assert trim_tokens(list(range(10)), 3) == [7, 8, 9]
    assert prompt_budget(32, 8) == 24 and prompt_budget(32, 30) == 16 and prompt_budget(32, None) == 32


def test_fit_conversation_keeps_system_and_newest_user_turn(tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question number {i} about the river"},
                     {"role": "assistant", "content": f"answer {i} the king walked to the sea"}]
    messages.append({"role": "user", "content": "last question"})
    full, kept = fit_conversation(tok, messages, 10_000)
    assert kept == messages and full == tok.render_for_completion({"messages": messages + [
        {"role": "assistant", "content": ""}]})
    ids, kept = fit_conversation(tok, {"messages": messages}, len(full) - 5)
    assert len(ids) <= len(full) - 5
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and len(kept) == len(messages) - 2
    assert ids[0] == tok.get_bos_token_id() and ids[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.decode(ids).count("<|user_start|>") == 6
    ids, kept = fit_conversation(tok, messages, 12)            # only part of the newest turn fits
    assert len(ids) == 12 and kept == [messages[0], messages[-1]]
    assert ids[:2] == [tok.get_bos_token_id(), tok.encode_special("<|user_start|>")]
    assert tok.decode(ids).endswith("last question<|user_end|><|assistant_start|>")


def test_overflow_trimming_keeps_a_long_chat_generating():
    """A multi-turn token history grows far past sequence_len and past the model's position table (10x);
    trimming the oldest turns before each reply keeps every generation working."""
    USER_START = 295
    model = random_model(seed=5, sequence_len=16)
    engine = Engine(model, ByteTokenizer())
    history = [BOS]
    for turn in range(40):
        history += [USER_START] + [30 + turn % 50] * 5
        budget = prompt_budget(model.config.sequence_len, 6)
        prompt = trim_tokens(history, budget, BOS, USER_START)
        assert len(prompt) <= budget and prompt[0] == BOS and prompt[-6:] == history[-6:]
        reply = [c[0] for c, _ in engine.generate(prompt, max_tokens=6, temperature=0.0)]
        assert 1 <= len(reply) <= 6
        if turn % 10 == 9:   # the trimmed prompt still generates exactly what the naive model does
            naive = list(model.generate(prompt, max_tokens=len(reply), temperature=0.0))
            assert reply == naive
        history += reply
    assert len(history) > 10 * model.config.sequence_len
    # the untrimmed history is past the position table: the engine trims it itself rather than crash
    assert len(list(engine.generate(history, max_tokens=3, temperature=0.0))) >= 1


class NoStopTokenizer(ByteTokenizer):
    specials = {}

    def get_bos_token_id(self):
        return 10 ** 6   # never sampled


def test_engine_stops_at_the_position_table():
    model = random_model(seed=6, sequence_len=8)
    cols = list(Engine(model, NoStopTokenizer()).generate([BOS, 1, 2], max_tokens=500, temperature=0.0))
    assert len(cols) == 10 * 8 - 3     # the 80-position rotary table is full: stop instead of raising


def test_text_stream_holds_back_partial_utf8():
    text = "na\u00efve \u2603 caf\u00e9"
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in text.encode()]
    assert "".join(pieces) == text == stream.text()
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[text.encode().index("\u2603".encode()) + 1] == ""     # mid-character: nothing yet
    assert stream.flush() == ""
    cut = TextStream(ByteTokenizer())
    assert cut.push(ord("a")) == "a" and cut.push(0xE2) == "" and cut.flush() == "\ufffd"  # ended mid-character
