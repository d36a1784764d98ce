"""Tests of the SFT stage: generated sources render with the right masks, packing invariants, token-weighted
loss across micro-batches, a tiny end-to-end run in a subprocess (offline: chitchat off) and an exact mid-run
resume from a periodic checkpoint.

    .venv/bin/pytest tests/test_sft.py -q
"""

import json
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from nanochat import sft_data
from nanochat.stages.sft import accumulate_step, lr_multiplier
from nanochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_directory(tiny_tokenizer_dir)


def _supervised_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_identity_uses_spec_strings_and_masks_only_the_assistant(tok):
    convs = sft_data.identity_conversations("Zorp", "Acme Labs")
    assert len(convs) > 10
    text = json.dumps(convs)
    assert "Zorp" in text and "Acme Labs" in text and "nanorun" not in text
    ids, mask = tok.render_conversation(convs[0])
    assert ids[0] == tok.get_bos_token_id() and mask[0] == 0
    supervised = _supervised_text(tok, ids, mask)
    assert convs[0]["messages"][1]["content"] in supervised
    assert convs[0]["messages"][0]["content"] not in supervised   # the user's words are never targets
    assert ids[-1] == tok.special_tokens["<|assistant_end|>"] and mask[-1] == 1


def test_arithmetic_uses_the_calculator_and_is_correct(tok):
    convs = sft_data.arithmetic_conversations(50, seed=3)
    assert convs == sft_data.arithmetic_conversations(50, seed=3)  # deterministic
    for conv in convs:
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        assert str(eval(parts[1]["text"])) == parts[2]["text"]     # the tool output is the true value
        assert parts[2]["text"] in parts[3]["text"]
    ids, mask = tok.render_conversation(convs[0])
    sp = tok.special_tokens
    i_ps, i_pe = ids.index(sp["<|python_start|>"]), ids.index(sp["<|python_end|>"])
    i_os, i_oe = ids.index(sp["<|output_start|>"]), ids.index(sp["<|output_end|>"])
    assert all(mask[i_ps:i_pe + 1])                  # the model writes the tool call
    assert not any(mask[i_os:i_oe + 1])              # the tool's output is given, not learned
    assert tok.decode(ids[i_os + 1:i_oe]) == convs[0]["messages"][1]["content"][2]["text"]


def test_spelling_counts_with_str_count(tok):
    convs = sft_data.spelling_conversations(200, seed=1)
    tool = [c for c in convs if isinstance(c["messages"][1]["content"], list)]
    plain = [c for c in convs if isinstance(c["messages"][1]["content"], str)]
    assert tool and plain
    for conv in tool:
        parts = conv["messages"][1]["content"]
        assert ".count(" in parts[1]["text"] and str(eval(parts[1]["text"])) == parts[2]["text"]
    for conv in convs:
        tok.render_conversation(conv)  # every one renders (alternating roles, known part types)


def test_chitchat_reader_alternates_roles(tmp_path, tok):
    """A fake wheel in the real layout: consecutive messages of one sender merge; odd tails are dropped."""
    chat = lambda s, t: {"text": t, "sender": s, "timestamp": "x"}  # noqa: E731
    data = {"b": {"messages": [[chat("u1", "hi")], [chat("u2", "hey"), chat("u2", "how are you")],
                               [chat("u1", "good")]]},
            "a": {"messages": [[chat("u1", "alone")]]}}
    wheel = tmp_path / "chitchat_dataset-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("chitchat_dataset/dataset.json", json.dumps(data))
    convs = sft_data.chitchat_conversations(str(wheel))
    assert convs == [{"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hey\nhow are you"}]}]
    tok.render_conversation(convs[0])


def test_packing_invariants(tok):
    convs = sft_data.arithmetic_conversations(40) + sft_data.identity_conversations()
    rendered = [tok.render_conversation(c, max_tokens=65) for c in convs]
    rows = sft_data.pack_rows(rendered, 65, tok.get_bos_token_id())
    assert all(len(ids) == 65 and len(mask) == 65 for ids, mask in rows)
    # no cropping: every conversation appears whole, exactly once; the rest is BOS padding with mask 0
    bos = tok.get_bos_token_id()
    flat = [t for ids, _ in rows for t in ids]
    assert len(flat) - flat.count(bos) == sum(len(ids) - ids.count(bos) for ids, _ in rendered)
    assert sum(m for _, mask in rows for m in mask) == sum(m for _, mask in rendered for m in mask)
    for ids, mask in rows:
        assert ids[0] == bos                       # every row starts at a conversation boundary
    with pytest.raises(ValueError, match="row length"):
        sft_data.pack_rows([([1] * 10, [1] * 10)], 5, bos)
    x, y = sft_data.rows_to_batch(rows[:3])
    assert x.shape == y.shape == (3, 64) and x.dtype == torch.int32 and y.dtype == torch.int64
    ids = torch.tensor([r[0] for r in rows[:3]])
    mask = torch.tensor([r[1] for r in rows[:3]])
    assert torch.equal(y[mask[:, 1:] == 1], ids[:, 1:][mask[:, 1:] == 1])
    assert (y[mask[:, 1:] == 0] == -1).all()


def test_loss_is_averaged_per_supervised_token_across_micro_batches():
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                                  window_pattern="L"))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # the reference init zeroes it: every token loss would be equal
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, 3:] = -1          # micro-batch 1: 3 supervised tokens; micro-batch 2: 16
    loss, n = accumulate_step(model, [(x[:1], y[:1]), (x[1:], y[1:])])
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = model(x, y)      # one batch: mean over all 19 supervised tokens
    ref.backward()
    assert n == 19
    assert torch.allclose(loss, ref.detach(), atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)
    # and it is not the per-micro-batch mean the reference uses
    per_micro = (model(x[:1], y[:1]) + model(x[1:], y[1:])) / 2
    assert abs(per_micro.item() - loss.item()) > 1e-3


def test_lr_schedule():
    assert lr_multiplier(0.0, 0.0, 0.5, 0.0) == 1.0
    assert lr_multiplier(0.5, 0.0, 0.5, 0.0) == 1.0
    assert lr_multiplier(0.75, 0.0, 0.5, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(1.0, 0.0, 0.5, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def base_checkpoint(tiny_tokenizer_dir, tmp_path_factory):
    """A depth-1 base model trained a few steps on the tiny tokenizer's vocabulary, saved WITH its optimizer
    state (as base_train saves it) so SFT warm-starts from it."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = build_model(config)
    opt = model.setup_optimizer(embedding_lr=0.3, unembedding_lr=0.01, matrix_lr=0.02)
    for _ in range(3):
        x = torch.randint(0, tok.get_vocab_size(), (2, 32))
        model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    directory = str(tmp_path_factory.mktemp("sft_base") / "checkpoints")
    meta = {"model_config": vars(config), "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 512,
            "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.01, "matrix_lr": 0.02}, "model_tag": "d1"}
    save_checkpoint(directory, 3, model.state_dict(), opt.state_dict(), meta)
    return directory


def _run_sft(tmp_path, config, extra=(), nproc=1, env=None):
    env = {**os.environ, "NANORUN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1", **(env or {})}
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nanochat.stages.sft", "--config", str(cfg), "--out-dir", str(out), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "nanochat.stages.sft", "--config", str(cfg), "--out-dir", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def _config(base_checkpoint, tiny_tokenizer_dir, **kw):
    # exactly the keys the runner writes: the sft options + device_type, seed and the upstream inputs
    from specs.schema import SFTOptions
    base = dict(chitchat_epochs=0, arithmetic_examples=120, spelling_examples=120, word_problem_examples=120,
                identity_epochs=4,
                max_seq_len=128, device_batch_size=4, total_batch_size=1024, eval_tokens=2048, eval_every=10,
                matrix_lr=0.04)
    opts = SFTOptions(**{**base, **kw}).model_dump()
    return {**opts, "device_type": "cpu", "seed": 0, "checkpoint_dir": base_checkpoint,
            "tokenizer_dir": tiny_tokenizer_dir}


@pytest.mark.slow
def test_sft_end_to_end(tmp_path, base_checkpoint, tiny_tokenizer_dir):
    from nanochat.checkpoint import load_model
    out, proc = _run_sft(tmp_path, _config(base_checkpoint, tiny_tokenizer_dir, num_iterations=30))
    assert "warm-started the optimizer" in proc.stdout and "'word_problems': {'train': 114" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    m = result["metrics"]
    assert result["stage"] == "sft" and m["num_iterations"] == 30
    assert m["conversations"] > 200 and m["supervised_tokens"] > 0
    assert m["compute_dtype"] == "float32" and m["dtype_reason"].startswith("auto: CPU has no native bf16")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["compute_dtype"] for e in events if e.get("message") == "device"] == ["float32"]
    train = [e["values"] for e in events if e["kind"] == "metric" and "train/loss" in e["values"]]
    val = [e["values"] for e in events if e["kind"] == "metric" and "val/loss" in e["values"]]
    assert len(train) == 30 and len(val) == 4
    first = sum(e["train/loss"] for e in train[:3]) / 3
    last = sum(e["train/loss"] for e in train[-3:]) / 3
    assert last < first - 0.5, (first, last)               # the loss goes down
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    assert m["val_loss"] == pytest.approx(val[-1]["val/loss"])
    model, meta = load_model(result["outputs"]["checkpoint_dir"])
    assert meta["stage"] == "sft" and meta["step"] == 30
    assert model.config.sequence_len == 128


def test_sft_one_epoch_default_and_bad_batch(tmp_path, base_checkpoint, tiny_tokenizer_dir):
    cfg = _config(base_checkpoint, tiny_tokenizer_dir, eval_every=-1, arithmetic_examples=40, spelling_examples=40,
                  identity_epochs=1)
    out, proc = _run_sft(tmp_path, cfg, ["--load-optimizer", "0"])
    m = json.loads((out / "result.json").read_text())["metrics"]
    rows = int(proc.stdout.split(" rows of ")[0].rsplit(" ", 1)[1])
    assert m["num_iterations"] == max(1, rows // 8)  # one epoch: rows / (4 rows x 2 micro-steps)
    assert "warm-started" not in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "nanochat.stages.sft", "--checkpoint-dir", base_checkpoint,
                          "--tokenizer-dir", tiny_tokenizer_dir, "--out-dir", str(tmp_path / "bad"),
                          "--device-type", "cpu", "--total-batch-size", "1000", "--chitchat-epochs", "0"],
                         env={**os.environ, "NANORUN_HOME": str(tmp_path / "home")}, capture_output=True, text=True)
    assert bad.returncode != 0 and "not a multiple" in bad.stderr


@pytest.mark.slow
def test_sft_two_ranks_match_one_rank_with_accumulation(tmp_path, base_checkpoint, tiny_tokenizer_dir):
    """torchrun with gloo: 2 ranks x 1 micro-step train like 1 rank x 2 micro-steps (same rows, token-weighted
    loss over both ranks, sharded optimizer warm-started from a 1-rank checkpoint)."""
    def losses(out):
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        return [e["values"]["train/loss"] for e in events if e["kind"] == "metric" and "train/loss" in e["values"]]

    cfg = _config(base_checkpoint, tiny_tokenizer_dir, num_iterations=4, eval_every=-1)
    one, _ = _run_sft(tmp_path / "one", cfg)
    two, _ = _run_sft(tmp_path / "two", {**cfg, "total_batch_size": 1024}, nproc=2)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=2e-3)
    r1 = json.loads((one / "result.json").read_text())["metrics"]
    r2 = json.loads((two / "result.json").read_text())["metrics"]
    assert r2["world_size"] == 2 and r1["supervised_tokens"] == r2["supervised_tokens"]
    assert r1["val_loss"] == pytest.approx(r2["val_loss"], abs=2e-3)


def _losses(out):
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    metrics = [e for e in events if e["kind"] == "metric"]
    train = {e["step"]: e["values"]["train/loss"] for e in metrics if "train/loss" in e["values"]}
    val = {e["step"]: e["values"]["val/loss"] for e in metrics if "val/loss" in e["values"]}
    return train, val


@pytest.mark.slow
def test_sft_resumes_exactly_from_a_periodic_checkpoint(tmp_path, base_checkpoint, tiny_tokenizer_dir):
    """6 steps straight vs. a crash right after the step-3 checkpoint and a restart: identical losses (data order,
    optimizer state and schedules continue where they were), the same final weights and result."""
    import shutil

    from nanochat.checkpoint import list_steps, load_model
    cfg = _config(base_checkpoint, tiny_tokenizer_dir, num_iterations=6, eval_every=3, save_every=3)
    full, _ = _run_sft(tmp_path / "full", cfg)
    assert list_steps(str(full / "checkpoints")) == [3, 6]
    assert os.path.exists(full / "checkpoints" / "state_000003_rank0.pt")
    train, val = _losses(full)
    assert sorted(train) == list(range(6)) and sorted(val) == [0, 3, 6]

    resumed = tmp_path / "resumed" / "out"
    shutil.copytree(full, resumed)
    os.remove(resumed / "result.json")
    for f in os.listdir(resumed / "checkpoints"):
        if "000006" in f:
            os.remove(resumed / "checkpoints" / f)
    (resumed / "events.jsonl").write_text("")
    _, proc = _run_sft(tmp_path / "resumed", cfg)
    assert "resuming from step 3" in proc.stdout and "warm-started" not in proc.stdout
    train2, val2 = _losses(resumed)
    assert train2 == {s: v for s, v in train.items() if s >= 3}
    assert val2 == {s: v for s, v in val.items() if s >= 3}
    r1 = json.loads((full / "result.json").read_text())["metrics"]
    r2 = json.loads((resumed / "result.json").read_text())["metrics"]
    assert r2["resumed_from"] == 3 and r1["supervised_tokens"] == r2["supervised_tokens"]
    assert r1["train_loss"] == r2["train_loss"] and r1["val_loss"] == r2["val_loss"]
    a, meta = load_model(str(full / "checkpoints"))
    b, _ = load_model(str(resumed / "checkpoints"))
    assert meta["stage"] == "sft" and meta["step"] == 6
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_sft_in_fp16_scales_the_loss_and_checkpoints_the_scaler(tmp_path, base_checkpoint, tiny_tokenizer_dir):
    cfg = _config(base_checkpoint, tiny_tokenizer_dir, num_iterations=3, eval_every=-1, save_every=2,
                  arithmetic_examples=40, spelling_examples=40, identity_epochs=1)
    out, _ = _run_sft(tmp_path, cfg, env={"NANOCHAT_DTYPE": "float16"})
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e["values"] for e in events if e["kind"] == "metric" and "train/loss" in e["values"]]
    assert len(steps) == 3 and all(v["train/loss_scale"] > 1 and math.isfinite(v["train/loss"]) for v in steps)
    meta = json.loads((out / "checkpoints" / "meta_000002.json").read_text())
    assert meta["grad_scaler"]["scale"] == steps[1]["train/loss_scale"]
