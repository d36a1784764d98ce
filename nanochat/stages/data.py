"""
Stage `data`: materialize the pretraining mixture and write OUT/manifest.json (last) for the loader.

    python -m nanochat.stages.data --config config.json --out-dir OUT [--workers 4]

config.json:
    {"train": [{"source": "climbmix", "shards": 8, "weight": 0.9},
               {"source": "text", "path": "/my/notes", "weight": 0.1}],
     "val": {"source": "climbmix"}}                     # optional: defaults to the first train source's val
Sources: climbmix | fineweb_edu (remote shards, cached in $NANORUN_HOME/data/<source>/, not copied),
demo (packaged English prose, cached in $NANORUN_HOME/data/demo/), parquet (local folder with a `text`
column, last file = val), text (local folder of .txt/.md, converted into OUT/converted/).
A bad config prints one line on stderr and exits with code 2.
"""

import argparse
import json
import os
import sys
import time

from nanochat import corpus, dataset
from nanochat.common import EventLog, get_base_dir, get_dist_info, write_result
from nanochat.rundir import atomic_write_json

REMOTE = ("climbmix", "fineweb_edu")
LOCAL = ("parquet", "text")
SOURCES = REMOTE + LOCAL + ("demo",)


class ConfigError(ValueError):
    """A problem in the stage config the user can fix; reported as one line, exit code 2."""


def _check_entry(entry, where, is_val=False):
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    source = entry.get("source")
    if source not in SOURCES:
        raise ConfigError(f"{where}.source: unknown source {source!r} (expected one of {', '.join(SOURCES)})")
    if source in LOCAL:
        path = entry.get("path")
        if not path:
            raise ConfigError(f"{where}.path: required for source {source!r}")
        if not os.path.exists(path):
            raise ConfigError(f"{where}.path: {path} does not exist")
    if source in REMOTE and not is_val:
        shards = entry.get("shards")
        max_train = dataset.val_shard_index(source)  # the last shard is val, never train
        if not isinstance(shards, int) or not 1 <= shards <= max_train:
            raise ConfigError(f"{where}.shards: need an integer in 1..{max_train} for {source} (got {shards!r})")
    if not is_val:
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{where}.weight: must be a number > 0 (got {weight!r})")


def check_config(config):
    train = config.get("train")
    if not isinstance(train, list) or not train:
        raise ConfigError("data.train: need a non-empty list of sources")
    for i, entry in enumerate(train):
        _check_entry(entry, f"data.train[{i}]")
    if config.get("val") is not None:
        _check_entry(config["val"], "data.val", is_val=True)


def materialize(entry, index, out_dir, workers, log):
    """(train_files, val_files) of one config entry, downloading/converting as needed."""
    source = entry["source"]
    if source in REMOTE:
        cache = os.path.join(get_base_dir(), "data", source)
        indices = list(range(entry.get("shards", 0))) + [dataset.val_shard_index(source)]
        log.log("log", message=f"downloading {len(indices)} {source} shards into {cache}")
        paths = dataset.download_shards(source, indices, cache, workers=workers)
        return paths[:-1], paths[-1:]
    if source == "demo":
        summary = corpus.build_demo_corpus(os.path.join(get_base_dir(), "data", "demo"), entry.get("packages"))
        log.log("log", message=f"demo corpus: {summary['documents']} documents", chars=summary["chars"])
        return summary["train"], summary["val"]
    if source == "parquet":
        return corpus.parquet_folder_split(entry["path"])
    converted = corpus.convert_text_folder(entry["path"], os.path.join(out_dir, "converted", f"{index}"))
    return converted["train"], converted["val"]


def run(config, out_dir, workers=4):
    check_config(config)
    os.makedirs(out_dir, exist_ok=True)
    log = EventLog(os.path.join(out_dir, "events.jsonl"))
    log.log("status", status="running")
    t0 = time.time()
    train, val_candidates = [], []
    for i, entry in enumerate(config["train"]):
        train_files, val_files = materialize(entry, f"train{i}", out_dir, workers, log)
        if not train_files:
            raise ConfigError(f"data.train[{i}]: source {entry['source']!r} produced no training files")
        train.append({"source": entry["source"], "weight": float(entry.get("weight", 1.0)),
                      "files": [os.path.abspath(p) for p in train_files]})
        val_candidates.append(val_files)
    val_entry = config.get("val")
    if val_entry is None:
        val = {"source": config["train"][0]["source"], "files": val_candidates[0]}
    else:
        train_files, val_files = materialize(dict(val_entry, shards=0), "val", out_dir, workers, log)
        # a local folder given as val is used whole
        files = train_files + val_files if val_entry["source"] in LOCAL else val_files
        val = {"source": val_entry["source"], "files": files}
    if not val["files"]:
        raise ConfigError(f"data.val: source {val['source']!r} has no held-out shard; set data.val explicitly")
    val["files"] = [os.path.abspath(p) for p in val["files"]]
    for entry in train:
        for p in entry["files"]:
            dataset.check_text_column(p)
    all_train = [p for entry in train for p in entry["files"]]
    documents = dataset.count_documents(all_train)
    manifest = {"train": train, "val": val, "documents": documents,
                "val_documents": dataset.count_documents(val["files"]),
                "bytes": sum(os.path.getsize(p) for p in all_train + val["files"])}
    manifest_path = os.path.join(out_dir, "manifest.json")
    atomic_write_json(manifest_path, manifest)
    metrics = {"documents": documents, "val_documents": manifest["val_documents"], "bytes": manifest["bytes"],
               "train_files": len(all_train), "seconds": time.time() - t0}
    log.metric(0, **metrics)
    log.log("status", status="done")
    log.close()
    write_result(out_dir, "data", metrics, outputs={"manifest": manifest_path})
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description="Materialize the pretraining data mixture (writes manifest.json)")
    parser.add_argument("--config", required=True, help="JSON file with train/val entries")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--workers", type=int, default=4, help="parallel shard downloads")
    args = parser.parse_args(argv)
    if get_dist_info()[1] != 0:
        return 0  # launched under torchrun: rank 0 does all the work
    try:
        with open(args.config) as f:
            config = json.load(f)
        config = config.get("data", config)  # accept {"data": {...}} as well as the bare mapping
        run(config, args.out_dir, args.workers)
    except (ConfigError, FileNotFoundError, json.JSONDecodeError) as e:
        print(str(e), file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as e:  # download failures, unreadable data
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
