"""
`nanorun eval RUN`: re-evaluate any checkpoint of a recorded run (CORE, bits per byte, samples, chat) and record it.

    nanorun eval cpu_demo --suite bpb --step 200
    nanorun eval cpu_demo-1a2b --suite core --max-per-task 100 --nproc 2 --yes
    nanorun eval cpu_demo --suite chat --max-per-task 50 --yes      # the run's sft (or rl) model, chat_eval stage

The run is found in $NANORUN_HOME/runs (id, unique prefix or spec name), its base_train checkpoints, tok_train
tokenizer and data directory are taken from run.json, and the evaluation runs as the base_eval stage
(`torchrun -m nanochat.stages.base_eval --config ...`) in a new content-addressed directory
stages/base_eval-<key8>, key = sha256(checkpoint dir, step, suite, options). A key that already has a result.json
is reused. `--suite chat` evaluates the run's chat model (the rl checkpoints when the run has an rl stage, else
sft) as the chat_eval stage in stages/chat_eval-<key8>, with the run's chat_eval options. The evaluation is appended to run.json (under the run's lock, tmp + rename) as a stage entry marked
"adhoc": true, and the run is re-ingested so `nanorun show RUN` lists the new metrics. No torch in this process.
"""

import hashlib
import json
import os
import re
import sys
import time

import click

from runners.cli import main
from specs.errors import LaunchError, NanorunError

SUITES = {"core": "core", "bpb": "bpb", "sample": "sample", "all": "core,bpb,sample", "chat": "chat"}
EVAL_KEY_VERSION = 1  # bump when the meaning of an ad-hoc eval's key changes


class EvalInputError(NanorunError):
    """A bad RUN / --step / run without what an evaluation needs (bad input: exit code 2)."""
    exit_code = 2


# -----------------------------------------------------------------------------
# Finding a run and its inputs (run directories only: the registry is derived from them)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def find_run(ref, home):
    """(run_dir, record) for an exact run id, a unique prefix of one, or a spec name (its newest run)."""
    runs = os.path.join(home, "runs")
    names = sorted(d for d in os.listdir(runs) if os.path.isfile(os.path.join(runs, d, "run.json"))) \
        if os.path.isdir(runs) else []
    if ref in names:
        return os.path.join(runs, ref), _read_json(os.path.join(runs, ref, "run.json"))
    records = {}
    for name in names:
        try:
            records[name] = _read_json(os.path.join(runs, name, "run.json"))
        except (OSError, ValueError):
            continue  # an unreadable record cannot be evaluated anyway
    by_name = [n for n, r in records.items() if r.get("name") == ref]
    matches = by_name or [n for n in records if n.startswith(ref)]
    if not matches:
        raise EvalInputError(f"unknown run '{ref}' (no run directory in {runs}; see `nanorun runs`)")
    if len(matches) > 1 and not by_name:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise EvalInputError(f"ambiguous run '{ref}' matches {len(matches)} runs: {shown}")
    newest = max(matches, key=lambda n: records[n].get("created_at") or 0)
    return os.path.join(runs, newest), records[newest]


def _stage_dir(record, stage, home):
    """The directory of the run's last `stage` entry (as recorded, or under this home if the tree moved)."""
    entries = [s for s in record.get("stages") or [] if s.get("stage") == stage and s.get("dir")]
    if not entries:
        return None
    recorded = entries[-1]["dir"]
    moved = os.path.join(home, "stages", os.path.basename(os.path.normpath(recorded)))
    return recorded if os.path.isdir(recorded) or not os.path.isdir(moved) else moved


def _plan_params(record, stage):
    """(params, nproc_per_node) of a stage in the run's resolved plan, or ({}, None)."""
    for s in (record.get("plan") or {}).get("stages") or []:
        if s.get("stage") == stage:
            return dict(s.get("params") or {}), s.get("nproc_per_node")
    return {}, None


def _plan_env(record):
    """The environment the run's evaluation (else its training) ran with, e.g. NANOCHAT_DTYPE; older plans
    have none and kept the dtype in base_train's params."""
    by_stage = {s.get("stage"): s for s in (record.get("plan") or {}).get("stages") or []}
    for stage in ("base_eval", "base_train"):
        if by_stage.get(stage, {}).get("env"):
            return {str(k): str(v) for k, v in by_stage[stage]["env"].items()}
    dtype = (by_stage.get("base_train", {}).get("params") or {}).get("dtype")
    return {"NANOCHAT_DTYPE": str(dtype)} if dtype else {}


def list_steps(ckpt_dir):
    """Complete checkpoint steps (meta_NNNNNN.json written last, beside model_NNNNNN.pt), ascending.
    Same rule as nanochat.checkpoint.list_steps, which this torch-free module cannot import."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = [int(m.group(1)) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"meta_(\d+)\.json", f))]
    return sorted(s for s in steps if os.path.exists(os.path.join(ckpt_dir, f"model_{s:06d}.pt")))


# -----------------------------------------------------------------------------
# The evaluation as a stage: config, key, run, record


def eval_config(record, run_id, home, suite="all", step=None, max_per_task=None, device_batch_size=None,
                split_tokens=None, bundle_dir=None):
    """The base_eval config.json (minus out_dir) for one checkpoint of a recorded run: the run's own
    base_eval options (from its plan) overridden by the given ones. Raises EvalInputError naming what is missing."""
    if suite not in SUITES:
        raise EvalInputError(f"--suite: unknown '{suite}' (choose from {', '.join(SUITES)})")
    if suite == "chat":
        return chat_eval_config(record, run_id, home, step, max_per_task, device_batch_size)
    train_dir = _stage_dir(record, "base_train", home)
    if not train_dir:
        raise EvalInputError(f"run {run_id} has no base_train stage: nothing to evaluate")
    ckpt_dir = os.path.join(train_dir, "checkpoints")
    steps = list_steps(ckpt_dir)
    if not steps:
        raise EvalInputError(f"run {run_id} has no checkpoints yet (nothing complete in {ckpt_dir})")
    if step is None:
        step = steps[-1]  # resolved now, so the key names a fixed checkpoint even while training goes on
    elif step not in steps:
        raise EvalInputError(f"run {run_id} has no checkpoint at step {step} (available steps: "
                             f"{', '.join(map(str, steps))})")
    tok_dir = _stage_dir(record, "tok_train", home)
    if not tok_dir or not os.path.isdir(os.path.join(tok_dir, "tokenizer")):
        raise EvalInputError(f"run {run_id} has no trained tokenizer (tok_train stage {tok_dir or 'missing'})")
    data_dir = _stage_dir(record, "data", home)
    evals = SUITES[suite]
    if "bpb" in evals and not data_dir:
        raise EvalInputError(f"run {run_id} has no data stage: --suite {suite} needs its data for bits per byte")
    train_params, _ = _plan_params(record, "base_train")
    params, _ = _plan_params(record, "base_eval")
    params.setdefault("device_type", train_params.get("device_type") or
                      (record.get("hardware") or {}).get("device_type") or "")
    params.setdefault("device_batch_size", train_params.get("device_batch_size") or 32)
    for name, value in (("max_per_task", max_per_task), ("device_batch_size", device_batch_size),
                        ("split_tokens", split_tokens), ("bundle_dir", bundle_dir and os.path.abspath(bundle_dir))):
        if value is not None:
            params[name] = value
    return {**params, "eval": evals, "step": step, "checkpoint_dir": ckpt_dir,
            "tokenizer_dir": os.path.join(tok_dir, "tokenizer"), "data_dir": data_dir}


def _pick_step(run_id, ckpt_dir, step):
    steps = list_steps(ckpt_dir)
    if not steps:
        raise EvalInputError(f"run {run_id} has no checkpoints yet (nothing complete in {ckpt_dir})")
    if step is None:
        return steps[-1]  # resolved now, so the key names a fixed checkpoint even while training goes on
    if step not in steps:
        raise EvalInputError(f"run {run_id} has no checkpoint at step {step} (available steps: "
                             f"{', '.join(map(str, steps))})")
    return step


def chat_eval_config(record, run_id, home, step=None, max_problems=None, batch_size=None):
    """The chat_eval config.json (minus out_dir) for the run's chat model: rl if the run has one, else sft."""
    source = next((s for s in ("rl", "sft") if _stage_dir(record, s, home)), None)
    if source is None:
        raise EvalInputError(f"run {run_id} has no sft or rl stage: --suite chat needs a chat model "
                             f"(add sft to the spec's stages)")
    ckpt_dir = os.path.join(_stage_dir(record, source, home), "checkpoints")
    step = _pick_step(run_id, ckpt_dir, step)
    tok_dir = _stage_dir(record, "tok_train", home)
    if not tok_dir or not os.path.isdir(os.path.join(tok_dir, "tokenizer")):
        raise EvalInputError(f"run {run_id} has no trained tokenizer (tok_train stage {tok_dir or 'missing'})")
    params, _ = _plan_params(record, "chat_eval")
    source_params, _ = _plan_params(record, source)
    params.setdefault("device_type", source_params.get("device_type") or
                      (record.get("hardware") or {}).get("device_type") or "")
    for name, value in (("max_problems", max_problems), ("batch_size", batch_size)):
        if value is not None:
            params[name] = None if value < 0 else value
    return {**params, "eval": "chat", "source": source, "step": step, "checkpoint_dir": ckpt_dir,
            "tokenizer_dir": os.path.join(tok_dir, "tokenizer")}


def _eval_stage(config):
    return "chat_eval" if config.get("eval") == "chat" else "base_eval"


def eval_key(config, nproc, env=None):
    """sha256 of everything that decides the result: checkpoint dir + step, suite, options, process count
    (bits per byte rounds its token budget to whole steps of nproc ranks) and environment (dtype)."""
    payload = {"stage": _eval_stage(config), "adhoc": EVAL_KEY_VERSION, "config": config, "nproc": nproc, "env": env or {}}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def record_eval(run_dir, entry, timeout=30.0):
    """Add (or replace, by key) a stage entry in run.json under the run's lock: read, update, tmp + rename.
    The lock is the one `nanorun apply` holds for its whole run, since an apply rewrites run.json from memory."""
    from runners.execute import _atomic_write_json, _Lock
    run_id = os.path.basename(os.path.normpath(run_dir))
    deadline = time.time() + timeout
    while True:
        try:
            with _Lock(run_dir, f"run {run_id}"):
                path = os.path.join(run_dir, "run.json")
                record = _read_json(path)
                stages = [s for s in record.get("stages") or [] if s.get("key") != entry["key"]]
                record["stages"] = stages + [entry]
                _atomic_write_json(path, record)
                return record
        except LaunchError:
            if time.time() > deadline:
                raise LaunchError(f"run {run_id} is being applied, so its run.json cannot be updated now; the "
                                  f"evaluation is kept in {entry['dir']}: run the same `nanorun eval` after the "
                                  f"apply to record it (it is reused, not recomputed)") from None
            time.sleep(0.2)


def _ingest(run_dir, echo):
    try:
        from registry import ingest_run
        ingest_run(run_dir)
    except NanorunError as e:
        echo(f"warning: registry not updated ({e}); run `nanorun registry sync` later")


def _entry(key, sdir, config, **fields):
    base = {"stage": _eval_stage(config), "key": key, "dir": sdir, "status": "pending", "started_at": None,
            "finished_at": None, "wall_seconds": None, "exit_code": None, "error": None, "adhoc": True,
            "eval": {"suite": config["eval"], "step": config["step"], "checkpoint_dir": config["checkpoint_dir"]}}
    return {**base, **fields}


def prepare_eval(run_ref, *, home=None, nproc=None, **options):
    """Resolve what to evaluate (options: see eval_config) without running anything: a dict with run_dir,
    run_id, record, config, nproc, key, dir and cached (the key already has a result.json)."""
    from runners.plan import get_home, stage_state
    home = home or get_home()
    run_dir, record = find_run(run_ref, home)
    run_id = record.get("run_id") or os.path.basename(run_dir)
    config = eval_config(record, run_id, home, **options)
    _, train_nproc = _plan_params(record, "base_train")
    stage = _eval_stage(config)
    _, eval_nproc = _plan_params(record, stage)
    nproc = nproc or eval_nproc or train_nproc or 1
    env = _plan_env(record)
    key = eval_key(config, nproc, env)
    sdir = os.path.join(home, "stages", f"{stage}-{key[:8]}")
    return {"run_dir": run_dir, "run_id": run_id, "record": record, "config": config, "nproc": nproc, "env": env,
            "key": key, "dir": sdir, "cached": stage_state(sdir) == "done"}


def run_eval(job, echo=print):
    """Run a prepared evaluation as the base_eval / chat_eval stage (unless its result exists) and record it in run.json and
    the registry. Returns (entry, result dict, cached). Raises LaunchError when the stage fails."""
    from runners.execute import _atomic_write_json, _error_line, _Lock, _run_subprocess, _stage_env, stage_command
    from runners.plan import StagePlan, stage_state
    run_dir, config, key, sdir = job["run_dir"], job["config"], job["key"], job["dir"]
    name = _eval_stage(config)
    # chat_eval takes its options as given; "eval" only names the suite (key, run.json entry)
    stage_config = {k: v for k, v in config.items() if not (name == "chat_eval" and k == "eval")}
    cached = stage_state(sdir) == "done"
    if not cached:
        os.makedirs(sdir, exist_ok=True)
        with _Lock(sdir, f"evaluation {sdir}"):
            cached = stage_state(sdir) == "done"  # again, under the lock: a concurrent eval may have finished it
            if not cached:
                config_path = os.path.join(sdir, "config.json")
                events = os.path.join(sdir, "events.jsonl")
                if os.path.exists(events):  # an evaluation killed mid-way: it has no resume, so start clean
                    os.remove(events)
                _atomic_write_json(config_path, {**stage_config, "out_dir": sdir})
                stage = StagePlan(name=name, module=f"nanochat.stages.{name}", key=key, upstream=(),
                                  params={"device_type": config.get("device_type")}, env=job["env"],
                                  nproc_per_node=job["nproc"], nnodes=1)
                cmd = stage_command(stage, config_path, sdir)
                echo(f"[{name}] run {job['run_id']}, step {config['step']}, {config['eval']} in {sdir}")
                t0 = time.time()
                code, tail = _run_subprocess(cmd, _stage_env(stage), os.path.join(sdir, "stdout.log"), echo,
                                             f"[{name}] ")
                wall = time.time() - t0
                if code != 0 or stage_state(sdir) != "done":
                    err = (_error_line(tail) or f"exit code {code}").strip()
                    record_eval(run_dir, _entry(key, sdir, config, status="failed", started_at=t0,
                                                finished_at=time.time(), wall_seconds=wall, exit_code=code, error=err))
                    _ingest(run_dir, echo)
                    raise LaunchError(f"evaluation failed (exit {code}): {err} "
                                      f"[log: {os.path.join(sdir, 'stdout.log')}]")
                entry = _entry(key, sdir, config, status="success", started_at=t0, finished_at=time.time(),
                               wall_seconds=wall, exit_code=0)
    result_path = os.path.join(sdir, "result.json")
    if cached:
        old = next((s for s in job["record"].get("stages") or [] if s.get("key") == key), None)
        entry = old if old and old.get("status") in ("success", "cached") else \
            _entry(key, sdir, config, status="cached", finished_at=os.path.getmtime(result_path), exit_code=0)
    record_eval(run_dir, entry)
    _ingest(run_dir, echo)
    return entry, _read_json(result_path), cached


# -----------------------------------------------------------------------------
# Command


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def summary_lines(run_id, entry, result, cached):
    m = result.get("metrics") or {}
    lines = [f"{'cached evaluation' if cached else 'evaluation'} of run {run_id} at step {m.get('step')}: "
             f"{entry['dir']}"]
    if "core_metric" in m:
        lines.append(f"  CORE         {m['core_metric']:.4f} over {m.get('core_tasks')}/22 tasks"
                     + (" (partial: not ranked against full CORE)" if m.get("core_partial") else ""))
        if m.get("core_missing"):
            lines.append(f"  missing      {_fmt(m['core_missing'])}")
    for task in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"):
        if task in m:
            lines.append(f"  {task:<12} {m[task]:.4f} (n={(m.get('counts') or {}).get(task)})")
    if m.get("chatcore") is not None:
        lines.append(f"  ChatCORE     {m['chatcore']:.4f} ({m.get('source')} model)")
    for name in ("train_bpb", "val_bpb", "num_samples", "eval_seconds"):
        if name in m:
            lines.append(f"  {name:<12} {_fmt(m[name])}")
    lines.append(f"next: nanorun show {run_id}")
    return lines


@main.command("eval")
@click.argument("run")
@click.option("--suite", type=click.Choice(list(SUITES)), default="all", show_default=True,
              help="What to evaluate: CORE, train/val bits per byte, samples, all three, or chat (the run's "
                   "sft/rl model: ARC, MMLU, GSM8K, HumanEval, ChatCORE).")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the newest complete one).")
@click.option("--max-per-task", type=int, default=None,
              help="Examples per CORE task / problems per chat task (-1 = all; default: the run's).")
@click.option("--device-batch-size", type=int, default=None,
              help="Rows per forward (chat: prompts per categorical batch; default: the run's).")
@click.option("--split-tokens", type=int, default=None, help="Tokens per split for bits per byte (default: the run's).")
@click.option("--bundle-dir", type=click.Path(file_okay=False), default=None,
              help="CORE bundle directory (default $NANORUN_HOME/eval_bundle; see `nanorun data core-bundle`).")
@click.option("--nproc", type=int, default=None, help="Processes (default: the run's base_eval/base_train count).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--quiet", "-q", is_flag=True, help="Do not echo the evaluation's output (it is still in stdout.log).")
def eval_command(run, suite, step, max_per_task, device_batch_size, split_tokens, bundle_dir, nproc, yes, quiet):
    """Re-evaluate a checkpoint of a recorded run in a new stage directory, record it in the run and the registry.
    RUN is a run id, a unique prefix of one, or a spec name (its newest run). Same inputs => the result is reused.

    Example: nanorun eval cpu_demo --suite core --step 200 --max-per-task 100
    """
    if nproc is not None and nproc < 1:
        raise EvalInputError(f"--nproc: must be >= 1 (got {nproc})")
    job = prepare_eval(run, nproc=nproc, suite=suite, step=step, max_per_task=max_per_task,
                       device_batch_size=device_batch_size, split_tokens=split_tokens, bundle_dir=bundle_dir)
    if not job["cached"]:
        click.echo(f"evaluate run {job['run_id']} at step {job['config']['step']}: {job['config']['eval']} "
                   f"on {job['nproc']} process(es) ({job['config'].get('device_type') or 'auto'}) in {job['dir']}")
        if not yes:
            if not sys.stdin.isatty():
                raise EvalInputError("refusing to evaluate without confirmation: pass --yes when not on a terminal")
            click.confirm("run this evaluation?", abort=True)
    echo = (lambda line: None) if quiet else click.echo
    try:
        entry, result, cached = run_eval(job, echo=echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; `nanorun eval {run}` starts this evaluation again", err=True)
        sys.exit(130)
    click.echo("\n".join(summary_lines(job["run_id"], entry, result, cached)))
