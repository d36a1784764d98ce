"""
Stage `tok_train`: train the BPE tokenizer on the train split of a data stage directory.

    python -m nanochat.stages.tok_train --data-dir D --out-dir OUT --vocab-size 32768 \
        --max-chars 2000000000 --doc-cap 10000 [--config config.json]

config.json keys are the argparse dest names (data_dir, out_dir, vocab_size, max_chars, doc_cap,
val_chars); flags given on the command line override them. Documents are cropped to doc_cap characters and
training stops after max_chars. Writes OUT/tokenizer/ (tokenizer.json, tokenizer.pkl, token_bytes.pt),
OUT/events.jsonl and OUT/result.json with bytes_per_token measured on the val split.
"""

import argparse
import itertools
import os
import sys
import time

import pyarrow.parquet as pq

from nanochat.common import EventLog, get_dist_info, write_result
from nanochat.stage_args import parse_args_with_config
from nanochat.dataloader import read_data_dir
from nanochat.tokenizer import Tokenizer, train_tokenizer

SANITY_TEXT = "Hello world! 12345 h\u00e9llo w\u00f6rld \u4f60\u597d \U0001f916\r\n\tThe end.  <|bos|> isn't special."


def iter_train_texts(sources, max_chars, doc_cap, counter):
    """Documents cropped to doc_cap, row groups taken round-robin across sources; stops at max_chars."""
    def row_groups(files):
        for path in files:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()

    streams = [row_groups(s["files"]) for s in sources]
    for group in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
        if group is None:
            continue
        for text in group:
            text = text[:doc_cap]
            counter["chars"] += len(text)
            yield text
            if counter["chars"] >= max_chars:
                return


def bytes_per_token(tokenizer, val_files, max_chars):
    """UTF-8 bytes per token over the first max_chars characters of the val split (higher = better)."""
    texts, chars = [], 0
    for path in val_files:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            texts.append(text)
            chars += len(text)
            if chars >= max_chars:
                break
        if chars >= max_chars:
            break
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    return n_bytes / max(1, n_tokens)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on a data stage's train split")
    parser.add_argument("--config", default=None, help="JSON with keys = argparse dest names")
    parser.add_argument("--data-dir", default=None, help="data stage dir (manifest.json) or parquet folder")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--max-chars", type=int, default=2_000_000_000)
    parser.add_argument("--doc-cap", type=int, default=10_000)
    parser.add_argument("--val-chars", type=int, default=10_000_000, help="val chars for bytes_per_token")
    return parse_args_with_config(parser, argv, required=("data_dir", "out_dir"))


def main(argv=None):
    args = parse_args(argv)
    if get_dist_info()[1] != 0:
        return 0  # under torchrun only rank 0 trains
    try:
        sources, val_files = read_data_dir(args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"tok_train: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    log = EventLog(os.path.join(args.out_dir, "events.jsonl"))
    log.log("status", status="running")
    counter = {"chars": 0}
    t0 = time.time()
    tokenizer = train_tokenizer(iter_train_texts(sources, args.max_chars, args.doc_cap, counter), args.vocab_size)
    train_seconds = time.time() - t0
    print(f"tok_train: trained vocab {tokenizer.get_vocab_size()} on {counter['chars']:,} chars in {train_seconds:.1f}s",
          file=sys.stderr)
    # inline roundtrip sanity check before anything is saved
    ids = tokenizer.encode(SANITY_TEXT)
    if tokenizer.decode(ids) != SANITY_TEXT:
        raise RuntimeError("tok_train: tokenizer roundtrip sanity check failed")
    tokenizer_dir = os.path.join(args.out_dir, "tokenizer")
    tokenizer.save(tokenizer_dir)
    reloaded = Tokenizer.from_directory(tokenizer_dir)
    if reloaded.encode(SANITY_TEXT) != ids:
        raise RuntimeError("tok_train: saved tokenizer encodes differently after reload")
    bpt = bytes_per_token(reloaded, val_files, args.val_chars)
    metrics = {"vocab_size": tokenizer.get_vocab_size(), "train_chars": counter["chars"],
               "train_seconds": train_seconds, "bytes_per_token": bpt}
    log.metric(0, **metrics)
    log.log("status", status="done")
    log.close()
    write_result(args.out_dir, "tok_train", metrics, outputs={"tokenizer_dir": tokenizer_dir})
    print(f"tok_train: bytes/token on val {bpt:.3f}; saved {tokenizer_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
