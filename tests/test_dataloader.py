"""BOS-aligned best-fit packing loader: invariants, rank disjointness, mixture proportions, exact resume."""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader, _rank_units
from nanochat.tokenizer import train_tokenizer

B, T = 4, 64


def make_docs(name, n, seed):
    rng = random.Random(seed)
    words = "sea ship whale river king night letter garden morning question".split()
    # unique, variable-length docs (some longer than a row so cropping happens)
    return [f"{name} {i}: " + " ".join(rng.choice(words) for _ in range(rng.choice([3, 8, 20, 60]))) for i in range(n)]


def write(path, texts, row_group_size=8):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(make_docs("alpha", 200, 1) + make_docs("beta", 200, 2)), 256 + 9 + 120)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    alpha = [write(root / f"alpha_{k}.parquet", make_docs("alpha", 80, 10 + k)) for k in range(2)]
    beta = [write(root / "beta_0.parquet", make_docs("beta", 80, 20))]
    val = [write(root / "val_0.parquet", make_docs("val", 24, 30))]
    manifest = {"train": [{"source": "alpha", "weight": 3.0, "files": alpha},
                          {"source": "beta", "weight": 1.0, "files": beta}],
                "val": {"source": "alpha", "files": val}, "documents": 240, "bytes": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def segments(tok, row):
    """Split a packed row at BOS tokens into decoded documents."""
    bos = tok.get_bos_token_id()
    starts = [i for i, t in enumerate(row) if t == bos]
    return [tok.decode(row[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def all_docs(data_dir, names):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    files = [p for s in manifest["train"] if s["source"] in names for p in s["files"]]
    return {t for p in files for t in pq.read_table(p).column("text").to_pylist()}


def test_packing_invariants(tok, data_dir):
    loader = DataLoader(data_dir, tok, B, T, buffer_size=30)
    docs = all_docs(data_dir, {"alpha", "beta"})
    cropped = 0
    for _ in range(30):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
        assert (inputs[:, 0] == tok.get_bos_token_id()).all()  # every row starts with a document
        assert int(inputs.max()) < tok.get_vocab_size() and int(inputs.min()) >= 0
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():  # the full T+1 row, no padding
            segs = segments(tok, row)
            assert all(s in docs for s in segs[:-1])  # whole documents, except possibly the last one
            assert any(d.startswith(segs[-1]) for d in docs)
            cropped += segs[-1] not in docs
    assert cropped > 0  # rows are filled exactly by cropping the last document


def test_best_fit_prefers_largest_fitting_document(tok, tmp_path):
    # lengths in tokens incl. BOS: row capacity T+1 = 65 should be filled by whole docs when possible
    texts = ["x" * 1] * 3 + ["the river " * 10] * 3
    write(tmp_path / "a.parquet", texts, row_group_size=6)
    write(tmp_path / "b.parquet", texts, row_group_size=6)
    loader = DataLoader(str(tmp_path), tok, 1, T, buffer_size=6)
    sizes = sorted({len(d) for d in tok.encode(texts, prepend=tok.get_bos_token_id())})
    small, large = sizes[0], sizes[-1]
    row = loader._next_row()
    assert len(row) == T + 1
    # the first pick is the largest doc that fits, then the rest is filled greedily
    assert row[:large] == [tok.get_bos_token_id()] + tok.encode(texts[-1])


def test_ranks_read_disjoint_row_groups(tok, data_dir):
    files = [os.path.join(data_dir, f"alpha_{k}.parquet") for k in range(2)]
    u0, u1 = _rank_units(files, 0, 2), _rank_units(files, 1, 2)
    groups = [(p, rg) for p in files for rg in range(pq.ParquetFile(p).num_row_groups)]
    assert sorted(u[:2] for u in u0 + u1) == sorted(groups) and not {u[:2] for u in u0} & {u[:2] for u in u1}
    seen = []
    for rank in range(2):
        loader = DataLoader(data_dir, tok, B, T, rank=rank, world_size=2, buffer_size=20)
        docs = set()
        for _ in range(6):
            inputs, targets = loader.next_batch()
            for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
                docs.update(segments(tok, row)[:-1])
        seen.append(docs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # fewer row groups than ranks: documents are strided instead, still disjoint
    one = [os.path.join(data_dir, "val_0.parquet")]
    d0, d1 = _rank_units(one, 0, 8), _rank_units(one, 3, 8)
    assert d0[0][2:] == (0, 8) and d1[0][2:] == (3, 8)


def test_mixture_proportions_and_epochs(tok, data_dir):
    loader = DataLoader(data_dir, tok, B, T, buffer_size=20)
    counts = {"alpha": 0, "beta": 0}
    for _ in range(120):
        inputs, targets = loader.next_batch()
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            for seg in segments(tok, row):  # a cropped tail is attributed by its prefix ("al..." / "be...")
                name = "alpha" if seg and "alpha".startswith(seg[:5]) else "beta" if seg else None
                if name:
                    counts[name] += len(tok.encode(seg)) + 1
    frac = counts["alpha"] / (counts["alpha"] + counts["beta"])
    assert 0.70 < frac < 0.80, counts  # weights 3:1
    state = loader.state_dict()
    taken = {s["name"]: s["taken"] for s in state["sources"]}
    assert abs(taken["alpha"] / (taken["alpha"] + taken["beta"]) - 0.75) < 0.02
    # 120 batches of 4x65 tokens > the beta source (80 docs): it restarted at least once
    epochs = {s["name"]: s["epoch"] for s in state["sources"]}
    assert epochs["beta"] >= 2 and loader.epoch >= 1


def test_exact_resume(tok, data_dir):
    loader = DataLoader(data_dir, tok, B, T, buffer_size=25)
    for _ in range(17):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON roundtrip
    assert state["buffer"] and all(isinstance(t, int) for t in state["buffer"][0])
    expected = [loader.next_batch() for _ in range(25)]
    resumed = DataLoader(data_dir, tok, B, T, buffer_size=25, state=state)
    got = [resumed.next_batch() for _ in range(25)]
    for (ei, et), (gi, gt) in zip(expected, got):
        assert torch.equal(ei, gi) and torch.equal(et, gt)
    assert resumed.state_dict() == loader.state_dict()
    with pytest.raises(ValueError, match="rank"):
        DataLoader(data_dir, tok, B, T, rank=1, world_size=2, state=state)


def test_val_split_is_deterministic_and_restarts(tok, data_dir):
    first = [DataLoader(data_dir, tok, B, T, split="val", buffer_size=10).next_batch()[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    val = DataLoader(data_dir, tok, B, T, split="val", buffer_size=10)
    val_docs = {t for t in pq.read_table(os.path.join(data_dir, "val_0.parquet")).column("text").to_pylist()}
    for _ in range(20):  # far more tokens than the 24 val docs hold: the split restarts
        inputs, targets = val.next_batch()
        for row in inputs.tolist():
            assert all(s in val_docs for s in segments(tok, row)[:-1])
    assert val.epoch >= 2


def test_plain_parquet_folder(tok, tmp_path):
    write(tmp_path / "shard_00000.parquet", make_docs("alpha", 40, 1))
    write(tmp_path / "shard_00001.parquet", make_docs("val", 40, 2))
    train = DataLoader(str(tmp_path), tok, B, T, buffer_size=10)
    val = DataLoader(str(tmp_path), tok, B, T, split="val", buffer_size=10)
    assert train.names == ["parquet"]
    assert all(s.startswith("alpha") for s in segments(tok, train.next_batch()[0][0].tolist())[:-1])
    assert all(s.startswith("val") for s in segments(tok, val.next_batch()[0][0].tolist())[:-1])
    with pytest.raises(FileNotFoundError):
        DataLoader(str(tmp_path / "missing"), tok, B, T)


def test_shared_tiny_fixtures(tiny_data_dir, tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_tokenizer_dir)
    assert tok.get_vocab_size() == 512
    inputs, targets = DataLoader(tiny_data_dir, tok, 2, 128).next_batch()
    assert inputs.shape == (2, 128) and (inputs[:, 0] == tok.get_bos_token_id()).all()
