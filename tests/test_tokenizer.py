"""Tokenizer (train with HF tokenizers, encode with tiktoken), chat rendering, and the tok_train stage."""

import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

WORDS = ("the of and to in is was that for on with as by at from his her they have which this be "
         "river king ship whale island government people nation sea night morning letter garden "
         "running walked spoke quickly however because although question answer").split()
VOCAB = 256 + 9 + 300


def make_text(seed, n_sentences):
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        s = " ".join(words).capitalize()
        if rng.random() < 0.2:
            s += f" in {rng.randint(1000, 2099)}, {rng.randint(1, 99)}%"
        sentences.append(s + rng.choice([".", "!", "?", "...", ";"]))
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tok():
    texts = [make_text(i, 40) for i in range(60)] + ["caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \U0001f600\r\n"] * 5
    return train_tokenizer(iter(texts), VOCAB)


def test_vocab_size_and_specials(tok):
    assert tok.get_vocab_size() == VOCAB
    n = VOCAB - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert tok.get_bos_token_id() == n
    with pytest.raises(KeyError):
        tok.encode_special("<|nope|>")
    # special-token text in ordinary text is NOT turned into the special id
    assert tok.get_bos_token_id() not in tok.encode("<|bos|> hi")
    assert tok.decode([tok.get_bos_token_id()]) == "<|bos|>"


@pytest.mark.parametrize("text", [
    "", "hello world", "The whale, in 1851, was 42% larger!", "caf\u00e9 \u4f60\u597d \U0001f916\U0001f600 emoji",
    "line one\r\nline two\r\n\r\n\ttabbed   spaces  ", "\x00\x01 control \xff bytes", "don't they'll we've I'M",
])
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_single_bytes_are_ranked_by_value(tok):
    for b in (0, 10, 65, 200, 255):
        assert tok.enc.decode_single_token_bytes(b) == bytes([b])
    # an unseen byte still encodes (the full byte alphabet is always present)
    assert tok.decode(tok.encode("\u0394\u0416")) == "\u0394\u0416"


def test_ids_identical_to_hf_tokenizer(tok, tmp_path):
    tok.save(str(tmp_path))
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(7)
    held_out = [make_text(1000 + i, 30) for i in range(20)]
    held_out += ["".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FFF), rng.randint(0x1F300, 0x1F64F)]))
                         for _ in range(rng.randint(1, 40))) for _ in range(300)]
    held_out += ["  leading\n\n\nnewlines\r\n 123456789 x"]
    mismatches = [t for t in held_out if tok.encode(t) != hf.encode(t).ids]
    assert mismatches == []
    assert len(hf.get_vocab()) == VOCAB
    assert hf.token_to_id("<|assistant_end|>") == tok.encode_special("<|assistant_end|>")


def test_save_load_and_token_bytes(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        Tokenizer.from_directory(str(tmp_path / "missing"))
    tok.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.pt", "tokenizer.json", "tokenizer.pkl"]
    loaded = Tokenizer.from_directory(str(tmp_path))
    text = make_text(99, 20)
    assert loaded.encode(text) == tok.encode(text)
    tb = torch.load(tmp_path / "token_bytes.pt")
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert torch.equal(tb, tok.token_bytes())
    assert tb[:256].tolist() == [1] * 256
    assert tb[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    # raw byte length, not the length of the decoded str
    for i in range(256, VOCAB - len(SPECIAL_TOKENS)):
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i))
    assert sum(tb[t].item() for t in tok.encode(text)) == len(text.encode())


def test_prepend_append_and_batch(tok):
    bos = tok.get_bos_token_id()
    ids = tok.encode("the river", prepend="<|bos|>", append=tok.encode_special("<|user_end|>"))
    assert ids[0] == bos and ids[-1] == tok.encode_special("<|user_end|>")
    assert ids[1:-1] == tok.encode("the river")
    texts = [make_text(i, 3) for i in range(10)]
    batch = tok.encode(texts, prepend=bos, num_threads=2)
    assert batch == [[bos] + tok.encode(t) for t in texts]
    assert "".join(tok.id_to_token(t) for t in tok.encode(" the river")) == " the river"
    assert tok.id_to_token(tok.encode(" the")[0]) == " the"  # a frequent word is a single token


def test_render_conversation_masks(tok):
    sp = {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    assert ids[0] == sp["<|bos|>"] and mask[0] == 0
    # system merged into the first user message
    u0, u1 = ids.index(sp["<|user_start|>"]), ids.index(sp["<|user_end|>"])
    assert tok.decode(ids[u0 + 1:u1]) == "Be brief.\n\nWhat is 2+2?"
    assert set(mask[:u1 + 1]) == {0}
    # python call supervised, tool output not
    p0, p1 = ids.index(sp["<|python_start|>"]), ids.index(sp["<|python_end|>"])
    assert set(mask[p0:p1 + 1]) == {1}
    o0, o1 = ids.index(sp["<|output_start|>"]), ids.index(sp["<|output_end|>"])
    assert set(mask[o0:o1 + 1]) == {0} and tok.decode(ids[o0 + 1:o1]) == "4"
    a_start = [i for i, t in enumerate(ids) if t == sp["<|assistant_start|>"]]
    a_end = [i for i, t in enumerate(ids) if t == sp["<|assistant_end|>"]]
    assert all(mask[i] == 0 for i in a_start) and all(mask[i] == 1 for i in a_end)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == \
        "Let me compute.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>Welcome<|assistant_end|>"
    short_ids, short_mask = tok.render_conversation(conv, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]


def test_render_errors_and_completion(tok):
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prompt = tok.render_for_completion(conv)
    full, _ = tok.render_conversation(conv)
    assert prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert full[:len(prompt)] == prompt
    assert conv["messages"][-1]["content"] == "hello"  # the input is not mutated
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_tok_train_stage(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):  # two train shards, the last is val
        texts = [make_text(100 * k + i, 20) for i in range(50)]
        pq.write_table(pa.table({"text": texts}), data / f"shard_{k:05d}.parquet", row_group_size=16)
    out = tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": str(data), "out_dir": str(out), "vocab_size": 400,
                                  "max_chars": 10**9, "doc_cap": 300}))
    env = dict(os.environ, NANORUN_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "nanochat.stages.tok_train", "--config", str(config),
                           "--vocab-size", "500", "--max-chars", "20000"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    m = result["metrics"]
    assert m["vocab_size"] == 500  # the flag overrides the config
    assert 20000 <= m["train_chars"] < 20000 + 300  # stopped at max_chars, docs cropped at doc_cap
    assert m["bytes_per_token"] > 1.5
    tok = Tokenizer.from_directory(result["outputs"]["tokenizer_dir"])
    assert tok.get_vocab_size() == 500
    kinds = [json.loads(line)["kind"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "status" and "metric" in kinds

    missing = subprocess.run([sys.executable, "-m", "nanochat.stages.tok_train", "--data-dir", str(tmp_path / "nope"),
                              "--out-dir", str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
