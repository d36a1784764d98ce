"""
Pretraining data on disk: parquet shards with one `text` column, and the downloader for the remote shard sets.

    python -m nanochat.dataset --source climbmix -n 8          # shards 0..7 + the val shard into the cache
    download_shards("climbmix", [0, 1, 6542], dest_dir)        # library use

Remote sources (reference/nanochat.md section 6.1): the last shard of each set is the val shard.
The base URL of a source can be overridden with NANORUN_DATA_URL_<SOURCE> (e.g. a local mirror).
"""

import argparse
import http.client
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

SOURCES = {
    "climbmix": {"base_url": "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                 "max_shard": 6542},
    "fineweb_edu": {"base_url": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                    "max_shard": 1822},
}
CHUNK_BYTES = 1024 * 1024
TIMEOUT_SECONDS = 30


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def source_info(source):
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known remote sources: {sorted(SOURCES)}")
    return SOURCES[source]


def val_shard_index(source):
    return source_info(source)["max_shard"]


def base_url_for(source, base_url=None):
    """Explicit argument > NANORUN_DATA_URL_<SOURCE> env var > the public default."""
    if base_url:
        return base_url.rstrip("/")
    env = os.environ.get(f"NANORUN_DATA_URL_{source.upper()}")
    return (env or source_info(source)["base_url"]).rstrip("/")


# -----------------------------------------------------------------------------
# Download

def _download_one(url, path, attempts, backoff_base):
    """Stream url to path.tmp, then rename. Retries with exponential backoff; raises naming the URL."""
    if os.path.exists(path):
        return "skipped"
    tmp = path + ".tmp"
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
                expected = response.headers.get("Content-Length")
                written = 0
                with open(tmp, "wb") as f:
                    while True:
                        chunk = response.read(CHUNK_BYTES)
                        if not chunk:
                            break
                        f.write(chunk)
                        written += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            if expected is not None and written != int(expected):
                raise OSError(f"truncated transfer: got {written} of {expected} bytes")
            os.replace(tmp, path)
            return "downloaded"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            last_error = e  # HTTP errors, resets, timeouts, truncation (IncompleteRead): retry
        if attempt < attempts:
            time.sleep(backoff_base * 2 ** attempt)
    raise RuntimeError(f"download failed after {attempts} attempts: {url}: {last_error}")


def download_shards(source, indices, dest_dir, base_url=None, workers=4, attempts=5, backoff_base=1.0):
    """Download shard_{i:05d}.parquet for each index into dest_dir (skipping complete files).
    Returns the list of local paths in the order of `indices`."""
    info = source_info(source)
    for i in indices:
        if not 0 <= i <= info["max_shard"]:
            raise ValueError(f"{source}: shard index {i} out of range 0..{info['max_shard']}")
    url = base_url_for(source, base_url)
    os.makedirs(dest_dir, exist_ok=True)
    paths = [os.path.join(dest_dir, shard_name(i)) for i in indices]
    jobs = [(f"{url}/{shard_name(i)}", p) for i, p in zip(indices, paths)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda job: _download_one(job[0], job[1], attempts, backoff_base), jobs))
    return paths


# -----------------------------------------------------------------------------
# Local parquet shards

def write_parquet_shards(texts_iter, out_dir, prefix, docs_per_shard, row_group_size=1024):
    """Write texts into out_dir/{prefix}_{k:05d}.parquet, docs_per_shard each (zstd, row groups of
    row_group_size). Each shard is written to .tmp and renamed. Returns the list of paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths, batch = [], []

    def flush():
        path = os.path.join(out_dir, f"{prefix}_{len(paths):05d}.parquet")
        table = pa.table({"text": pa.array(batch, type=pa.string())})
        pq.write_table(table, path + ".tmp", row_group_size=row_group_size, compression="zstd",
                       use_dictionary=False, write_statistics=False)
        os.replace(path + ".tmp", path)
        paths.append(path)

    for text in texts_iter:
        batch.append(text)
        if len(batch) >= docs_per_shard:
            flush()
            batch = []
    if batch:
        flush()
    return paths


def list_parquet_files(directory):
    """Sorted full paths of *.parquet files in a directory (partial .tmp downloads are ignored)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory} does not exist")
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet"))


def check_text_column(path):
    schema = pq.read_schema(path)
    if "text" not in schema.names:
        raise ValueError(f"{path}: parquet file has no 'text' column (columns: {schema.names})")


def iter_texts(files, start=0, step=1):
    """Yield lists of texts, one per row group, taking row groups start, start+step, ... of each file
    (a rank reads start=rank, step=world_size)."""
    for path in files:
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def count_documents(files):
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def main():
    parser = argparse.ArgumentParser(description="Download pretraining shards into $NANORUN_HOME/data/<source>/")
    parser.add_argument("--source", default="climbmix", choices=sorted(SOURCES))
    parser.add_argument("-n", "--num-files", type=int, default=8, help="train shards (-1 = all); the val shard is added")
    parser.add_argument("-w", "--num-workers", type=int, default=4)
    parser.add_argument("--dest", default=None)
    args = parser.parse_args()
    from nanochat.common import get_base_dir
    last = val_shard_index(args.source)
    n = last if args.num_files < 0 else min(args.num_files, last)
    dest = args.dest or os.path.join(get_base_dir(), "data", args.source)
    paths = download_shards(args.source, list(range(n)) + [last], dest, workers=args.num_workers)
    print(f"{len(paths)} shards in {dest}")


if __name__ == "__main__":
    main()
