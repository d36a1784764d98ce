"""Tests of the RL stage: generated word problems (deterministic, disjoint splits, checkable answers), reward
extraction, the pieces of a REINFORCE step, and real runs of the stage on a tiny model that half-knows the
answers (so rewards are mixed and gradients non-zero): events/result/checkpoints, exact resume after a crash,
2 ranks under torchrun equal to 1 rank.

    .venv/bin/pytest tests/test_rl.py -q
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat import rl_data
from nanochat.engine import use_calculator
from nanochat.stages.rl import (build_parser, pass_at_k, policy_gradient_backward, rollout_batch, rollout_seed,
                                step_examples)
from nanochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.from_directory(tiny_tokenizer_dir)


# -----------------------------------------------------------------------------
# Data and reward


def test_word_problems_are_deterministic_disjoint_and_correct(tok):
    train = rl_data.word_problems("train", 300)
    assert train == rl_data.word_problems("train", 300)
    assert rl_data.word_problems("train", 50) == train[:50]           # a smaller n is a prefix
    assert rl_data.word_problems("train", 50, seed=1) != train[:50]
    test = rl_data.word_problems("test", 300)
    questions = [it["messages"][0]["content"] for it in train]
    assert len(set(questions)) == 300
    assert not set(questions) & {it["messages"][0]["content"] for it in test}
    assert all(rl_data.split_of(q) == "train" for q in questions)
    kinds = set()
    for item in train + test:
        parts = item["messages"][1]["content"]
        for a, b in zip(parts, parts[1:]):
            if a["type"] == "python":        # every calculator span's shown result is what the tool returns
                assert b["type"] == "python_output" and str(use_calculator(a["text"])) == b["text"]
        text = "".join(p["text"] for p in parts if p["type"] != "python")
        assert rl_data.extract_answer(text) == item["answer"] and int(item["answer"]) >= 0
        assert rl_data.reward(item, text) == 1.0
        kinds.add(item["messages"][0]["content"].split("?")[0][-12:])
    assert len(kinds) > 50
    ids, mask = tok.render_conversation(test[0])
    sp = tok.special_tokens
    assert ids.count(sp["<|python_start|>"]) == 2 and sum(mask) > 0
    with pytest.raises(ValueError, match="split"):
        rl_data.word_problems("val", 3)


def test_reward_is_exact_match_of_the_final_number():
    item = {"answer": "1200"}
    assert rl_data.reward(item, "so 1,000+200 = 1200.\n#### 1,200") == 1.0
    assert rl_data.reward(item, "#### 1200") == 1.0
    assert rl_data.reward(item, "The answer is 1200.") == 0.0      # no '#### ' marker
    assert rl_data.reward(item, "#### 1201") == 0.0
    assert rl_data.reward(item, "####1200") == 0.0
    assert rl_data.reward({"answer": "-3"}, "#### -3") == 1.0
    assert rl_data.extract_answer("nothing here") is None


# -----------------------------------------------------------------------------
# Pieces of a step


def test_examples_stride_over_ranks_and_seeds_are_process_independent():
    one = step_examples(3, 8, 20, 0, 1)
    assert one == [(24 + i) % 20 for i in range(8)]
    two = step_examples(3, 8, 20, 0, 2) + step_examples(3, 8, 20, 1, 2)
    assert sorted(two) == sorted(one) and len(two) == 8
    seeds = {rollout_seed(s, i, p) for s in range(3) for i in range(3) for p in range(2)}
    assert len(seeds) == 18 and all(0 <= x < 2 ** 31 for x in seeds)
    code = "from nanochat.stages.rl import rollout_seed; print(rollout_seed(5, 17, 1))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip() for h in ("1", "2")}
    assert outs == {str(rollout_seed(5, 17, 1))}


def test_rollout_batch_masks_prompt_padding_and_forced_tokens():
    pad = 99
    seqs = [[1, 2, 3, 10, 11, 12], [1, 2, 3, 20]]
    masks = [[0, 0, 0, 1, 0, 1], [0, 0, 0, 1]]           # token 11 was forced (a tool output)
    x, y = rollout_batch(seqs, masks, pad, "cpu")
    assert x.tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 20, 99]]
    assert y.tolist() == [[-1, -1, 10, -1, 12], [-1, -1, 20, -1, -1]]


def test_policy_gradient_normalization_and_direction():
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                                  window_pattern="L"))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    x = torch.randint(0, 32, (2, 8))
    y = torch.randint(0, 32, (2, 8))
    y[:, :3] = -1
    y[1, 6:] = -1                                         # 5 + 3 = 8 valid tokens
    adv = torch.tensor([0.5, -0.5])

    def logps():
        with torch.no_grad():
            return (-model(x, y, loss_reduction="none")).sum(1)

    before = logps()
    loss = policy_gradient_backward(model, x, y, adv, normalizer=4)
    assert loss == pytest.approx(-(before * adv).sum().item() / (8 * 4), rel=1e-4)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = logps()
    assert after[0] > before[0] and after[1] < before[1]   # rewarded row up, penalized row down


def test_pass_at_k():
    assert pass_at_k([[0, 1, 0], [0, 0, 0], [1, 0, 0]]) == [1, 2, 2]
    assert pass_at_k([]) == []


def test_stage_accepts_the_runner_config(tmp_path):
    """The keys runners/plan.py + execute.py write (RLOptions, device_type, seed, inputs) are all flags."""
    from specs.schema import RLOptions
    from nanochat.stages.rl import parse_args
    cfg = {**RLOptions().model_dump(), "device_type": "cpu", "seed": 3, "checkpoint_dir": "/c", "tokenizer_dir": "/t",
           "out_dir": "/o"}
    assert set(cfg) <= {a.dest for a in build_parser()._actions}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    args = parse_args(["--config", str(path), "--num-steps", "5"])
    assert (args.num_steps, args.seed, args.examples_per_step, args.eval_samples) == (5, 3, 16, 8)
    with pytest.raises(Exception, match="num_samples"):
        RLOptions(num_samples=6, device_batch_size=4)


# -----------------------------------------------------------------------------
# The stage, for real


@pytest.fixture(scope="module")
def half_trained_checkpoint(tiny_tokenizer_dir, tmp_path_factory):
    """An "sft" checkpoint of a depth-1 model trained 12 steps to answer the first 4 train problems with
    '#### N': at temperature 1 it is right about a third of the time, so rollouts get mixed rewards."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPTConfig, build_model
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    items = rl_data.word_problems("train", 4)
    rendered = [tok.render_conversation({"messages": [it["messages"][0],
                                                      {"role": "assistant", "content": f"#### {it['answer']}"}]})
                for it in items]
    width = max(len(ids) for ids, _ in rendered)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rendered])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rendered])
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = build_model(config)
    opt = model.setup_optimizer(embedding_lr=0.3, unembedding_lr=0.02, matrix_lr=0.02)
    for _ in range(12):
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    directory = str(tmp_path_factory.mktemp("rl_sft") / "checkpoints")
    save_checkpoint(directory, 12, model.state_dict(), None, {"stage": "sft", "model_config": vars(config)})
    return directory


def _config(checkpoint, tokenizer_dir, **kw):
    from specs.schema import RLOptions
    base = dict(train_problems=4, num_steps=4, examples_per_step=2, num_samples=4, device_batch_size=2,
                max_new_tokens=8, eval_every=2, eval_examples=4, eval_samples=2, save_every=2,
                embedding_lr=0.2, unembedding_lr=0.02, matrix_lr=0.02, init_lr_frac=1.0)
    opts = RLOptions(**{**base, **kw}).model_dump()
    return {**opts, "device_type": "cpu", "seed": 0, "checkpoint_dir": checkpoint, "tokenizer_dir": tokenizer_dir}


def _run(out, config, nproc=1, check=True):
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.json"
    cfg.write_text(json.dumps(config))
    cmd = ["-m", "nanochat.stages.rl", "--config", str(cfg), "--out-dir", str(out)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc-per-node={nproc}"]
    env = {**os.environ, "NANORUN_HOME": str(out / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("NANOCHAT_DTYPE", None)
    proc = subprocess.run(launcher + cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _curve(events, name):
    return {e["step"]: e["values"][name] for e in events if e["kind"] == "metric" and name in e["values"]}


@pytest.mark.slow
def test_rl_stage_runs_and_resumes_exactly(tmp_path, half_trained_checkpoint, tiny_tokenizer_dir):
    from nanochat.checkpoint import list_steps, load_model
    cfg = _config(half_trained_checkpoint, tiny_tokenizer_dir)
    full = tmp_path / "full"
    _run(full, cfg)
    events = _events(full)
    assert events[0]["status"] == "running" and events[-1]["status"] == "done"
    rewards, losses = _curve(events, "train/reward"), _curve(events, "train/loss")
    assert sorted(rewards) == sorted(losses) == [0, 1, 2, 3]
    assert any(0 < r < 1 for r in rewards.values()), rewards          # mixed rewards: a real gradient
    assert any(abs(v) > 1e-6 for v in losses.values()), losses
    assert sorted(_curve(events, "eval/pass@1")) == [0, 2, 4]
    evals = [e for e in events if e["kind"] == "eval"]
    assert {(e["step"], e["metric"]) for e in evals} == {(s, m) for s in (0, 2, 4) for m in ("pass@1", "pass@2")}
    result = json.loads((full / "result.json").read_text())
    m = result["metrics"]
    assert result["stage"] == "rl" and m["num_steps"] == 4 and m["reward"] == rewards[3]
    assert m["pass@1"] <= m["pass@2"] and m["pass@2"] == _curve(events, "eval/pass@2")[4]
    ckpt = full / "checkpoints"
    assert list_steps(str(ckpt)) == [2, 4]
    assert {f for f in os.listdir(ckpt) if f.startswith(("optim", "state"))} == {
        "optim_000002_rank0.pt", "optim_000004_rank0.pt", "state_000002_rank0.pt", "state_000004_rank0.pt"}
    model, meta = load_model(str(ckpt))
    assert meta["stage"] == "rl" and meta["step"] == 4 and model.config.sequence_len == 128

    # a crash right after the step-2 checkpoint: a restart with the same out dir continues exactly
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    os.remove(resumed / "result.json")
    for f in os.listdir(resumed / "checkpoints"):
        if "000004" in f:
            os.remove(resumed / "checkpoints" / f)
    (resumed / "events.jsonl").write_text("")
    proc = _run(resumed, cfg)
    assert "resuming from step 2" in proc.stdout
    events2 = _events(resumed)
    for name in ("train/reward", "train/loss", "train/seq_len"):
        assert _curve(events2, name) == {s: v for s, v in _curve(events, name).items() if s >= 2}, name
    assert _curve(events2, "eval/pass@2") == {s: v for s, v in _curve(events, "eval/pass@2").items() if s >= 2}
    assert json.loads((resumed / "result.json").read_text())["metrics"]["resumed_from"] == 2
    a, _ = load_model(str(ckpt))
    b, _ = load_model(str(resumed / "checkpoints"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

    # checkpoints of another horizon are refused, not silently continued
    bad = _run(resumed, {**cfg, "num_steps": 6}, check=False)
    assert bad.returncode != 0 and "use another --out-dir" in bad.stderr


@pytest.mark.slow
def test_rl_two_ranks_match_one(tmp_path, half_trained_checkpoint, tiny_tokenizer_dir):
    """2 ranks under torchrun (gloo) take 1 of the 2 problems each: same rollouts (seeds depend on the problem,
    not the rank), same averaged gradient. Rewards/pass@k must be equal; losses within 1e-4."""
    cfg = _config(half_trained_checkpoint, tiny_tokenizer_dir, num_steps=3, eval_every=-1, save_every=-1)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, cfg)
    _run(two, cfg, nproc=2)
    e1, e2 = _events(one), _events(two)
    assert _curve(e1, "train/reward") == _curve(e2, "train/reward")
    assert _curve(e1, "train/seq_len") == _curve(e2, "train/seq_len")
    l1, l2 = _curve(e1, "train/loss"), _curve(e2, "train/loss")
    assert sorted(l1) == sorted(l2) == [0, 1, 2]
    assert all(l1[s] == pytest.approx(l2[s], abs=1e-4) for s in l1), (l1, l2)
    r1 = json.loads((one / "result.json").read_text())["metrics"]
    r2 = json.loads((two / "result.json").read_text())["metrics"]
    assert r2["world_size"] == 2 and r1["pass@2"] == r2["pass@2"]
    bad = _run(tmp_path / "bad", {**cfg, "examples_per_step": 3, "num_samples": 2, "device_batch_size": 2},
               nproc=2, check=False)
    assert bad.returncode != 0 and "not divisible by the world size" in bad.stderr
