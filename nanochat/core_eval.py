"""
The DCLM CORE metric (reference/nanochat.md section 9): 22 in-context-learning tasks scored by a base model,
each accuracy centered by its random baseline, CORE = mean of the centered scores.

Three task types (records as in the DCLM / llm-foundry bundle, see nanochat/core_bundle.py):
  multiple_choice   {query, choices[], gold}          one prompt per choice, lowest mean loss over the choice wins
  schema            {context_options[], continuation, gold}  one prompt per context, scored on the common suffix
  language_modeling {context, continuation}           correct only if greedy argmax reproduces every continuation token

Unlike the reference (one example per forward, full logits) we pack the rows of many examples into one right-padded
batch (pad = BOS) up to a token budget, run a multiple-choice example's shared few-shot prefix once with its choices
against the prefix's KV cache, and compute the vocabulary head only where a token is scored. A causal model makes
every row's scores independent of its batch neighbours and of padding, so the results equal one-example-at-a-time
scoring (tests/test_core_eval.py checks each path). Under torchrun ranks stride over examples and all-reduce.

    from nanochat.core_eval import evaluate_core
    out = evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=500)
    print(out["core_metric"], out["missing"])
"""

import csv
import inspect
import json
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

# label, dataset_uri (under eval_data/), icl_task_type, shots, continuation delimiter, random baseline %, items
CORE_TASKS = [
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, " ", 25.0, 10042),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: ", 0.0, 2117),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, " ", 0.0, 20321),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0, 2376),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0, 1172),
    ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50.0, 100),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, " ", 20.0, 1221),
    ("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50.0, 1838),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " ", 25.0, 500),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, " ", 0.0, 5153),
    ("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, " ", 25.0, 10042),
    ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " ", 50.0, 273),
    ("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, " ", 50.0, 1267),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, " ", 0.0, 1000),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, " ", 20.0, 230),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, " ", 0.0, 1320),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, " ", 0.0, 210),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, " ", 0.0, 32),
    ("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, " ", 0.0, 10570),
    ("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, " ", 0.0, 7983),
    ("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62.0, 3270),
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, " ", 9.1, 10000),
]
CORE_LABELS = [t[0] for t in CORE_TASKS]

# -----------------------------------------------------------------------------
# Bundle reading. core.yaml is parsed by a small reader for its flat shape (nanochat may not import yaml):
# icl_tasks: a list of mappings whose values are scalars or one-line [lists].


def _yaml_scalar(text):
    text = text.strip()
    if not text:
        return None
    if text[0] == '"':
        return json.loads(text)  # YAML double-quoted escapes (\n, \", \\) read the same as JSON's
    if text[0] == "'":
        return text[1:-1].replace("''", "'")
    if text[0] == "[":
        inner = text[1:-1].strip()
        return [_yaml_scalar(part) for part in inner.split(",")] if inner else []
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _strip_comment(line):
    """Drop a '# comment' that starts outside quotes (at the line start or after whitespace)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if quote == '"' and ch == "\\" and not escaped:
            escaped = True
            continue
        if quote is not None:
            if ch == quote and not escaped:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
        escaped = False
    return line


def parse_core_yaml(text, path="core.yaml"):
    """The icl_tasks list of a core.yaml as a list of dicts."""
    tasks, current, inside = [], None, False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and not body.startswith("-"):
            inside = body.startswith("icl_tasks:")
            continue
        if not inside:
            continue
        if body.startswith("-"):
            current = {}
            tasks.append(current)
            body = body[1:].strip()
            if not body:
                continue
        if current is None or ":" not in body:
            raise ValueError(f"{path}:{lineno}: cannot read core.yaml line {raw!r}")
        key, value = body.split(":", 1)
        current[key.strip()] = _yaml_scalar(value)
    return tasks


def load_bundle(bundle_dir):
    """Tasks of a CORE bundle directory: list of dicts with label, type, shots, delimiter,
    baseline (random baseline in percent), data (path of the jsonl) and available (the file exists)."""
    yaml_path = os.path.join(bundle_dir, "core.yaml")
    if not os.path.exists(yaml_path):
        raise FileNotFoundError(f"no CORE bundle at {bundle_dir}: core.yaml is missing "
                                "(build one with nanochat.core_bundle.build_offline_bundle or download_bundle)")
    with open(yaml_path, encoding="utf-8") as f:
        entries = parse_core_yaml(f.read(), yaml_path)
    baselines = {}
    csv_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    if os.path.exists(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                baselines[row["Eval Task"]] = float(row["Random baseline"])
    known = {t[0]: t for t in CORE_TASKS}
    tasks = []
    for entry in entries:
        label = entry["label"]
        if label in baselines:
            baseline = baselines[label]
        elif label in known:
            baseline = known[label][5]
        else:
            raise ValueError(f"{csv_path}: no 'Random baseline' for task {label!r}")
        shots = entry.get("num_fewshot", [0])
        data = os.path.join(bundle_dir, "eval_data", entry["dataset_uri"])
        tasks.append({"label": label, "type": entry["icl_task_type"],
                      "shots": int(shots[0] if isinstance(shots, list) else shots),
                      "delimiter": entry.get("continuation_delimiter", " "), "baseline": baseline,
                      "data": data, "available": os.path.exists(data)})
    return tasks


def load_items(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Rendering (the Jinja templates of the reference, written out): few-shot examples each end in a blank line.


def render_prompts(item, task_type, delimiter, fewshot):
    """The prompt strings for one example. MC: one per choice; schema: one per context option;
    LM: [prompt without continuation (stripped), prompt with continuation]."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{prefix}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{prefix}{item['context'].strip()}{delimiter}"
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown icl_task_type {task_type!r} (expected multiple_choice, schema or language_modeling)")


def _common_prefix_len(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix_len(seqs):
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        if any(s[-i] != seqs[0][-i] for s in seqs):
            return i - 1
    return n


def prepare_example(idx, items, task_meta, tokenizer, max_seq_len=None):
    """Token rows and scored spans of example idx: (rows, starts, ends), span [start, end) per row."""
    item = items[idx]
    shots = min(task_meta["shots"], len(items) - 1)  # fewer only when a tiny --max-per-task leaves too few
    fewshot = []
    if shots > 0:
        others = [i for i in range(len(items)) if i != idx]
        fewshot = [items[i] for i in random.Random(1234 + idx).sample(others, shots)]
    task_type = task_meta["type"]
    prompts = render_prompts(item, task_type, task_meta["delimiter"], fewshot)
    rows = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        start = _common_prefix_len(rows)
        starts, ends = [start] * len(rows), [len(r) for r in rows]
    elif task_type == "schema":
        suffix = _common_suffix_len(rows)
        starts, ends = [len(r) - suffix for r in rows], [len(r) for r in rows]
    else:
        without, with_cont = rows
        if with_cont[:len(without)] != without:
            raise ValueError(f"{task_meta.get('label', 'task')} example {idx}: the prompt without continuation "
                             "does not tokenize to a prefix of the prompt with it")
        rows, starts, ends = [with_cont], [len(without)], [len(with_cont)]
    if max_seq_len is not None:  # crop from the left, keeping the scored span at the end
        cropped = [max(0, len(r) - max_seq_len) for r in rows]
        rows = [r[c:] for r, c in zip(rows, cropped)]
        starts = [max(1, s - c) for s, c in zip(starts, cropped)]
        ends = [e - c for e, c in zip(ends, cropped)]
    return rows, starts, ends


# -----------------------------------------------------------------------------
# Scoring. Three paths, all giving the same per-row (mean CE over the span, greedy hit) up to float rounding:
#   reference      batch_tokens=0: one example per forward, full (B, T, V) logits (the reference's method)
#   packed         rows of many examples right-padded into one forward of at most batch_tokens tokens
#   shared prefix  multiple choice on our GPT: the choices' common prefix (the few-shot context and the query)
#                  runs once at batch 1 into a KV cache and only the short choice tails run as a batch against it
# With a model whose forward takes logit_positions (nanochat.gpt.GPT), the packed and shared-prefix paths run the
# lm_head (vocab 32768), softcap and CE only at the scored positions instead of over the whole prompt.
PREFIX_MIN_SAVED = 256   # tokens the shared prefix must save (prefix length x (choices - 1)) to be worth 2 forwards


def _takes_positions(model):
    return "logit_positions" in inspect.signature(model.forward).parameters


def _takes_kv_cache(model):
    return _takes_positions(model) and hasattr(model, "config") and hasattr(model, "lm_head")


def _span_scores(logits, targets, counts):
    """logits (N, V) at the scored positions, targets (N,), counts = positions per row -> [(mean CE, all hit)]."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none").cpu()
    hits = (logits.argmax(dim=-1) == targets).cpu()
    out, offset = [], 0
    for n in counts:
        if n == 0:
            out.append((float("inf"), False))
        else:
            out.append((losses[offset:offset + n].mean().item(), bool(hits[offset:offset + n].all())))
        offset += n
    return out


@torch.inference_mode()
def _score_rows(model, rows, spans, pad_id, device, select=False):
    """One forward over right-padded rows. Per row: (mean CE over its span, all argmax == targets).
    select=True asks the model for logits at the scored positions only (logit_positions)."""
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    idx = idx.to(device)
    # logits at position p predict token p+1: a span [s, e) is scored at positions s-1 .. e-2
    row_ix, pos_ix, counts = [], [], []
    for i, (s, e) in enumerate(spans):
        n = max(0, e - s)
        row_ix.extend([i] * n)
        pos_ix.extend(range(s - 1, e - 1))
        counts.append(n)
    row_t = torch.tensor(row_ix, dtype=torch.long, device=device)
    pos_t = torch.tensor(pos_ix, dtype=torch.long, device=device)
    if select:
        picked = model(idx, logit_positions=(row_t, pos_t))  # (N, V)
    else:
        picked = model(idx)[row_t, pos_t]  # (B, T, V) -> (N, V)
    return _span_scores(picked, idx[row_t, pos_t + 1], counts)


@torch.inference_mode()
def _score_shared_prefix(model, rows, spans, prefix_len, device):
    """Rows that share their first prefix_len tokens, every span starting at or after prefix_len. The prefix is
    prefilled once (batch 1) into a KV cache, copied to one cache row per choice, and the tails run as one batch
    (right-padded; a causal model never looks at the padding). Same result as scoring each full row."""
    from nanochat.engine import KVCache
    p, n = prefix_len, len(rows)
    tails = [r[p:] for r in rows]
    width = max(len(t) for t in tails)
    prefix_cache = KVCache.for_model(model, 1, p)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    ids = torch.tensor([rows[0][:p]], dtype=torch.long, device=device)
    last = model(ids, kv_cache=prefix_cache, logit_positions=(zero, zero + p - 1))  # (1, V): predicts token p
    # which logits score each target token t (s <= t < e): position t-1 = p-1 is the prefix's last one, the
    # others are tail positions t-1-p of that row's forward
    tail_rows, tail_cols, order, targets, counts = [], [], [], [], []
    for i, (s, e) in enumerate(spans):
        counts.append(max(0, e - s))
        for t in range(s, e):
            targets.append(rows[i][t])
            if t - 1 == p - 1:
                order.append(-1)
            else:
                order.append(len(tail_rows))
                tail_rows.append(i)
                tail_cols.append(t - 1 - p)
    picked = last.new_empty((len(order), last.size(-1)))
    first = torch.tensor([k for k, o in enumerate(order) if o < 0], dtype=torch.long, device=device)
    picked[first] = last.expand(len(first), -1)
    if tail_rows:
        cache = KVCache.for_model(model, n, p + width)
        cache.prefill(prefix_cache)
        idx = torch.full((n, width), rows[0][0], dtype=torch.long)   # pad with the BOS the rows start with
        for i, t in enumerate(tails):
            idx[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        rows_t = torch.tensor(tail_rows, dtype=torch.long, device=device)
        cols_t = torch.tensor(tail_cols, dtype=torch.long, device=device)
        rest = torch.tensor([k for k, o in enumerate(order) if o >= 0], dtype=torch.long, device=device)
        picked[rest] = model(idx.to(device), kv_cache=cache, logit_positions=(rows_t, cols_t))
    return _span_scores(picked, torch.tensor(targets, dtype=torch.long, device=device), counts)


def _shared_prefix_len(rows, starts):
    """Length of the prefix worth sharing (0 = not worth it): every span must start after it."""
    if len(rows) < 2:
        return 0
    p = min(_common_prefix_len(rows), min(starts))
    return p if p >= 1 and p * (len(rows) - 1) >= PREFIX_MIN_SAVED else 0


def _decide(task_type, item, scores):
    if task_type == "language_modeling":
        return scores[0][1]
    mean_losses = [s[0] for s in scores]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def score_examples(model, tokenizer, items, task_meta, device, max_seq_len=None, batch_tokens=8192,
                   indices=None, shared_prefix=True, details=None):
    """Correctness (list of bool) of the examples in `indices` (default all). batch_tokens=0 runs one
    example per forward with full logits, like the reference; otherwise examples are packed into forwards of at
    most batch_tokens padded tokens (an example larger than the budget still runs, alone), and, when the model
    supports it and shared_prefix is on, multiple-choice examples run their common prefix once (see above).
    details: an optional dict filled with {index: [(mean CE, all hit) per row]} (tests compare the paths)."""
    indices = list(range(len(items))) if indices is None else list(indices)
    bos = tokenizer.get_bos_token_id()
    prepared = {i: prepare_example(i, items, task_meta, tokenizer, max_seq_len) for i in indices}
    select = bool(batch_tokens) and _takes_positions(model)
    results = {}

    def decide(i, scores):
        results[i] = _decide(task_meta["type"], items[i], scores)
        if details is not None:
            details[i] = scores

    packed = indices
    if batch_tokens and shared_prefix and _takes_kv_cache(model):
        packed = []
        for i in indices:
            rows, starts, ends = prepared[i]
            p = _shared_prefix_len(rows, starts)
            if p:
                decide(i, _score_shared_prefix(model, rows, list(zip(starts, ends)), p, device))
            else:
                packed.append(i)

    # longest first so neighbours in a batch have similar lengths (little padding)
    order = sorted(packed, key=lambda i: -max(len(r) for r in prepared[i][0])) if batch_tokens else packed
    pending, pending_rows, width = [], 0, 0

    def flush():
        rows, spans = [], []
        for i in pending:
            r, s, e = prepared[i]
            rows.extend(r)
            spans.extend(zip(s, e))
        scores = _score_rows(model, rows, spans, bos, device, select)
        offset = 0
        for i in pending:
            n = len(prepared[i][0])
            decide(i, scores[offset:offset + n])
            offset += n

    for i in order:
        rows = prepared[i][0]
        new_width = max(width, max(len(r) for r in rows))
        if pending and (not batch_tokens or (pending_rows + len(rows)) * new_width > batch_tokens):
            flush()
            pending, pending_rows, new_width = [], 0, max(len(r) for r in rows)
        pending.append(i)
        pending_rows += len(rows)
        width = new_width
    if pending:
        flush()
    return [results[i] for i in indices]


def evaluate_task(model, tokenizer, items, task_meta, device, max_seq_len=None, batch_tokens=8192):
    """Accuracy of one task over `items` (already shuffled and truncated). task_meta: type, shots, delimiter."""
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(items), world))
    correct = torch.zeros(len(items), dtype=torch.float32, device=device)
    for i, ok in zip(mine, score_examples(model, tokenizer, items, task_meta, device, max_seq_len,
                                          batch_tokens, indices=mine)):
        correct[i] = float(ok)
    if world > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item() if len(items) else 0.0


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=-1, max_seq_len=None, batch_tokens=8192,
                  on_task=None):
    """Every available task of the bundle. Returns {"core_metric", "tasks": {label: {accuracy, centered, n}},
    "missing": [labels of the 22 CORE tasks not evaluated], "partial": fewer than the 22 evaluated}.
    on_task(label, result_dict) is called after each task (for logging)."""
    results = {}
    for task in load_bundle(bundle_dir):
        if not task["available"]:
            continue
        items = load_items(task["data"])
        random.Random(1337).shuffle(items)
        if max_per_task > 0:
            items = items[:max_per_task]
        accuracy = evaluate_task(model, tokenizer, items, task, device, max_seq_len, batch_tokens)
        base = 0.01 * task["baseline"]
        centered = (accuracy - base) / (1.0 - base)
        results[task["label"]] = {"accuracy": accuracy, "centered": centered, "n": len(items)}
        if on_task is not None:
            on_task(task["label"], results[task["label"]])
    missing = [label for label in CORE_LABELS if label not in results]
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"core_metric": core, "tasks": results, "missing": missing, "partial": bool(missing)}
