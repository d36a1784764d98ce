"""
`nanorun import nanochat PATH` and `nanorun export RUN OUT`: bring nanochat checkpoints into the registry as runs,
and take any run's checkpoint out as safetensors or a Hugging Face transformers directory. `nanorun export skypilot
SPEC` writes a spec's SkyPilot task (runners.skypilot).

    nanorun import nanochat ~/.cache/nanochat --tag d20            # base, sft and rl checkpoints of d20
    nanorun import nanochat ./nanochat-d32 --source sft --name d32-hub    # a flat directory (as on the hub)
    nanorun export nanochat-d20 --stage sft --format hf out/d20-sft
    nanorun export cpu_demo --format safetensors out/cpu_demo
    nanorun export skypilot specs/d20.yaml -o d20.sky.yaml

An imported run has no spec and no training: its stages (tok_train, base_train, sft, rl) are content-addressed
directories holding the converted tokenizer and checkpoints (nanochat.interop), and its run.json is written here,
as runners.execute writes a trained run's, so show, eval, chat, serve and the TUI treat it like any other run.
The work is in nanochat.interop / nanochat.export (torch, imported inside the commands); nothing here imports torch.
"""

import hashlib
import json
import os
import re
import socket
import time

import click

from nanochat import rundir
from runners.cli import main
from specs.errors import NanorunError

STAGE_BY_SOURCE = {"base": "base_train", "sft": "sft", "rl": "rl"}


class InteropInputError(NanorunError):
    """A source or target that cannot be imported/exported (bad input: exit code 2)."""
    exit_code = 2


def _name(found, config, name):
    if name:
        if not re.fullmatch(r"[a-z0-9_.-]{1,80}", name):
            raise InteropInputError(f"--name {name!r}: use 1-80 characters of a-z, 0-9, '_', '.', '-'")
        return name
    tag = re.sub(r"[^a-z0-9_.-]+", "-", str(found["tag"]).lower()).strip("-.") or f"d{config['n_layer']}"
    return f"nanochat-{tag}"[:80]


def run_record(run_id, name, found, imported, now):
    """run.json of an imported run: the fields runners.execute writes, an empty plan with the model's dims (the
    registry reads the depth from plan.derived), and an "imported" block: the source, each checkpoint's original
    meta, the files' sha256 and what was patched."""
    config = imported["model_config"]
    stages = [{"stage": s["stage"], "key": s["key"], "dir": s["dir"], "status": "success", "started_at": now,
               "finished_at": now, "wall_seconds": None, "exit_code": 0, "error": None, "imported": True}
              for s in imported["stages"]]
    return {
        "run_id": run_id, "name": name, "spec_path": found["path"], "spec_yaml": None,
        "spec_hash": run_id.rsplit("-", 1)[-1],
        "plan": {"run_id": run_id, "spec_name": name, "derived": {**config}, "stages": [], "imported": True},
        "status": "success", "created_at": now, "started_at": now, "finished_at": now, "git_commit": None,
        "host": socket.gethostname(),
        "hardware": {"nodes": None, "gpus_per_node": None, "gpu": "", "usd_per_gpu_hour": None, "device_type": ""},
        "tags": ["imported", "nanochat"], "seed": None, "applies": 0,
        "imported": {"format": "nanochat", "path": found["path"], "layout": found["layout"], "tag": found["tag"],
                     "checkpoints": [{k: s[k] for k in ("source", "step", "stage", "meta")}
                                     for s in imported["stages"] if "source" in s],
                     "sha256": imported["digests"], "notes": imported["notes"]},
        "stages": stages,
    }


def import_run(path, *, tag=None, step=None, name=None, sources=None, home=None, echo=print):
    """Import a nanochat directory as a run -> (run_id, record, created). Same files (and name) => the same run:
    its stage directories and run.json are reused, not rewritten."""
    from nanochat.interop import InteropError, find_nanochat, import_nanochat  # noqa: PLC0415 (torch)
    home = home or rundir.home()
    try:
        found = find_nanochat(path, tag=tag, step=step, sources=sources)
        imported = import_nanochat(found, home=home, echo=echo)
    except InteropError as e:
        raise InteropInputError(str(e)) from None
    name = _name(found, imported["model_config"], name)
    keys = [s["key"] for s in imported["stages"]]
    run_id = f"{name}-{hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:8]}"
    directory = rundir.run_dir(run_id, home)
    run_json = os.path.join(directory, "run.json")
    if os.path.isfile(run_json):
        return run_id, rundir.read_run(directory), False
    record = run_record(run_id, name, found, imported, time.time())
    rundir.atomic_write_json(run_json, record)
    return run_id, record, True


def _ingest(run_dir, echo):
    try:
        from registry import ingest_run  # noqa: PLC0415
        ingest_run(run_dir)
    except NanorunError as e:
        echo(f"warning: registry not updated ({e}); run `nanorun registry sync` later")


@main.command("import")
@click.argument("kind", type=click.Choice(["nanochat"]))
@click.argument("path", type=click.Path())
@click.option("--tag", default=None, help="Model tag under base_checkpoints/ etc. (default: the deepest d<N>).")
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Checkpoint step (default: each source's newest); sources without it are skipped.")
@click.option("--source", "sources", type=click.Choice(list(STAGE_BY_SOURCE)), multiple=True,
              help="Import only these sources (repeatable; default: all found). A flat directory is imported as "
                   "the first one given, else as base.")
@click.option("--name", default=None, help="Run name (default: nanochat-<tag>).")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="nanorun home (default: $NANORUN_HOME or ~/.cache/nanorun).")
def import_command(kind, path, tag, step, sources, name, home):
    """Import nanochat checkpoints as a run (no training): PATH is a nanochat base directory (tokenizer/,
    base_checkpoints/<tag>/, chatsft_checkpoints/, chatrl_checkpoints/) or a directory holding tokenizer.pkl and
    model_NNNNNN.pt + meta_NNNNNN.json. Importing the same files again gives the same run.

    Example: nanorun import nanochat ~/.cache/nanochat --tag d20, then nanorun show nanochat-d20
    """
    home = home or rundir.home()
    run_id, record, created = import_run(path, tag=tag, step=step, name=name, sources=list(sources) or None,
                                         home=home, echo=click.echo)
    _ingest(rundir.run_dir(run_id, home), click.echo)
    for note in (record.get("imported") or {}).get("notes") or []:
        click.echo(f"note: {note}")
    checkpoints = ", ".join(f"{c['source']} step {c['step']}" for c in record["imported"]["checkpoints"])
    click.echo(f"{'imported' if created else 'already imported as'} run {run_id} ({checkpoints})")
    click.echo(f"next: nanorun show {run_id}")


# -----------------------------------------------------------------------------
# export


def export_target(run_ref, stage=None, step=None, home=None):
    """(run_id, stage, checkpoint_dir, step, tokenizer_dir) of what to export: the run's `stage` (base, sft or rl;
    default its chat model if it has one, else base) at `step` (default: the newest complete one)."""
    home = home or rundir.home()
    run_id, _ = rundir.find_run(run_ref, home)
    run = rundir.load_run(run_id, home)
    found = rundir.run_checkpoints(run)
    if stage is not None:
        wanted = STAGE_BY_SOURCE[stage]
        found = [(s, d) for s, d in found if s == wanted]
        if not found:
            raise InteropInputError(f"run {run_id} has no {wanted} checkpoint to export")
    if not found:
        raise InteropInputError(f"run {run_id} has no checkpoint to export")
    stage_name, ckpt_dir = found[0]
    steps = rundir.checkpoint_steps(ckpt_dir)
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise InteropInputError(f"run {run_id} has no {stage_name} checkpoint at step {step} "
                                f"(available: {', '.join(map(str, steps))})")
    tokenizer_dir = rundir.run_tokenizer(run)
    if tokenizer_dir is None:
        raise InteropInputError(f"run {run_id} has no tokenizer (no tok_train output)")
    return run_id, stage_name, ckpt_dir, step, tokenizer_dir


class _Export(click.Group):
    """`nanorun export skypilot SPEC` and `nanorun export checkpoint RUN OUT ...` are subcommands; any other
    `nanorun export ...` is a checkpoint's export (`export RUN OUT --format ...`), its command line as it always was."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["checkpoint", *args]
        return super().parse_args(ctx, args)


@main.group("export", cls=_Export)
def export_group():
    """Export a run's checkpoint (nanorun export [checkpoint] RUN OUT --format safetensors|hf [--stage S] [--step N];
    a run named skypilot or checkpoint needs the word), or a spec as the SkyPilot task that launches it (nanorun
    export skypilot SPEC [-o FILE]).

    Example: nanorun export cpu_demo --stage sft --format hf out/cpu_demo-hf
    """


@export_group.command("skypilot")
@click.argument("spec_path", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write here (default: stdout).")
def export_skypilot(spec_path, output):
    """Write the SkyPilot task YAML that `apply` launches for SPEC with hardware.launcher: skypilot (resources,
    nodes, bucket as $NANORUN_HOME, setup, run from hardware.skypilot); `sky jobs launch FILE` (or `sky launch`)
    runs it from the nanorun checkout without nanorun following it.

    Example: nanorun export skypilot specs/d20.yaml -o d20.sky.yaml && sky jobs launch d20.sky.yaml
    """
    from runners.cli_run import _make_plan
    from runners.skypilot import task_config, task_yaml
    plan = _make_plan(spec_path)
    config = task_config(plan, spec_path)
    if output is None:
        click.echo(task_yaml(config), nl=False)
        return
    rundir.atomic_write_bytes(os.path.abspath(output), task_yaml(config).encode())
    how = "sky jobs launch" if plan.spec.hardware.skypilot.is_managed else f"sky launch -c {config['name']}"
    click.echo(f"wrote {output} (run {plan.run_id}, workdir {config['workdir']}): launch it with `{how} {output}`")


@export_group.command("checkpoint")
@click.argument("run")
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["safetensors", "hf"]), required=True,
              help="safetensors: weights + nanorun.json + tokenizer.json; hf: a transformers model directory.")
@click.option("--stage", type=click.Choice(list(STAGE_BY_SOURCE)), default=None,
              help="Which model (default: the run's chat model if it has one, else base).")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Checkpoint step (default: the newest).")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="nanorun home (default: $NANORUN_HOME or ~/.cache/nanorun).")
def export_command(run, out, fmt, stage, step, home):
    """Export a run's checkpoint to a new directory OUT: safetensors, or a Hugging Face directory that
    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) and AutoTokenizer.from_pretrained(OUT) load.

    Example: nanorun export cpu_demo --stage sft --format hf out/cpu_demo-hf
    """
    run_id, stage_name, ckpt_dir, step, tokenizer_dir = export_target(run, stage, step, home)
    from nanochat.export import export_checkpoint  # noqa: PLC0415 (torch)
    from nanochat.interop import InteropError  # noqa: PLC0415
    try:
        files = export_checkpoint(ckpt_dir, step, tokenizer_dir, out, fmt, stage=stage_name,
                                  source={"run_id": run_id})
    except InteropError as e:
        raise InteropInputError(str(e)) from None
    click.echo(f"exported run {run_id} {stage_name} step {step} as {fmt} to {os.path.abspath(out)}: "
               f"{', '.join(files)}")
