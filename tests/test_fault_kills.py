"""Issue 14 item 3, the crash half of the fault campaign: `kill -9` of `nanorun apply` (the apply alone, or its
whole process group) or of a stage's worker process, at random moments across a tiny spec's stages (data,
tok_train, base_train, base_eval), each followed by another apply, until one finishes. The finished run must equal
an uninterrupted one: the same val bpb, the same checkpoint tensors, the same loss at every step; no lock may be
left held, no stage process may outlive its apply, and `registry rebuild` must reproduce the registry.

The suite kills at NANORUN_KILL_MOMENTS moments (default 4); bench/fault_campaign.sh kills at 20. Moments are
seeded (NANORUN_KILL_SEED), so a failure reproduces."""

import hashlib
import json
import os
import random
import signal
import time

import pytest
import torch

from test_apply import (assert_unlocked, loss_curve, nanorun, processes_with_arg, read_run, stage_dirs,
                        start_apply, write_corpus, write_spec)

MOMENTS = int(os.environ.get("NANORUN_KILL_MOMENTS", "4"))
SEED = int(os.environ.get("NANORUN_KILL_SEED", "0"))


def tensor_digest(ckpt_dir):
    """sha256 over every tensor of the last checkpoint's model (names, dtypes, shapes and bytes), so that two
    checkpoints compare by content, not by how torch.save laid out the zip."""
    steps = sorted(int(f[len("model_"):-len(".pt")]) for f in os.listdir(ckpt_dir)
                   if f.startswith("model_") and f.endswith(".pt"))
    state = torch.load(os.path.join(ckpt_dir, f"model_{steps[-1]:06d}.pt"), map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return steps[-1], h.hexdigest()


def registry_rows(home):
    out = {}
    for table in ("runs", "stages"):
        proc = nanorun(["query", f"select * from {table}", "--json"], home)
        assert proc.returncode == 0, proc.stderr
        rows = [{k: v for k, v in r.items() if k != "ingested_at"} for r in json.loads(proc.stdout)]  # when, not what
        out[table] = sorted(json.dumps(r, sort_keys=True) for r in rows)
    return out


def final_state(home, spec_path):
    run_id, dirs = stage_dirs(spec_path, home)
    run = read_run(home, run_id)
    with open(os.path.join(dirs["base_train"], "result.json")) as f:
        train = json.load(f)["metrics"]
    with open(os.path.join(dirs["base_eval"], "result.json")) as f:
        evals = json.load(f)["metrics"]
    curve, repeats = loss_curve(dirs["base_train"])
    return {"run": run, "train_val_bpb": train["val_bpb"], "eval_val_bpb": evals["val_bpb"],
            "checkpoint": tensor_digest(os.path.join(dirs["base_train"], "checkpoints")),
            "curve": curve, "repeats": repeats}


def stage_workers(home):
    """pids of stage processes (torchrun and its workers) started for this home."""
    return processes_with_arg(os.path.join(home, "stages"))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    text_dir = str(root / "text")
    write_corpus(text_dir)
    spec_path = write_spec(root / "tiny.yaml", text_dir)
    reference_home = str(root / "reference")
    t0 = time.time()
    proc = nanorun(["apply", spec_path, "--yes"], reference_home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "spec": spec_path, "reference": final_state(reference_home, spec_path),
            "seconds": time.time() - t0}


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_then_apply_again(campaign):
    rng = random.Random(SEED)
    root, spec_path = campaign["root"], campaign["spec"]
    home = str(root / "home")
    run_id, dirs = stage_dirs(spec_path, home)
    killed = []
    for moment in range(MOMENTS):
        log_path = str(root / f"apply_{moment}.log")
        proc = start_apply(spec_path, home, log_path)
        # spread over the pipeline: on average each round advances ~1/MOMENTS of it before the kill
        delay = rng.uniform(0.5, 1.0 + 2 * campaign["seconds"] / MOMENTS)
        target = rng.choice(["apply", "group", "worker"])
        deadline = time.time() + delay
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:  # finished (or failed) before the moment came: every stage is done
            assert proc.returncode == 0, open(log_path).read()[-3000:]
            killed.append((moment, round(delay, 1), "finished first"))
            break
        if target == "worker" and stage_workers(home):
            victim = rng.choice(stage_workers(home))
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=120)  # the apply sees its stage die and stops with that stage failed
        elif target == "group":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        else:
            proc.kill()  # the apply alone: its stage's processes are orphaned and must not corrupt anything
            proc.wait(timeout=30)
        stage = next((s["stage"] for s in read_run(home, run_id)["stages"] if s["status"] not in ("success",
                                                                                                   "cached")), "-")
        killed.append((moment, round(delay, 1), target, stage))
    # apply again until it finishes (an orphaned stage from an `apply`-only kill is waited for, not raced)
    final = nanorun(["apply", spec_path, "--yes"], home, timeout=600)
    assert final.returncode == 0, f"{killed}\n{final.stdout[-3000:]}\n{final.stderr[-3000:]}"
    assert "Traceback" not in final.stderr

    got, want = final_state(home, spec_path), campaign["reference"]
    assert got["run"]["status"] == "success", killed
    assert all(s["status"] in ("success", "cached") for s in got["run"]["stages"]), got["run"]["stages"]
    assert got["train_val_bpb"] == want["train_val_bpb"], killed
    assert got["eval_val_bpb"] == want["eval_val_bpb"], killed
    assert got["checkpoint"] == want["checkpoint"], killed
    assert got["curve"] == want["curve"], killed
    assert all(a == b for _, a, b in got["repeats"]), killed

    # nothing left running or locked
    deadline = time.time() + 30
    while stage_workers(home) and time.time() < deadline:
        time.sleep(0.1)
    assert stage_workers(home) == []
    for directory, _, files in os.walk(home):
        for name in files:
            if name.endswith(".lock"):
                assert_unlocked(os.path.join(directory, name))
    # the registry is a cache of the directories: rebuilding it from them gives the same rows
    before = registry_rows(home)
    rebuilt = nanorun(["registry", "rebuild"], home)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert registry_rows(home) == before
    print(f"kill campaign: {len(killed)} moments: {killed}")
