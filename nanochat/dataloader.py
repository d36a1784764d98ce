"""
Tokenizing, distributed, resumable pretraining loader with BOS-aligned best-fit packing
(reference/nanochat.md section 6.3) over a weighted mixture of sources.

    loader = DataLoader(data_dir, tokenizer, batch_size=8, seq_len=512, rank=rank, world_size=world_size)
    for inputs, targets in loader:        # (B, T) int64 each, targets = inputs shifted by one
        ...
        state = loader.state_dict()       # exact: DataLoader(..., state=state) yields the very next batch

data_dir is a `data` stage directory (manifest.json) or a plain folder of parquet files (last file = val).
Packing: each row holds T+1 tokens; every document is BOS-prefixed; we repeatedly take the largest buffered
document that fits the remaining space, and when none fits we crop the shortest one to fill the row exactly
(no padding; the cropped tail is dropped). Among equal lengths the document read first wins. Whenever the
buffer holds fewer than buffer_size documents, the next refill_size (128) documents of the current row group
join it: the reference's refill, so a single stream packs exactly the rows the reference packs.
Rank r reads row groups r, r+W, r+2W, ... of each source.
Mixture: the next row group comes from the source with the largest token deficit w_i * total - taken_i.
"""

import bisect
import json
import os

import pyarrow.parquet as pq
import torch

from nanochat.dataset import list_parquet_files

STATE_VERSION = 2  # 2 added `pending`; a version-1 state loads with none pending


def read_data_dir(data_dir):
    """(train_sources, val_files): train_sources = [{"source", "weight", "files"}]."""
    manifest_path = os.path.join(data_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        train = [{"source": s["source"], "weight": float(s["weight"]), "files": list(s["files"])}
                 for s in manifest["train"]]
        return train, list(manifest["val"]["files"])
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise FileNotFoundError(f"{data_dir}: no manifest.json and fewer than 2 parquet files "
                                "(need train shards + a last val shard)")
    return [{"source": "parquet", "weight": 1.0, "files": files[:-1]}], files[-1:]


def _rank_units(files, rank, world_size):
    """The read units of one rank: (file, row_group, doc_start, doc_step). Whole row groups strided by rank
    when there are at least world_size of them; otherwise every row group with documents strided by rank."""
    groups = [(path, rg) for path in files for rg in range(pq.ParquetFile(path).num_row_groups)]
    if len(groups) >= world_size:
        return [(path, rg, 0, 1) for g, (path, rg) in enumerate(groups) if g % world_size == rank]
    return [(path, rg, rank, world_size) for path, rg in groups]


class DataLoader:

    def __init__(self, data_dir, tokenizer, batch_size, seq_len, split="train", rank=0, world_size=1,
                 device="cpu", state=None, buffer_size=1000, tokenizer_threads=4, refill_size=128):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        train, val_files = read_data_dir(data_dir)
        sources = train if split == "train" else [{"source": "val", "weight": 1.0, "files": val_files}]
        if any(s["weight"] < 0 for s in sources) or sum(s["weight"] for s in sources) <= 0:
            raise ValueError(f"{data_dir}: mixture weights must be >= 0 with a positive sum")
        total_weight = sum(s["weight"] for s in sources)
        self.names = [s["source"] for s in sources]
        self.weights = [s["weight"] / total_weight for s in sources]
        self.units = [_rank_units(s["files"], rank, world_size) for s in sources]
        for name, units in zip(self.names, self.units):
            if not units:
                raise ValueError(f"{data_dir}: {split} source {name!r} has no row groups")
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.B, self.T = batch_size, seq_len
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.refill_size = refill_size
        self.tokenizer_threads = tokenizer_threads
        # resumable state: next unit per source, epochs (start at 1), tokens taken per source, the doc buffer,
        # and the tokenized documents of the last row group read that have not joined the buffer yet
        n = len(sources)
        self.positions, self.epochs, self.taken = [0] * n, [1] * n, [0] * n
        # docs sorted by length, equal lengths in the order read; lengths mirrors them for bisect
        self.buffer, self.lengths = [], []
        self.pending = []
        if state is not None:
            self.load_state_dict(state)

    # --- state ---------------------------------------------------------------

    def state_dict(self):
        """Everything needed to continue with exactly the same batches (plain Python, JSON/pickle-able)."""
        return {"version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "sources": [{"name": n, "position": p, "epoch": e, "taken": t}
                            for n, p, e, t in zip(self.names, self.positions, self.epochs, self.taken)],
                "buffer": [list(doc) for doc in self.buffer], "pending": [list(doc) for doc in self.pending]}

    def load_state_dict(self, state):
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"dataloader state version {state.get('version')} is not 1 or {STATE_VERSION}")
        if (state["split"], state["rank"], state["world_size"]) != (self.split, self.rank, self.world_size):
            raise ValueError(f"dataloader state is for split={state['split']} rank={state['rank']} "
                             f"world_size={state['world_size']}, not {self.split}/{self.rank}/{self.world_size}")
        if [s["name"] for s in state["sources"]] != self.names:
            raise ValueError(f"dataloader state sources {[s['name'] for s in state['sources']]} != {self.names}")
        self.positions = [s["position"] for s in state["sources"]]
        self.epochs = [s["epoch"] for s in state["sources"]]
        self.taken = [s["taken"] for s in state["sources"]]
        self.buffer = [list(doc) for doc in state["buffer"]]
        self.lengths = [len(doc) for doc in self.buffer]
        self.pending = [list(doc) for doc in state.get("pending", [])]

    @property
    def epoch(self):
        """Epoch of the first (main) source; starts at 1."""
        return self.epochs[0]

    # --- reading -------------------------------------------------------------

    def _pick_source(self):
        total = sum(self.taken)
        best, best_deficit = None, None
        for i, w in enumerate(self.weights):
            if w <= 0:
                continue
            deficit = w * total - self.taken[i]
            if best is None or deficit > best_deficit:
                best, best_deficit = i, deficit
        return best

    def _read_next_unit(self):
        """Tokenize the next row group of the mixture into `pending`."""
        i = self._pick_source()
        path, rg, doc_start, doc_step = self.units[i][self.positions[i]]
        self.positions[i] += 1
        if self.positions[i] == len(self.units[i]):  # source exhausted: next epoch starts over
            self.positions[i] = 0
            self.epochs[i] += 1
        texts = pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column("text").to_pylist()
        texts = texts[doc_start::doc_step]
        self.pending = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
        self.taken[i] += sum(len(doc) for doc in self.pending)

    def _refill(self):
        """Move the next refill_size pending documents into the buffer (reading a row group if none are left)."""
        if not self.pending:
            self._read_next_unit()
        docs, self.pending = self.pending[:self.refill_size], self.pending[self.refill_size:]
        for doc in docs:
            k = bisect.bisect_right(self.lengths, len(doc))  # after its equal lengths: they stay in read order
            self.lengths.insert(k, len(doc))
            self.buffer.insert(k, doc)

    def _next_row(self):
        """One row of exactly T+1 tokens, starting with a BOS-prefixed document."""
        row, remaining = [], self.T + 1
        while remaining > 0:
            empty_reads = 0
            while len(self.buffer) < self.buffer_size:
                before = len(self.buffer)
                self._refill()
                empty_reads = empty_reads + 1 if len(self.buffer) == before else 0
                if empty_reads > sum(len(u) for u in self.units):
                    raise ValueError(f"{self.split} data has no documents for rank {self.rank}")
            k = bisect.bisect_right(self.lengths, remaining) - 1
            if k >= 0:  # the largest document that fits, the first read of that length
                k = bisect.bisect_left(self.lengths, self.lengths[k])
                doc = self.buffer.pop(k)
                self.lengths.pop(k)
                row.extend(doc)
                remaining -= len(doc)
            else:  # nothing fits: crop the shortest document (the first read of that length) to fill the row
                doc = self.buffer.pop(0)
                self.lengths.pop(0)
                row.extend(doc[:remaining])
                remaining = 0
        return row

    def next_batch(self):
        rows = torch.tensor([self._next_row() for _ in range(self.B)], dtype=torch.long)  # (B, T+1)
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]  # inputs (B, T), targets (B, T)

    def __iter__(self):
        while True:
            yield self.next_batch()
