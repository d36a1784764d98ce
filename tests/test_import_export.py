"""`nanorun import nanochat` and `nanorun export` (issue 15): a checkpoint written in the reference's documented
on-disk layout (reference/nanochat.md 5.6, 7, 21: a pickled tiktoken Encoding, `_orig_mod.` keys, bf16 embeddings)
is imported as a run that show / eval / chat work on, exported as safetensors and as a Hugging Face directory that
transformers loads with the same logits, greedy tokens and token ids; bad input is one line, exit 2, nothing written.
Run: .venv/bin/pytest tests/test_import_export.py"""

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from runners.cli import main

TEXTS = ["The king walked to the river.", "  two  spaces, digits 12345 and UTF-8: caf\u00e9 \u65e5\u672c!\n\n"]
SPECIAL_TEXT = "<|bos|> is plain text to nanorun; transformers matches special tokens unless told not to"


def nanorun(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _tiny_model(vocab_size, seed=0, **overrides):
    """A nanorun GPT with every weight random (the reference init zeroes the projections), small enough for CPU:
    3 layers (value embeddings on 0 and 2, backout after 1), GQA (4 heads, 2 kv heads), an S layer whose 128-token
    window is shorter than the sequences below, a padded vocab. The stop tokens' logits are zeroed so greedy
    generation runs on."""
    from nanochat.gpt import GPTConfig, build_model
    config = GPTConfig(**{"sequence_len": 256, "vocab_size": vocab_size, "n_layer": 3, "n_head": 4, "n_kv_head": 2,
                          "n_embd": 64, "window_pattern": "SL", **overrides})
    model = build_model(config, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for emb in [model.transformer.wte, *model.value_embeds.values()]:   # saved as bf16 below: lossless
            emb.weight.copy_(emb.weight.to(torch.bfloat16).float())
        model.lm_head.weight[vocab_size - 9] = 0.0   # <|bos|>
        model.lm_head.weight[vocab_size - 5] = 0.0   # <|assistant_end|>
    return model


def write_nanochat_dir(root, tokenizer, model, sources=("base", "sft"), steps=(100, 200), tag="d3", drop=(),
                       drop_config=()):
    """The reference's layout: tokenizer/{tokenizer.pkl (a pickled tiktoken Encoding), token_bytes.pt} and
    <source>_checkpoints/<tag>/{model,meta}_NNNNNN.pt|json, the state dict as torch.compile leaves it
    (`_orig_mod.` keys) with bf16 embeddings, the meta with model_config / user_config / val_bpb."""
    import tiktoken
    os.makedirs(os.path.join(root, "tokenizer"), exist_ok=True)
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.mergeable_ranks,
                            special_tokens=tokenizer.special_tokens)
    with open(os.path.join(root, "tokenizer", "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    torch.save(tokenizer.token_bytes(), os.path.join(root, "tokenizer", "token_bytes.pt"))
    folder = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
    state = {}
    for k, v in model.state_dict().items():
        if k in drop or any(k.startswith(d) for d in drop):
            continue
        v = v.to(torch.bfloat16) if k.startswith(("transformer.wte", "value_embeds")) else v
        state[f"_orig_mod.{k}"] = v.clone()
    config = {k: v for k, v in vars(model.config).items() if k not in drop_config}
    for source in sources:
        directory = os.path.join(root, folder[source], tag)
        os.makedirs(directory, exist_ok=True)
        for step in steps:
            torch.save(state, os.path.join(directory, f"model_{step:06d}.pt"))
            with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
                json.dump({"step": step, "val_bpb": 1.25, "model_config": config,
                           "user_config": {"depth": model.config.n_layer}}, f)
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.from_directory(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_model(tokenizer.get_vocab_size()).eval()


@pytest.fixture(scope="module")
def nanochat_dir(tmp_path_factory, tokenizer, model):
    return write_nanochat_dir(str(tmp_path_factory.mktemp("nanochat")), tokenizer, model)


@pytest.fixture
def imported(nanochat_dir, nanorun_home):
    result = nanorun("import", "nanochat", nanochat_dir)
    assert result.exit_code == 0, result.output
    from nanochat import rundir
    (run_id,) = rundir.run_ids(nanorun_home)
    return run_id


def _ids(tokenizer, n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [tokenizer.get_bos_token_id()] + torch.randint(0, tokenizer.get_vocab_size() - 9, (n - 1,),
                                                          generator=g).tolist()


# -----------------------------------------------------------------------------
# import


@pytest.mark.slow
def test_import_registers_a_run_that_show_eval_and_chat_use(imported, nanochat_dir, nanorun_home, model, tokenizer):
    from nanochat import rundir
    from nanochat.checkpoint import load_model
    run = rundir.load_run(imported, nanorun_home)
    assert imported.startswith("nanochat-d3-")
    assert [s["stage"] for s in run["stages"]] == ["tok_train", "base_train", "sft"]
    assert all(rundir.stage_state(s["path"]) == "done" for s in run["stages"])
    assert [{k: c[k] for k in ("source", "step", "stage")} for c in run["imported"]["checkpoints"]] == \
        [{"source": "base", "step": 200, "stage": "base_train"}, {"source": "sft", "step": 200, "stage": "sft"}]
    assert run["imported"]["checkpoints"][0]["meta"]["user_config"] == {"depth": 3}
    assert run["plan"]["derived"]["n_layer"] == 3 and run["imported"]["notes"] == []
    # the newest step, loadable by nanorun (bf16 embeddings on CPU, no _orig_mod.), same weights, meta kept
    sft_dir = os.path.join(run["stages"][2]["path"], "checkpoints")
    assert rundir.checkpoint_steps(sft_dir) == [200]
    loaded, meta = load_model(sft_dir)
    assert meta["stage"] == "sft" and meta["val_bpb"] == 1.25 and meta["imported"]["source"] == "sft"
    ids = torch.tensor([_ids(tokenizer, 50)])
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ref[k]), k
    assert torch.equal(loaded(ids), model(ids))

    # idempotent: the same files give the same run, nothing rewritten
    mtime = os.path.getmtime(os.path.join(nanorun_home, "runs", imported, "run.json"))
    again = nanorun("import", "nanochat", nanochat_dir)
    assert again.exit_code == 0 and f"already imported as run {imported}" in again.output
    assert rundir.run_ids(nanorun_home) == [imported]
    assert os.path.getmtime(os.path.join(nanorun_home, "runs", imported, "run.json")) == mtime
    assert len(os.listdir(os.path.join(nanorun_home, "stages"))) == 3

    shown = nanorun("show", imported)
    assert shown.exit_code == 0, shown.output
    for stage in ("tok_train", "base_train", "sft"):
        assert stage in shown.output
    assert "depth 3" in shown.output and "val_bpb" in shown.output

    evaluated = nanorun("eval", imported, "--suite", "sample", "--yes", "--quiet")
    assert evaluated.exit_code == 0, evaluated.output
    assert "num_samples" in evaluated.output
    samples = nanorun("show", imported, "--json")
    assert '"base_eval"' in samples.output

    chat = nanorun("chat", imported, "-p", "hello", "-t", "0", "--max-tokens", "5")
    assert chat.exit_code == 0, chat.output
    assert "sft step 200" in chat.output and "base model" not in chat.output


async def test_imported_runs_in_compare_and_the_tui(nanochat_dir, nanorun_home):
    """Two imports of one nanochat dir (steps 200 and 100): `compare` reads them like trained runs (no training
    curve, so no multiplier, said so), and the TUI lists them and opens one's detail with its imported stages."""
    from textual.widgets import DataTable

    from nanochat import rundir
    from tui.app import NanorunApp
    from tui.run_detail import RunDetailScreen

    assert nanorun("import", "nanochat", nanochat_dir).exit_code == 0
    assert nanorun("import", "nanochat", nanochat_dir, "--step", "100", "--name", "older").exit_code == 0
    newest = next(r for r in rundir.run_ids(nanorun_home) if r.startswith("nanochat-d3-"))
    older = next(r for r in rundir.run_ids(nanorun_home) if r.startswith("older-"))
    out = nanorun("compare", newest, older, "--no-plots")
    assert out.exit_code == 0, out.output
    assert f"A {newest}: val bpb 1.2500 (n=1" in out.output and f"B {older}: val bpb 1.2500 (n=1" in out.output
    assert "needs at least 2 seeds per side" in out.output and "compute multiplier: unknown" in out.output

    app = NanorunApp(home=nanorun_home, refresh_seconds=None, monitor_seconds=None)
    async with app.run_test(size=(140, 40)) as pilot:
        table = app.screen.query_one(DataTable)
        ids = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert sorted(ids) == sorted([newest, older])
        await pilot.press(*(["down"] * ids.index(newest)), "enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunDetailScreen) and screen.run_id == newest
        stages = screen.query_one("#stages-table", DataTable)
        assert [str(stages.get_row_at(i)[0]) for i in range(stages.row_count)] == ["tok_train", "base_train", "sft"]


def test_step_tag_source_and_name(nanochat_dir, nanorun_home):
    from nanochat import rundir
    result = nanorun("import", "nanochat", nanochat_dir, "--step", "100", "--source", "base", "--name", "mine")
    assert result.exit_code == 0, result.output
    (run_id,) = rundir.run_ids(nanorun_home)
    run = rundir.load_run(run_id, nanorun_home)
    assert run_id.startswith("mine-") and [s["stage"] for s in run["stages"]] == ["tok_train", "base_train"]
    assert rundir.checkpoint_steps(os.path.join(run["stages"][1]["path"], "checkpoints")) == [100]
    for args, message in [(["--tag", "d9"], "no checkpoints tagged 'd9' (tags: d3)"),
                          (["--step", "7"], "no checkpoint to import at step 7"),
                          (["--name", "Bad Name"], "--name 'Bad Name': use 1-80 characters")]:
        bad = nanorun("import", "nanochat", nanochat_dir, *args)
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_flat_directory_and_older_checkpoints_get_the_reference_defaults(tmp_path, nanorun_home, tokenizer):
    """A flat directory (as on the hub) of a checkpoint from before sliding windows, resid/x0 lambdas, smear and
    backout: the reference's defaults (window_pattern L, resid 1, x0 0) and zero for the later features, each said."""
    from nanochat import rundir
    from nanochat.checkpoint import load_model
    model = _tiny_model(tokenizer.get_vocab_size(), seed=3, window_pattern="L")
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.0)
        model.smear_lambda.fill_(0.0)
        model.smear_gate.weight.fill_(0.0)
        model.backout_lambda.fill_(0.0)
    root = str(tmp_path / "flat")
    write_nanochat_dir(root, tokenizer, model, sources=("sft",), steps=(650,), drop_config=("window_pattern",),
                       drop=("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda"))
    flat = str(tmp_path / "nanochat-d3-hub")
    os.makedirs(flat)
    for d in ("tokenizer", "chatsft_checkpoints/d3"):
        for name in os.listdir(os.path.join(root, d)):
            os.rename(os.path.join(root, d, name), os.path.join(flat, name))
    result = nanorun("import", "nanochat", flat, "--source", "sft")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "no model_config.window_pattern: using the reference's default 'L'" in out
    assert "no resid_lambdas (resid_lambdas): set to 1.0 (the reference's default)" in out
    assert "no x0_lambdas (x0_lambdas): set to 0.0" in out
    assert "no smear (smear_gate.weight, smear_lambda): set to 0 (smear off" in out
    assert "no backout (backout_lambda): set to 0" in out
    (run_id,) = rundir.run_ids(nanorun_home)
    assert run_id.startswith("nanochat-nanochat-d3-hub-")
    run = rundir.load_run(run_id, nanorun_home)
    loaded, meta = load_model(os.path.join(run["stages"][1]["path"], "checkpoints"))
    assert meta["model_config"]["window_pattern"] == "L" and meta["stage"] == "sft"
    ids = torch.tensor([_ids(tokenizer, 40)])
    assert torch.equal(loaded(ids), model.eval()(ids))


# -----------------------------------------------------------------------------
# export


def test_export_safetensors(imported, nanorun_home, tmp_path, tokenizer):
    from safetensors import safe_open
    from tokenizers import Tokenizer as HFTokenizer

    from nanochat import rundir
    out = str(tmp_path / "st")
    result = nanorun("export", imported, "--stage", "base", "--format", "safetensors", out)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["model.safetensors", "nanorun.json", "tokenizer.json"]
    run = rundir.load_run(imported, nanorun_home)
    ckpt = os.path.join(run["stages"][1]["path"], "checkpoints")
    state = torch.load(rundir.model_path(ckpt, 200), weights_only=True)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(state)
        for k in state:
            assert f.get_tensor(k).dtype == state[k].dtype and torch.equal(f.get_tensor(k), state[k]), k
        assert json.loads(f.metadata()["nanorun"])["model_config"]["n_layer"] == 3
    config = json.load(open(os.path.join(out, "nanorun.json")))
    assert config["model_config"]["vocab_size"] == tokenizer.get_vocab_size()
    assert config["architecture"]["padded_vocab_size"] == 512 and config["architecture"]["softcap"] == 15.0
    assert config["special_tokens"] == tokenizer.special_tokens and config["chat"] is False
    assert config["source"]["stage"] == "base_train" and config["source"]["step"] == 200
    hf = HFTokenizer.from_file(os.path.join(out, "tokenizer.json"))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
        assert hf.encode(text).ids == tokenizer.encode(text, prepend="<|bos|>")


def _cache_of(output):
    """The KV cache of a transformers output: `cache` from transformers 5.2x on, `past_key_values` before."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def test_round_trip_reference_layout_to_transformers(imported, nanorun_home, tmp_path, tokenizer):
    """Issue 15 item 4: the reference-layout checkpoint, imported, exported as hf and loaded by transformers gives
    nanorun's logits (fp32, 1e-4), the same greedy tokens, the same token ids and the same chat rendering."""
    transformers = pytest.importorskip("transformers")
    from nanochat import rundir
    from nanochat.checkpoint import load_model
    out = str(tmp_path / "hf")
    result = nanorun("export", imported, "--format", "hf", out)     # default: the chat model (sft)
    assert result.exit_code == 0, result.output
    assert "sft step 200" in result.output
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_nanorun.py",
            "configuration_nanorun.py", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    run = rundir.load_run(imported, nanorun_home)
    ours, _ = load_model(os.path.join(run["stages"][2]["path"], "checkpoints"))
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)

    ids = torch.tensor([_ids(tokenizer, 200), _ids(tokenizer, 200, seed=2)])   # longer than the S window (128)
    with torch.no_grad():
        expected, got = ours(ids), hf(ids).logits
    assert got.shape == expected.shape == (2, 200, tokenizer.get_vocab_size())
    assert (got - expected).abs().max().item() <= 1e-4
    with torch.no_grad():   # transformers' labels convention (shifted inside) gives nanorun's loss
        assert abs(hf(ids, labels=ids).loss.item() - ours(ids[:, :-1], ids[:, 1:]).item()) <= 1e-4

    with torch.no_grad():   # the KV cache: 150 tokens at once, then one at a time (past the 128-token S window)
        cache = _cache_of(hf(ids[:, :150], use_cache=True))
        assert cache.get_seq_length() == 150
        steps = [hf(ids[:, :t + 1], past_key_values=cache).logits[:, -1] for t in range(150, 200)]
    assert (torch.stack(steps, 1) - expected[:, 150:]).abs().max().item() <= 1e-4
    # ... and with left padding: row 0 padded by 20, its logits as without the padding
    padded = torch.cat([torch.zeros(1, 20, dtype=torch.long), ids[:1, :180]], dim=1)
    mask = torch.cat([torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 180, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = hf(padded, attention_mask=mask).logits[0, 20:]
        cache = _cache_of(hf(padded[:, :120], attention_mask=mask[:, :120], use_cache=True))
        steps = [hf(padded[:, :t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits[0, -1]
                 for t in range(120, 200)]
    assert (full - expected[0, :180]).abs().max().item() <= 1e-4
    assert (torch.stack(steps) - expected[0, 100:180]).abs().max().item() <= 1e-4

    prompt = tokenizer.encode("The king walked", prepend="<|bos|>")
    greedy = list(ours.generate(prompt, max_tokens=12, temperature=0))
    lengths = []   # tokens the first block sees per step: the prompt, then one at a time (the KV cache is used)
    hook = hf.transformer.h[0].register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        hook.remove()
        assert lengths == [len(prompt)] + [1] * 11
        uncached = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               use_cache=False)[0, len(prompt):].tolist()
    assert generated == uncached == greedy

    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert tok(text)["input_ids"] == tokenizer.encode(text, prepend="<|bos|>")
        assert tok.decode(tokenizer.encode(text)) == text
    assert tok(SPECIAL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
        tokenizer.encode(SPECIAL_TEXT)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    rendered = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered["input_ids"] == tokenizer.render_for_completion(
        {"messages": conversation + [{"role": "assistant", "content": ""}]})
    full = conversation + [{"role": "assistant", "content": [{"type": "text", "text": "Let me see "},
                                                             {"type": "python", "text": "2+2"},
                                                             {"type": "python_output", "text": "4"}]}]
    assert tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"] == \
        tokenizer.render_conversation({"messages": full})[0]
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation["eos_token_id"] == [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]


# -----------------------------------------------------------------------------
# bad input: one line naming the file and the problem, exit 2, nothing written


def _nothing_written(home):
    for sub in ("runs", "stages"):
        path = os.path.join(home, sub)
        assert not os.path.isdir(path) or os.listdir(path) == [], os.listdir(path)


def _fails(*args):
    result = nanorun(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_import_sources(tmp_path, nanorun_home, tokenizer, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty: not a nanochat checkpoint directory" in _fails("import", "nanochat", str(empty))
    assert "nope: not a directory" in _fails("import", "nanochat", str(tmp_path / "nope"))

    no_tok = write_nanochat_dir(str(tmp_path / "no_tok"), tokenizer, model, sources=("base",), steps=(1,))
    os.remove(os.path.join(no_tok, "tokenizer", "tokenizer.pkl"))
    line = _fails("import", "nanochat", no_tok)
    assert "no_tok/tokenizer/tokenizer.pkl: missing" in line

    wrong = write_nanochat_dir(str(tmp_path / "wrong"), tokenizer, model, sources=("base",), steps=(1,))
    meta_path = os.path.join(wrong, "base_checkpoints", "d3", "meta_000001.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["n_embd"] = 128
    json.dump(meta, open(meta_path, "w"))
    line = _fails("import", "nanochat", wrong)
    assert "meta_000001.json: model_config (n_layer=3, n_embd=128" in line
    assert "does not match model_000001.pt: transformer.wte.weight is (512, 64), the config gives (512, 128)" in line
    _nothing_written(nanorun_home)


def test_tokenizer_pickles_are_never_executed(tmp_path, nanorun_home, tokenizer, model):
    root = write_nanochat_dir(str(tmp_path / "evil"), tokenizer, model, sources=("base",), steps=(1,))
    pkl = os.path.join(root, "tokenizer", "tokenizer.pkl")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for payload, message in [(pickle.dumps(Evil()), "not a tiktoken encoding: the pickle asks for posix.system"),
                             (pickle.dumps([1, 2, 3]), "not a tiktoken encoding (the pickle holds a list)"),
                             (b"not a pickle at all", "not a readable pickle"),
                             (pickle.dumps(Evil())[:-5], "not a readable pickle (UnpicklingError: pickle data was")]:
        with open(pkl, "wb") as f:
            f.write(payload)
        assert f"tokenizer.pkl: {message}" in _fails("import", "nanochat", root)
    assert not marker.exists()
    import tiktoken
    wrong_specials = tiktoken.Encoding(name="x", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.mergeable_ranks,
                                       special_tokens={"<|endoftext|>": len(tokenizer.mergeable_ranks)})
    with open(pkl, "wb") as f:
        pickle.dump(wrong_specials, f)
    assert "special tokens <|endoftext|>=503 are not nanochat's 9 chat tokens" in _fails("import", "nanochat", root)
    _nothing_written(nanorun_home)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_tiktoken_pickles_of_every_protocol_load(tmp_path, tokenizer, protocol):
    import tiktoken

    from nanochat.interop import load_tokenizer
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.mergeable_ranks,
                            special_tokens=tokenizer.special_tokens)
    path = str(tmp_path / "tokenizer.pkl")
    with open(path, "wb") as f:
        pickle.dump(enc, f, protocol=protocol)
    loaded = load_tokenizer(path)
    assert loaded.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1]) == enc.encode_ordinary(TEXTS[1])
    assert loaded.special_tokens == tokenizer.special_tokens


def test_bad_exports(imported, tmp_path):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert "taken: already exists" in _fails("export", imported, "--format", "hf", str(existing))
    assert os.listdir(existing) == ["keep.txt"]
    assert f"run {imported} has no rl checkpoint to export" in \
        _fails("export", imported, "--stage", "rl", "--format", "hf", str(tmp_path / "x"))
    assert "has no base_train checkpoint at step 5 (available: 200)" in \
        _fails("export", imported, "--stage", "base", "--step", "5", "--format", "hf", str(tmp_path / "x"))
    assert "unknown run 'nope'" in _fails("export", "nope", "--format", "hf", str(tmp_path / "x"))
    assert sorted(os.listdir(tmp_path)) == ["home", "taken"]   # no temporary directory left behind
