"""CORE evaluation: rendering, spans, scoring with a deterministic model, batched == unbatched, bundle reading,
and a 2-rank torchrun run that must agree with one process."""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from nanochat import core_eval
from nanochat.core_eval import (CORE_TASKS, evaluate_core, evaluate_task, load_bundle, parse_core_yaml,
                                prepare_example, render_prompts, score_examples)


class ByteTokenizer:
    """Bytes 0-255 are tokens, 256 is BOS."""

    def get_bos_token_id(self):
        return 256

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids


class OracleModel(nn.Module):
    """Predicts the next byte of a fixed target text: at each position it finds the longest suffix (up to 16
    bytes) of the input that occurs in the target and puts logit 10 on the byte that follows it there."""

    def __init__(self, target):
        super().__init__()
        self.target = target.encode()
        self.forwards = 0

    def forward(self, idx):
        self.forwards += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, 257)
        for b in range(B):
            row = idx[b].tolist()
            for p in range(T):
                for n in range(min(16, p + 1), 0, -1):
                    window = row[p + 1 - n:p + 1]
                    if 256 in window:
                        continue
                    j = self.target.find(bytes(window))
                    if 0 <= j and j + n < len(self.target):
                        logits[b, p, self.target[j + n]] = 10.0
                        break
        return logits


class TinyCausalLM(nn.Module):
    """A random-init one-layer causal transformer: real, non-trivial logits for batching checks."""

    def __init__(self, vocab=257, dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(4096, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        B, T = idx.shape
        x = self.emb(idx) + self.pos(torch.arange(T))
        q, k, v = self.qkv(x).view(B, T, 3, 2, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        return self.head(x + y).float()


TOK = ByteTokenizer()
MC = {"type": "multiple_choice", "shots": 0, "delimiter": " "}
SCHEMA = {"type": "schema", "shots": 0, "delimiter": " "}
LM = {"type": "language_modeling", "shots": 0, "delimiter": " "}


def test_render_prompts_match_reference_templates():
    fewshot = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}]
    item = {"query": "Q2", "choices": ["x", "y"], "gold": 0}
    assert render_prompts(item, "multiple_choice", "\nAnswer: ", fewshot) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: x", "Q1\nAnswer: b\n\nQ2\nAnswer: y"]
    fewshot = [{"context_options": ["c0", "c1"], "continuation": "k", "gold": 0}]
    item = {"context_options": ["A cat", "A dog"], "continuation": "barks.", "gold": 1}
    assert render_prompts(item, "schema", " ", fewshot) == ["c0 k\n\nA cat barks.", "c0 k\n\nA dog barks."]
    fewshot = [{"context": "  ctx one ", "continuation": "one"}]
    item = {"context": " The sky is\n", "continuation": "blue"}
    assert render_prompts(item, "language_modeling", " ", fewshot) == [
        "ctx one one\n\nThe sky is", "ctx one one\n\nThe sky is blue"]
    with pytest.raises(ValueError, match="icl_task_type"):
        render_prompts(item, "generation", " ", [])


def test_spans_and_fewshot_sampling():
    items = [{"query": f"q{i}", "choices": ["red", "rose"], "gold": 0} for i in range(6)]
    rows, starts, ends = prepare_example(2, items, {**MC, "shots": 3, "delimiter": ": "}, TOK)
    picked = random.Random(1234 + 2).sample([0, 1, 3, 4, 5], 3)
    prefix = "".join(f"q{i}: red\n\n" for i in picked)
    assert rows[0] == TOK.encode(prefix + "q2: red", prepend=256)
    # "red" / "rose" share "r": the span starts after the common token prefix and ends at each row's end
    assert starts == [len(rows[0]) - 2] * 2 and ends == [len(rows[0]), len(rows[1])]
    rows, starts, ends = prepare_example(0, [{"context_options": ["ab", "xyz"], "continuation": "go", "gold": 0}],
                                         SCHEMA, TOK)
    assert [r[s:e] for r, s, e in zip(rows, starts, ends)] == [list(b" go")] * 2
    rows, starts, ends = prepare_example(0, [{"context": "hi", "continuation": "there"}], LM, TOK)
    assert len(rows) == 1 and rows[0][starts[0]:ends[0]] == list(b" there")  # the stripped delimiter is scored
    rows, starts, ends = prepare_example(0, [{"context": "hello world", "continuation": "ok"}], LM, TOK,
                                         max_seq_len=5)
    assert rows == [list(b"ld ok")] and (starts, ends) == ([2], [5])


def test_multiple_choice_scoring_with_oracle():
    model = OracleModel("The sky is blue. Grass is green. Snow is white.")
    items = [{"query": "The sky is", "choices": ["green.", "blue."], "gold": 1},
             {"query": "Grass is", "choices": ["green.", "white."], "gold": 0},
             {"query": "Snow is", "choices": ["white.", "blue."], "gold": 1}]  # gold deliberately wrong
    assert score_examples(model, TOK, items, MC, "cpu") == [True, True, False]
    assert evaluate_task(model, TOK, items, MC, "cpu") == pytest.approx(2 / 3)


def test_schema_scoring_with_oracle():
    model = OracleModel("the trophy did not fit in the suitcase because the trophy was too big.")
    items = [{"context_options": ["it did not fit because the suitcase", "it did not fit because the trophy"],
              "continuation": "was too big.", "gold": 1},
             {"context_options": ["it did not fit because the trophy", "it did not fit because the suitcase"],
              "continuation": "was too big.", "gold": 1}]
    assert score_examples(model, TOK, items, SCHEMA, "cpu") == [True, False]


def test_language_modeling_scoring_with_oracle():
    model = OracleModel("Paris is the capital of France. Rome, capital of Italy.")
    items = [{"context": "Paris is the capital of", "continuation": "France."},
             {"context": "Rome, capital of ", "continuation": "Italy."},  # context is trimmed
             {"context": "Rome, capital of", "continuation": "Spain."}]
    assert score_examples(model, TOK, items, LM, "cpu") == [True, True, False]
    # greedy must reproduce every token: one wrong byte at the end is a miss
    assert score_examples(model, TOK, [{"context": "Paris is the capital of", "continuation": "Francx"}],
                          LM, "cpu") == [False]


def _random_items(kind, n, seed):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]

    def phrase(k):
        return " ".join(rng.choice(words) for _ in range(k))
    if kind == "multiple_choice":
        return [{"query": phrase(rng.randint(2, 12)), "choices": [phrase(rng.randint(1, 4)) for _ in range(rng.randint(2, 4))],
                 "gold": 0} for _ in range(n)]
    if kind == "schema":
        return [{"context_options": [phrase(rng.randint(1, 6)) for _ in range(2)], "continuation": phrase(3),
                 "gold": rng.randint(0, 1)} for _ in range(n)]
    return [{"context": phrase(rng.randint(2, 10)), "continuation": rng.choice(words)} for _ in range(n)]


@pytest.mark.parametrize("kind", ["multiple_choice", "schema", "language_modeling"])
def test_batched_equals_one_example_per_forward(kind):
    model = TinyCausalLM().eval()
    items = _random_items(kind, 40, seed=len(kind))
    meta = {"type": kind, "shots": 2, "delimiter": " "}
    one_by_one = score_examples(model, TOK, items, meta, "cpu", batch_tokens=0)
    batched = score_examples(model, TOK, items, meta, "cpu", batch_tokens=4096)
    assert batched == one_by_one
    assert 0 < sum(one_by_one) < len(items) or kind == "language_modeling"
    # the token budget really packs several examples into one forward
    counter = OracleModel("x")
    score_examples(counter, TOK, items[:10], meta, "cpu", batch_tokens=100_000)
    assert counter.forwards == 1
    counter.forwards = 0
    score_examples(counter, TOK, items[:10], meta, "cpu", batch_tokens=0)
    assert counter.forwards == 10


def _random_gpt(seed=0, window_pattern="SL"):
    """A small real nanochat GPT (GQA, a sliding-window layer narrower than the prompts) with every weight
    perturbed, so no block is the identity (init zeroes the output projections) and the logits are far from flat."""
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=512, vocab_size=257, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
                       window_pattern=window_pattern)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_gpt_logit_positions_are_the_full_logits_at_those_positions():
    model = _random_gpt()
    idx = torch.randint(0, 257, (3, 40))
    rows, cols = torch.tensor([0, 0, 2, 1]), torch.tensor([0, 39, 17, 5])
    full = model(idx)
    assert full.shape == (3, 40, 257)                                  # default off: unchanged
    picked = model(idx, logit_positions=(rows, cols))
    assert picked.shape == (4, 257)
    torch.testing.assert_close(picked, full[rows, cols], rtol=1e-5, atol=1e-5)
    assert full.std() > 0.5                                            # real, varied logits


@pytest.mark.parametrize("kind", ["multiple_choice", "schema", "language_modeling"])
def test_fast_paths_match_reference_on_gpt(kind, monkeypatch):
    """The packed + head-only-where-scored path and the shared-prefix KV path give the same per-example answers,
    the same greedy hits and allclose span losses as one example per forward with full logits."""
    model = _random_gpt()
    prefix_calls = []
    model.register_forward_pre_hook(lambda m, a, kw: prefix_calls.append(kw.get("kv_cache") is not None),
                                    with_kwargs=True)
    items = _random_items(kind, 16, seed=7)
    meta = {"type": kind, "shots": 4, "delimiter": " "}
    ref, fast, packed_only = {}, {}, {}
    out_ref = score_examples(model, TOK, items, meta, "cpu", batch_tokens=0, details=ref)
    assert not any(prefix_calls)
    out_fast = score_examples(model, TOK, items, meta, "cpu", batch_tokens=2048, details=fast)
    out_packed = score_examples(model, TOK, items, meta, "cpu", batch_tokens=2048, shared_prefix=False,
                                details=packed_only)
    assert out_fast == out_ref and out_packed == out_ref
    for got in (fast, packed_only):
        for i, rows in ref.items():
            assert [h for _, h in got[i]] == [h for _, h in rows]
            assert [loss for loss, _ in got[i]] == pytest.approx([loss for loss, _ in rows], rel=1e-4, abs=1e-5)
    # multiple choice really took the shared-prefix path (KV-cache forwards); the others never do
    assert any(prefix_calls) == (kind == "multiple_choice")
    if kind == "multiple_choice":
        assert 0 < sum(out_ref) < len(items)                          # the choice is not trivial
        losses = [loss for rows in ref.values() for loss, _ in rows]
        assert max(losses) - min(losses) > 0.5


def test_shared_prefix_handles_single_token_and_empty_tails(monkeypatch):
    """Choices one token long are scored from the prefix's last logits alone (no tail forward); a choice equal to
    another's prefix still gets its own span."""
    monkeypatch.setattr(core_eval, "PREFIX_MIN_SAVED", 0)
    model = _random_gpt(seed=1)
    items = [{"query": "alpha beta gamma", "choices": ["x", "y", "z"], "gold": 1},
             {"query": "delta eps", "choices": ["ab", "abc", "b"], "gold": 0}]
    ref, fast = {}, {}
    assert score_examples(model, TOK, items, MC, "cpu", batch_tokens=0, details=ref) == \
        score_examples(model, TOK, items, MC, "cpu", details=fast)
    for i in ref:
        assert [loss for loss, _ in fast[i]] == pytest.approx([loss for loss, _ in ref[i]], rel=1e-4, abs=1e-5)


def test_parse_core_yaml_agrees_with_pyyaml():
    text = textwrap.dedent('''\
        # comment
        icl_tasks:
        -
          label: jeopardy
          dataset_uri: world_knowledge/jeopardy_all.jsonl # trailing comment
          num_fewshot: [10]
          icl_task_type: language_modeling
          continuation_delimiter: "\\nAnswer: "
        - label: copa
          dataset_uri: commonsense_reasoning/copa.jsonl
          num_fewshot: [0]
          icl_task_type: multiple_choice
          continuation_delimiter: ' # not a comment'
        ''')
    assert parse_core_yaml(text) == yaml.safe_load(text)["icl_tasks"]


def _write_bundle(root, tasks):
    """tasks: list of (label, uri, type, shots, delimiter, baseline, items)."""
    lines = ["icl_tasks:"]
    for label, uri, kind, shots, delim, _, items in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
        path = os.path.join(root, "eval_data", uri)
        if items is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.writelines(json.dumps(it) + "\n" for it in items)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline\n")
        f.writelines(f"{t[0]},x,{t[5]}\n" for t in tasks)


def test_load_bundle_and_evaluate_core(tmp_path):
    model = OracleModel("Paris is the capital of France. The sky is blue. Grass is green.")
    mc = [{"query": "The sky is", "choices": ["green.", "blue."], "gold": 1},
          {"query": "Grass is", "choices": ["green.", "blue."], "gold": 1}]
    lm = [{"context": "Paris is the capital of", "continuation": "France."}] * 3
    _write_bundle(tmp_path, [("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50, mc),
                             ("lambada_openai", "language_understanding/lambada_openai.jsonl",
                              "language_modeling", 1, " ", 0, lm),
                             ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " ", 50, None)])
    tasks = load_bundle(tmp_path)
    assert [(t["label"], t["shots"], t["baseline"], t["available"]) for t in tasks] == [
        ("copa", 0, 50.0, True), ("lambada_openai", 1, 0.0, True), ("winograd", 0, 50.0, False)]
    logged = []
    out = evaluate_core(model, TOK, tmp_path, "cpu", on_task=lambda label, r: logged.append(label))
    assert out["tasks"]["copa"] == {"accuracy": 0.5, "centered": 0.0, "n": 2}
    assert out["tasks"]["lambada_openai"]["accuracy"] == 1.0
    assert out["core_metric"] == pytest.approx(0.5)
    assert out["partial"] and "winograd" in out["missing"] and len(out["missing"]) == 20
    assert logged == ["copa", "lambada_openai"]
    assert evaluate_core(model, TOK, tmp_path, "cpu", max_per_task=1)["tasks"]["copa"]["n"] == 1
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        load_bundle(tmp_path / "nope")


def test_core_task_table_is_the_22_dclm_tasks():
    assert len(CORE_TASKS) == 22 and len({t[0] for t in CORE_TASKS}) == 22
    assert sum(t[3] for t in CORE_TASKS) == 10 * 14 + 3
    assert {t[2] for t in CORE_TASKS} == {"multiple_choice", "schema", "language_modeling"}


DIST_SCRIPT = '''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_core_eval import TinyCausalLM, ByteTokenizer, _random_items
from nanochat.common import compute_init
from nanochat.core_eval import evaluate_task
compute_init("cpu")
model = TinyCausalLM().eval()
items = _random_items("multiple_choice", 23, seed=5)
acc = evaluate_task(model, ByteTokenizer(), items, {"type": "multiple_choice", "shots": 1, "delimiter": " "}, "cpu")
import torch.distributed as dist
with open(sys.argv[2] + f"/acc{dist.get_rank()}.json", "w") as f:
    json.dump(acc, f)
dist.barrier()  # tear gloo down together: a rank exiting with the group alive can abort the other
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path):
    script = tmp_path / "dist_core.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "NANORUN_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), os.path.dirname(__file__), str(tmp_path)], check=True, env=env, timeout=120)
    model = TinyCausalLM().eval()
    items = _random_items("multiple_choice", 23, seed=5)
    single = evaluate_task(model, TOK, items, {"type": "multiple_choice", "shots": 1, "delimiter": " "}, "cpu")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"acc{rank}.json").read_text()) == pytest.approx(single)


# -----------------------------------------------------------------------------
# the base_eval stage, end to end in a subprocess, on a tiny real checkpoint


def _stage_inputs(tmp_path):
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import train_tokenizer

    text = ["The quick brown fox jumps over the lazy dog. " * 20, "Paris is the capital of France. " * 20,
            "Numbers 12 34 56 and words again and again. " * 20]
    tokenizer = train_tokenizer(iter(text), vocab_size=300)
    tokenizer.save(str(tmp_path / "tok"))
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=32, window_pattern="L")
    save_checkpoint(str(tmp_path / "ckpt"), 5, build_model(config).state_dict(), None,
                    {"step": 5, "model_config": dataclasses.asdict(config)})
    (tmp_path / "data").mkdir()
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        pq.write_table(pa.table({"text": [t * 3 for t in text] * 4}), tmp_path / "data" / name, row_group_size=4)
    mc = [{"query": f"Question {i}: the sky is", "choices": ["blue", "green", "red"], "gold": i % 3} for i in range(6)]
    lm = [{"context": f"Count {i}:", "continuation": "one two"} for i in range(4)]
    _write_bundle(tmp_path / "bundle", [
        ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50, mc),
        ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 2, " ", 0, lm)])


@pytest.mark.slow
def test_base_eval_stage_end_to_end(tmp_path):
    _stage_inputs(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "NANORUN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "nanochat.stages.base_eval", "--checkpoint-dir", str(tmp_path / "ckpt"),
           "--tokenizer-dir", str(tmp_path / "tok"), "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
           "--bundle-dir", str(tmp_path / "bundle"), "--device-batch-size", "2", "--split-tokens", "256",
           "--device-type", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    m = result["metrics"]
    assert result["stage"] == "base_eval" and m["core_tasks"] == 2 and m["core_partial"] is True
    assert 0 < m["val_bpb"] < 20 and 0 < m["train_bpb"] < 20 and m["num_samples"] == 15
    rows = (out / "core_000005.csv").read_text().splitlines()
    assert rows[0] == "Task,Accuracy,Centered" and rows[-1].startswith("CORE,,") and len(rows) == 4
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["kind"] == "eval"]
    assert {(e["task"], e["metric"]) for e in evals} >= {("copa", "accuracy"), ("copa", "centered"),
                                                          ("lambada_openai", "centered")}
    assert next(e for e in evals if e["task"] == "copa" and e["metric"] == "accuracy")["n"] == 6
    metric_names = {k for e in events if e["kind"] == "metric" for k in e["values"]}
    assert metric_names >= {"train/bpb", "val/bpb", "core/metric"}
    samples = [e for e in events if e["kind"] == "sample"]
    assert len(samples) == 15 and samples[0]["text"].startswith("The capital of France is")
    assert events[-1] == {**events[-1], "kind": "status", "status": "done"}


def test_base_eval_stage_bad_checkpoint_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanochat.stages.base_eval", "--checkpoint-dir",
                           str(tmp_path / "nope"), "--tokenizer-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"),
                           "--eval", "core"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NANORUN_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no checkpoint in" in proc.stderr
