"""
`nanorun eval RUN`: re-evaluate any checkpoint of a recorded run (CORE, bits per byte, samples, chat) and record it.

    nanorun eval cpu_demo --suite bpb --step 200
    nanorun eval cpu_demo-1a2b --suite core --max-per-task 100 --nproc 2 --yes
    nanorun eval cpu_demo --suite chat --max-per-task 50 --yes      # the run's sft (or rl) model, chat_eval stage

The run is found in $NANORUN_HOME/runs (id, unique prefix or spec name: nanochat.rundir.find_run), its base_train
checkpoints, tok_train tokenizer and data directory are taken from run.json, and the evaluation runs as the
base_eval stage (`torchrun -m nanochat.stages.base_eval --config ...`, launched by runners.execute.launch_stage as
`apply` launches its stages) in a new content-addressed directory stages/base_eval-<key8>, key = the stage key of
(checkpoint dir, step, suite, options, process count, dtype). A key that already has a result.json is reused.
`--suite chat` evaluates the run's chat model (the rl checkpoints when the run has an rl stage, else sft) as the
chat_eval stage in stages/chat_eval-<key8>, with the run's chat_eval options. The evaluation is appended to
run.json (under the run's lock, tmp + rename) as a stage entry marked "adhoc": true, and the run is re-ingested so
`nanorun show RUN` lists the new metrics. No torch in this process.
"""

import os
import sys
import time

import click

from nanochat import rundir
from runners.cli import main
from specs.errors import LaunchError, NanorunError

SUITES = {"core": "core", "bpb": "bpb", "sample": "sample", "all": "core,bpb,sample", "chat": "chat"}
EVAL_KEY_VERSION = 1  # bump when the meaning of an ad-hoc eval's key changes


class EvalInputError(NanorunError):
    """A bad RUN / --step / run without what an evaluation needs (bad input: exit code 2)."""
    exit_code = 2


# -----------------------------------------------------------------------------
# Finding a run and its inputs (run directories only: the registry is derived from them)


def _stage_dir(record, stage, home):
    """The directory of the run's last `stage` entry (as recorded, or under this home if the tree moved)."""
    entries = [s for s in record.get("stages") or [] if s.get("stage") == stage and s.get("dir")]
    return rundir.locate_stage_dir(entries[-1]["dir"], home) if entries else None


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


# -----------------------------------------------------------------------------
# The evaluation as a stage: config, key, run, record


def eval_config(record, run_id, home, suite="all", step=None, max_per_task=None, device_batch_size=None,
                split_tokens=None, bundle_dir=None, data_dir=None):
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
    step = _pick_step(run_id, ckpt_dir, step)
    tok_dir = _stage_dir(record, "tok_train", home)
    if not tok_dir or not os.path.isdir(os.path.join(tok_dir, "tokenizer")):
        raise EvalInputError(f"run {run_id} has no trained tokenizer (tok_train stage {tok_dir or 'missing'})")
    data_dir = _data_dir(data_dir) if data_dir else _stage_dir(record, "data", home)
    evals = SUITES[suite]
    if "bpb" in evals and not data_dir:
        raise EvalInputError(f"run {run_id} has no data stage: --suite {suite} needs data for bits per byte "
                             "(pass --data-dir: a data stage directory, or a folder of parquet shards, the last one held out)")
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


def _data_dir(path):
    """--data-dir: a data stage directory (manifest.json) or a folder of >= 2 parquet shards (the last one val)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise EvalInputError(f"--data-dir {path}: not a directory")
    shards = [f for f in os.listdir(path) if f.endswith(".parquet")]
    if not os.path.exists(os.path.join(path, "manifest.json")) and len(shards) < 2:
        raise EvalInputError(f"--data-dir {path}: no manifest.json and {len(shards)} parquet file(s) "
                             "(need train shards and a last, held-out val shard)")
    return path


def _pick_step(run_id, ckpt_dir, step):
    steps = rundir.checkpoint_steps(ckpt_dir)
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
    """The stage key (runners.plan.stage_key, the one key scheme) of everything that decides the result: checkpoint
    dir + step, suite, options, process count (bits per byte rounds its token budget to whole steps of nproc ranks)
    and environment (dtype); "adhoc" keeps it apart from a planned stage with the same options."""
    from runners.plan import stage_key
    return stage_key(_eval_stage(config), {**config, "adhoc": EVAL_KEY_VERSION, "nproc": nproc}, [], env)


def record_eval(run_dir, entry, timeout=30.0):
    """Add (or replace, by key) a stage entry in run.json under the run's lock: read, update, tmp + rename.
    The lock is the one `nanorun apply` holds for its whole run, since an apply rewrites run.json from memory."""
    from runners.execute import Lock
    run_id = os.path.basename(os.path.normpath(run_dir))
    deadline = time.time() + timeout
    while True:
        try:
            with Lock(run_dir, f"run {run_id}"):
                record = rundir.read_run(run_dir)
                stages = [s for s in record.get("stages") or [] if s.get("key") != entry["key"]]
                record["stages"] = stages + [entry]
                rundir.atomic_write_json(os.path.join(run_dir, "run.json"), record)
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
    run_id, record, config, nproc, env, key, dir, stage (the StagePlan to launch), home and cached (the key
    already has a result.json)."""
    from runners.plan import StagePlan
    home = home or rundir.home()
    run_id, record = rundir.find_run(run_ref, home)
    run_dir = rundir.run_dir(run_id, home)
    run_id = record.get("run_id") or run_id
    config = eval_config(record, run_id, home, **options)
    _, train_nproc = _plan_params(record, "base_train")
    stage = _eval_stage(config)
    _, eval_nproc = _plan_params(record, stage)
    nproc = nproc or eval_nproc or train_nproc or 1
    env = _plan_env(record)
    key = eval_key(config, nproc, env)
    plan = StagePlan(name=stage, module=f"nanochat.stages.{stage}", key=key, upstream=(),
                     params={"device_type": config.get("device_type")}, env=env, nproc_per_node=nproc, nnodes=1)
    sdir = plan.stage_dir(home)
    return {"run_dir": run_dir, "run_id": run_id, "record": record, "config": config, "nproc": nproc, "env": env,
            "key": key, "dir": sdir, "stage": plan, "home": home, "cached": rundir.stage_state(sdir) == "done"}


def run_eval(job, echo=print):
    """Run a prepared evaluation as the base_eval / chat_eval stage (unless its result exists) and record it in run.json and
    the registry. Returns (entry, result dict, cached). Raises LaunchError when the stage fails."""
    from runners.execute import Lock, launch_stage
    run_dir, config, key, sdir = job["run_dir"], job["config"], job["key"], job["dir"]
    name = _eval_stage(config)
    # chat_eval takes its options as given; "eval" only names the suite (key, run.json entry)
    stage_config = {k: v for k, v in config.items() if not (name == "chat_eval" and k == "eval")}
    cached = rundir.stage_state(sdir) == "done"
    if not cached:
        os.makedirs(sdir, exist_ok=True)
        with Lock(sdir, f"evaluation {sdir}"):
            cached = rundir.stage_state(sdir) == "done"  # again, under the lock: a concurrent eval may have finished it
            if not cached:
                events = os.path.join(sdir, "events.jsonl")
                if os.path.exists(events):  # an evaluation killed mid-way: it has no resume, so start clean
                    os.remove(events)
                echo(f"[{name}] run {job['run_id']}, step {config['step']}, {config['eval']} in {sdir}")
                code, wall, err = launch_stage(job["stage"], stage_config, echo, home=job["home"])
                finished = time.time()
                if err is not None:
                    record_eval(run_dir, _entry(key, sdir, config, status="failed", started_at=finished - wall,
                                                finished_at=finished, wall_seconds=wall, exit_code=code, error=err))
                    _ingest(run_dir, echo)
                    raise LaunchError(f"evaluation failed (exit {code}): {err} "
                                      f"[log: {os.path.join(sdir, 'stdout.log')}]")
                entry = _entry(key, sdir, config, status="success", started_at=finished - wall, finished_at=finished,
                               wall_seconds=wall, exit_code=0)
    result_path = os.path.join(sdir, "result.json")
    if cached:
        old = next((s for s in job["record"].get("stages") or [] if s.get("key") == key), None)
        entry = old if old and old.get("status") in ("success", "cached") else \
            _entry(key, sdir, config, status="cached", finished_at=os.path.getmtime(result_path), exit_code=0)
    record_eval(run_dir, entry)
    _ingest(run_dir, echo)
    return entry, rundir.read_json(result_path), cached


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
        lines.append(f"  {'CORE':<13} {m['core_metric']:.4f} over {m.get('core_tasks')}/22 tasks"
                     + (" (partial: not ranked against full CORE)" if m.get("core_partial") else ""))
        if m.get("core_missing"):
            lines.append(f"  {'missing':<13} {_fmt(m['core_missing'])}")
    for task in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"):
        if task in m:
            lines.append(f"  {task:<13} {m[task]:.4f} (n={(m.get('counts') or {}).get(task)})")
    if m.get("chatcore") is not None:
        lines.append(f"  {'ChatCORE':<13} {m['chatcore']:.4f} ({m.get('source')} model)")
    for name in ("train_bpb", "val_bpb", "num_samples", "eval_seconds"):
        if name in m:
            lines.append(f"  {name:<13} {_fmt(m[name])}")
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
@click.option("--data-dir", type=click.Path(), default=None,
              help="Data for bits per byte instead of the run's data stage (e.g. for an imported run): a data stage "
                   "directory or a folder of parquet shards, the last one held out.")
@click.option("--bundle-dir", type=click.Path(file_okay=False), default=None,
              help="CORE bundle directory (default $NANORUN_HOME/eval_bundle; see `nanorun data core-bundle`).")
@click.option("--nproc", type=int, default=None, help="Processes (default: the run's base_eval/base_train count).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--quiet", "-q", is_flag=True, help="Do not echo the evaluation's output (it is still in stdout.log).")
def eval_command(run, suite, step, max_per_task, device_batch_size, split_tokens, data_dir, bundle_dir, nproc, yes,
                 quiet):
    """Re-evaluate a checkpoint of a recorded run in a new stage directory, record it in the run and the registry.
    RUN is a run id, a unique prefix of one, or a spec name (its newest run). Same inputs => the result is reused.

    Example: nanorun eval cpu_demo --suite core --step 200 --max-per-task 100
    """
    if nproc is not None and nproc < 1:
        raise EvalInputError(f"--nproc: must be >= 1 (got {nproc})")
    job = prepare_eval(run, nproc=nproc, suite=suite, step=step, max_per_task=max_per_task,
                       device_batch_size=device_batch_size, split_tokens=split_tokens, bundle_dir=bundle_dir,
                       data_dir=data_dir)
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
