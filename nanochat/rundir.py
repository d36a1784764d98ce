"""
The run-directory contract, torch-free: the one module that names, writes and reads nanorun's files, so every
package (stages, runners, registry, tui) sees the same layout and the same errors.

    $NANORUN_HOME (default ~/.cache/nanorun)
      runs/{run_id}/run.json          one applied spec: its plan, status and ordered stage entries (runners)
      runs/{run_id}/run-node{R}.json  the same, as seen by node R > 0 of a multi-node apply (never read by registry)
      runs/{run_id}/jobs.json         the batch jobs a launcher submitted for the run (ids, states, requeues)
      runs/{run_id}/slurm/            their job scripts (job-{stages}.sh) and output (job-{id}.out)
      stages/{stage}-{key8}/          one content-addressed stage, shared by every run with that key:
        config.json                   what the stage was launched with
        events.jsonl                  status/metric/eval/sample/log lines, appended by rank 0 (EventLog)
        checkpoints/                  model_{step:06d}.pt + meta_{step:06d}.json; a step is complete once its meta
                                      file exists beside its model file (the meta is written last)
        result.json                   written last, atomically: the stage's success marker (write_result)
      studies/{name}/                 one study (runners.study): study.json (its cells and their run ids),
                                      cells/{run_id}.yaml, logs/{run_id}.log, plots/*.png (runners.plots)
      compare/                        `nanorun compare`'s plots when not given --plot ({A}_vs_{B}.png)
      hardware/                       measured device facts (matmul peaks), cached per machine (nanochat.probe)
      registry.duckdb                 rebuilt from the directories above at any time (registry)

    from nanochat import rundir
    run_id, record = rundir.find_run("cpu_demo")          # id, unique prefix or spec name
    rundir.stage_state(rundir.stage_dir("base_train", key))   # done | partial | pending

A file that cannot be used (not JSON, JSON of the wrong shape) or a run reference that names no run raises
RunDirError with one line naming the file or the reference; the CLI prints it and exits 2.
"""

import json
import os
import re
import time


class RunDirError(ValueError):
    """An unusable file of the run tree or a run reference that matches no run, in one line naming it. (nanochat
    cannot import specs.errors; the CLI turns this into `error: ...` and exit code 2, like any bad input.)"""


# -----------------------------------------------------------------------------
# Where things are


def home():
    """$NANORUN_HOME or ~/.cache/nanorun (not created here)."""
    return os.environ.get("NANORUN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "nanorun")


def hardware_dir(base=None):
    return os.path.join(base or home(), "hardware")


def runs_dir(base=None):
    return os.path.join(base or home(), "runs")


def studies_dir(base=None):
    return os.path.join(base or home(), "studies")


def study_dir(name, base=None):
    return os.path.join(studies_dir(base), name)


def study_plots_dir(name, base=None):
    """The study's PNG plots (runners.plots writes them, `nanorun study show` lists them)."""
    return os.path.join(study_dir(name, base), "plots")


def compare_plots_dir(base=None):
    """Where `nanorun compare` writes its plot when not given --plot PATH."""
    return os.path.join(base or home(), "compare")


def study_names(base=None):
    """Names of the study directories that hold a study.json, sorted."""
    root = studies_dir(base)
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "study.json"))) \
        if os.path.isdir(root) else []


def run_dir(run_id, base=None):
    return os.path.join(runs_dir(base), run_id)


def stage_dir_name(stage, key):
    return f"{stage}-{key[:8]}"


def stage_dir(stage, key, base=None):
    return os.path.join(base or home(), "stages", stage_dir_name(stage, key))


def locate_stage_dir(recorded, base=None):
    """A stage directory as run.json records it: relative paths are under the home; an absolute one that no
    longer exists but whose name does under this home's stages/ is the same stage in a moved or copied tree."""
    if not recorded:
        return recorded
    base = base or home()
    if not os.path.isabs(recorded):
        return os.path.join(base, recorded)
    if os.path.isdir(recorded):
        return recorded
    moved = os.path.join(base, "stages", os.path.basename(os.path.normpath(recorded)))
    return moved if os.path.isdir(moved) else recorded


# -----------------------------------------------------------------------------
# Atomic writes: a temp file in the same directory, fsync, rename over the target. A reader (or a resumed run)
# sees the old file or the complete new one, never a torn one; a killed writer leaves only `name.tmp.PID`.


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def remove_temp_files(path):
    """Delete the `path.tmp.PID` files of writes whose process was killed before its rename."""
    directory, prefix = os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".tmp."
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(prefix):
            os.remove(os.path.join(directory, name))


# -----------------------------------------------------------------------------
# Reading JSON

_REQUIRED = object()


def read_json(path, default=_REQUIRED, shape=dict):
    """The JSON value in `path`. A missing file returns `default` (RunDirError when none is given); a file that is
    not JSON, or whose top level is not a `shape` (None: anything), raises RunDirError naming the file."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        if default is _REQUIRED:
            raise RunDirError(f"{path}: no such file") from None
        return default
    except IsADirectoryError:
        raise RunDirError(f"{path}: a directory, not a JSON file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RunDirError(f"{path}: not valid JSON ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    except OSError as e:  # a symlink loop, no permission, an I/O error
        raise RunDirError(f"{path}: cannot be read ({e.strerror or e})") from None
    if shape is not None and not isinstance(value, shape):
        raise RunDirError(f"{path}: a JSON {_json_type(value)}, not {_A_JSON.get(shape, shape.__name__)}")
    return value


_A_JSON = {dict: "an object", list: "an array", str: "a string"}


def _json_type(value):
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


# -----------------------------------------------------------------------------
# Run records (runs/{run_id}/run.json, written by runners.execute)

# the types the runner writes; anything else makes a malformed record (never an AttributeError deep in a reader)
_RUN_FIELDS = (("stages", list), ("hardware", dict), ("tags", list), ("plan", dict), ("run_id", str), ("name", str),
               ("status", str))
_STAGE_FIELDS = ("key", "stage", "dir", "status")


def check_run_record(run, path):
    """Raise RunDirError('PATH: malformed run.json (...)') unless `run` has the shape the runner writes."""
    def bad(what):
        raise RunDirError(f"{path}: malformed run.json ({what})")
    if not isinstance(run, dict):
        bad(f"a JSON {_json_type(run)}, not an object")
    for name, kind in _RUN_FIELDS:
        if run.get(name) is not None and not isinstance(run[name], kind):
            bad(f"{name!r} is a JSON {_json_type(run[name])}, not {_A_JSON[kind]}")
    for name in ("created_at", "started_at", "finished_at"):
        value = run.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            bad(f"{name!r} is a JSON {_json_type(value)}, not a number (unix seconds)")
    for i, stage in enumerate(run.get("stages") or []):
        if not isinstance(stage, dict):
            bad(f"stages[{i}] is a JSON {_json_type(stage)}, not an object")
        for name in _STAGE_FIELDS:
            if stage.get(name) is not None and not isinstance(stage[name], str):
                bad(f"stages[{i}].{name} is a JSON {_json_type(stage[name])}, not a string")


def run_record_name(node_rank=0):
    """The run record's file name for the apply of `node_rank`: run.json is node 0's (the run's record, which the
    registry reads); a multi-node spec's other nodes keep their own run-node{R}.json beside it, so two nodes that
    share $NANORUN_HOME never overwrite each other's record."""
    return "run.json" if node_rank == 0 else f"run-node{node_rank}.json"


def read_run(directory, node_rank=0):
    """The run record in `directory`/run.json (run-node{R}.json for another node's apply), checked; RunDirError
    (naming the file) when missing or malformed."""
    path = os.path.join(directory, run_record_name(node_rank))
    if not os.path.isfile(path):
        raise RunDirError(f"{path}: no run.json (not a run directory)")
    run = read_json(path, shape=None)
    check_run_record(run, path)
    return run


def run_ids(base=None):
    """Ids of the run directories (those with a run.json), sorted."""
    root = runs_dir(base)
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "run.json"))) \
        if os.path.isdir(root) else []


def match_run(ref, runs, where):
    """The run id that `ref` names among `runs` ({run_id: {"name", "created_at", ...}}): the exact id; else the spec
    name (its newest run); else the one id that starts with `ref`. `where` names the place searched, for the error."""
    if ref in runs:
        return ref
    named = [i for i, r in runs.items() if r.get("name") == ref]
    matches = named or [i for i in runs if i.startswith(ref)]
    if not matches:
        raise RunDirError(f"unknown run '{ref}' (no run directory in {where}; see `nanorun runs`)")
    matches.sort(key=lambda i: (-(runs[i].get("created_at") or 0), i))  # newest first
    if len(matches) > 1 and not named:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise RunDirError(f"ambiguous run '{ref}' matches {len(matches)} runs: {shown}")
    return matches[0]


def find_run(ref, base=None):
    """(run_id, record) of the run `ref` names (see match_run) under the home. A run.json that cannot be read
    cannot match by name; if it is the one named, its RunDirError is raised."""
    base = base or home()
    ids = run_ids(base)
    if ref in ids:
        return ref, read_run(run_dir(ref, base))
    records, problems = {}, {}
    for i in ids:
        try:
            records[i] = read_run(run_dir(i, base))
        except RunDirError as e:
            problems[i] = e
    run_id = match_run(ref, {i: records.get(i, {}) for i in ids}, runs_dir(base))
    if run_id in problems:
        raise problems[run_id]
    return run_id, records[run_id]


def load_run(run_id, base=None):
    """A run record with each stage entry's directory located (stage["path"]) and its result.json attached
    (stage["result"], None until the stage succeeded or when unreadable). RunDirError when run.json is unusable."""
    base = base or home()
    run = read_run(run_dir(run_id, base))
    run.setdefault("run_id", run_id)
    for stage in run.get("stages") or []:
        stage["path"] = locate_stage_dir(stage.get("dir") or os.path.join(
            "stages", stage_dir_name(str(stage.get("stage")), str(stage.get("key") or ""))), base)
        stage["result"] = read_result(stage["path"])
    return run


# -----------------------------------------------------------------------------
# Launcher jobs (runs/{run_id}/jobs.json, written by runners.slurm under the run's lock): a list of
# {"launcher", "job_id", "stages", "script", "output", "submitted_at", "state", "restarts", "updated_at"}, oldest first


def jobs_path(run_directory):
    return os.path.join(run_directory, "jobs.json")


def launcher_dir(run_directory, launcher="slurm"):
    """Where a launcher keeps a run's job scripts and job output."""
    return os.path.join(run_directory, launcher)


def read_jobs(run_directory):
    """The run's job records, oldest first ([] before any was submitted); RunDirError when jobs.json is unusable."""
    path = jobs_path(run_directory)
    jobs = read_json(path, {"jobs": []}).get("jobs")
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and isinstance(j.get("job_id"), str) for j in jobs):
        raise RunDirError(f"{path}: malformed jobs.json ('jobs' must be a list of objects with a string job_id)")
    return jobs


def write_jobs(run_directory, jobs):
    atomic_write_json(jobs_path(run_directory), {"jobs": jobs})


# -----------------------------------------------------------------------------
# Stage state and checkpoints

CHAT_STAGES = ("sft", "rl")   # stages trained on rendered conversations (their models know the chat tokens)


def model_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"model_{step:06d}.pt")


def meta_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"meta_{step:06d}.json")


def checkpoint_steps(ckpt_dir):
    """Complete checkpoint steps, ascending: a meta file (written last) beside its model file."""
    try:
        names = set(os.listdir(ckpt_dir))
    except (FileNotFoundError, NotADirectoryError, TypeError):
        return []
    return sorted(int(m.group(1)) for n in names
                  if (m := re.fullmatch(r"meta_(\d+)\.json", n)) and f"model_{m.group(1)}.pt" in names)


def stage_state(directory):
    """done (result.json) | partial (a meta file or events: a re-apply resumes it) | pending."""
    if os.path.exists(os.path.join(directory, "result.json")):
        return "done"
    ckpt = os.path.join(directory, "checkpoints")
    if os.path.isdir(ckpt) and any(f.startswith("meta_") for f in os.listdir(ckpt)):
        return "partial"
    if os.path.exists(os.path.join(directory, "events.jsonl")):
        return "partial"
    return "pending"


def run_checkpoints(run):
    """[(stage, checkpoint_dir)] of a loaded run (load_run) that have a complete step, preferred first: chat stages,
    then the others, latest first within each. A stage still training counts once it has saved a step."""
    found = []
    for stage in reversed(run.get("stages") or []):
        directory = result_outputs(stage.get("result")).get("checkpoint_dir") or \
            os.path.join(stage["path"], "checkpoints")
        if checkpoint_steps(directory):
            found.append((stage.get("stage") or "?", directory))
    return sorted(found, key=lambda sc: sc[0] not in CHAT_STAGES)   # stable sort keeps latest-first


def run_tokenizer(run):
    """The tokenizer directory of a loaded run (its tok_train output), or None."""
    for stage in run.get("stages") or []:
        found = result_outputs(stage.get("result")).get("tokenizer_dir")
        if found:
            return found
        if stage.get("stage") == "tok_train" and os.path.isfile(os.path.join(stage["path"], "tokenizer",
                                                                             "tokenizer.pkl")):
            return os.path.join(stage["path"], "tokenizer")
    return None


# -----------------------------------------------------------------------------
# result.json: {"stage", "status": "success", "finished_at": unix s, "metrics": {name: value},
#               "outputs": {"checkpoint_dir" | "tokenizer_dir" | ...: path}, ...}


def write_result(out_dir, stage, metrics, outputs=None, **extra):
    """Write the stage's result.json, its success marker: last, atomically. Returns the record."""
    result = {"stage": stage, "status": "success", "finished_at": time.time(),
              "metrics": metrics, "outputs": outputs or {}, **extra}
    atomic_write_json(os.path.join(out_dir, "result.json"), result)
    return result


def read_result(directory):
    """The result.json of a stage directory, or None while there is none (or it cannot be read)."""
    try:
        return read_json(os.path.join(directory, "result.json"), None)
    except RunDirError:
        return None


def result_metrics(result):
    metrics = (result or {}).get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def result_outputs(result):
    outputs = (result or {}).get("outputs")
    return outputs if isinstance(outputs, dict) else {}


# -----------------------------------------------------------------------------
# events.jsonl: one JSON object per line, {"time": unix s, "kind": ..., **fields}


class EventLog:
    """Append-only JSON-lines log of one stage. Only rank 0 writes; every line is flushed so live readers (TUI,
    `nanorun show`) can tail it. Kinds: "status" (status=running|done|failed), "metric" (step, values={name: float}),
    "eval" (step, suite, task, metric, value, n), "sample" (step, prompt, text), "log" (message)."""

    def __init__(self, path, rank=0):
        self.path = path
        self.enabled = rank == 0
        self._f = None
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "a", buffering=1)
            if _ends_mid_line(path):  # a killed writer tore its last line: keep that line apart from ours
                self._f.write("\n")

    def log(self, kind, **fields):
        if not self.enabled:
            return
        record = {"time": time.time(), "kind": kind, **fields}
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()

    def metric(self, step, **values):
        values = {k: float(v) for k, v in values.items()}
        self.log("metric", step=step, values=values)
        return values

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def _ends_mid_line(path):
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_events(path):
    """(line number, event dict) of every complete line of an events.jsonl; a line that does not parse (the torn
    last line of a running or killed writer) is skipped. Nothing when the file does not exist; RunDirError naming
    the file when it cannot be read (a directory, a symlink loop, no permission)."""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, line in enumerate(f):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield lineno, event


class EventTail:
    """Reads an events.jsonl incrementally: each poll() returns the complete lines appended since the last one.
    A writer flushes whole lines, but a reader can still catch half a line; it is kept until its newline lands."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # truncated or replaced: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                chunk = f.read()
        except OSError:   # not there yet, or unreadable (a directory, a symlink loop): nothing to show
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events
