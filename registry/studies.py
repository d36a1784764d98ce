"""
Studies in the registry: a study's cells read from their run directories (N, D, FLOPs, val bpb, CORE), the isoFLOP
fits of registry.scaling_fit over them, a prediction for a new budget, and the rows of the `studies`,
`study_cells`, `scaling_optima` and `scaling_fits` tables (written by `registry rebuild` and `nanorun study show`).

    from registry.studies import fit_report, predict_report
    report = fit_report("scaling_laws", params="scaling")    # per-budget optima and N* ~ C^a, D* ~ C^b with CIs
    predict_report("scaling_laws", 1e20)                      # depth, tokens, ratio and val bpb it implies

Where a cell's numbers come from (nanochat.rundir): runs/{run_id}/run.json's plan (derived.params: the parameter
groups; base_train's params: the nominal budget train.target_flops) and base_train's result.json (total_tokens,
total_flops, val_bpb); CORE from base_eval's result.json when it ran every task.
"""

import json
import math
import os
import time

from nanochat import rundir, scaling
from registry.scaling_fit import RESAMPLES, Cell, FitError, fit_isoflop, predict

PARAMS = {
    "scaling": "transformer matrices + lm_head (the reference's Kaplan-style count)",
    "all": "every parameter (embeddings and value embeddings included)",
    "matrices": "transformer matrices only",
}
METRICS = {"val_bpb": "min", "core_metric": "max"}   # what the fit looks for at the vertex
MAX_DEPTH = 256


# --- reading ----------------------------------------------------------------------------------------

studies_root = rundir.studies_dir


list_studies = rundir.study_names


def read_study(name, home=None):
    """The study record studies/{name}/study.json (runners.study writes it); RunDirError when there is none."""
    record = rundir.read_json(os.path.join(studies_root(home), name, "study.json"), default=None)
    if record is None:
        known = list_studies(home)
        raise rundir.RunDirError(f"no study {name!r} under {studies_root(home)}"
                                 + (f" (known: {', '.join(known)})" if known else
                                    " (apply a spec with a sweep block first)"))
    if not isinstance(record.get("cells"), list):
        raise rundir.RunDirError(f"{os.path.join(studies_root(home), name, 'study.json')}: malformed study record "
                                 f"(no cells list)")
    return record


def _number(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _text(x):
    return x if x is None or isinstance(x, str) else json.dumps(x, default=str)


def _integer(x):
    return x if isinstance(x, int) and not isinstance(x, bool) and -2 ** 63 <= x < 2 ** 63 else None


def parameter_count(counts, convention, metrics=None):
    """N of a cell in a convention, from the plan's parameter groups (scaling.param_counts' names); without them
    from base_train's result (scaling_params, params_total)."""
    if isinstance(counts, dict) and _number(counts.get("transformer_matrices")):
        tm, lm, total = counts["transformer_matrices"], counts.get("lm_head") or 0, counts.get("total")
        return float({"scaling": tm + lm, "all": total or 0, "matrices": tm}[convention]) or None
    metrics = metrics or {}
    return _number({"scaling": metrics.get("scaling_params"), "all": metrics.get("params_total")}.get(convention))


def _stage(run, name):
    found = [s for s in run.get("stages") or [] if s.get("stage") == name]
    return found[-1] if found else None


def _model(plan):
    """What nanochat.scaling needs to turn a depth into counts, from a cell's plan (base_train's params)."""
    params = next((s.get("params") or {} for s in plan.get("stages") or [] if s.get("stage") == "base_train"), {})
    derived = plan.get("derived") or {}
    return {"vocab_size": derived.get("vocab_size") or params.get("vocab_size") or 32768,
            "aspect_ratio": params.get("aspect_ratio", 64), "head_dim": params.get("head_dim", 128),
            "max_seq_len": params.get("max_seq_len", 2048), "window_pattern": params.get("window_pattern", "SSSL")}


def read_cell(entry, home=None, retired=False):
    """One cell of a study record with its numbers: state (done | the run's status | missing | pending), budget,
    depth, seed, n (per convention), tokens, flops, val_bpb and core_metric (None until known)."""
    overrides = entry.get("overrides") if isinstance(entry.get("overrides"), dict) else {}
    cell = {"cell": entry.get("cell"), "run_id": entry.get("run_id"), "name": entry.get("name"),
            "overrides": overrides, "recorded_status": entry.get("status"), "retired": retired, "state": "pending",
            "budget": _number(overrides.get("train.target_flops")), "depth": overrides.get("model.depth"),
            "seed": overrides.get("seed"), "n": {c: None for c in PARAMS}, "tokens": None, "flops": None,
            "val_bpb": None, "core_metric": None, "wall_seconds": _number(entry.get("wall_seconds")),
            "error": entry.get("error"), "model": None}
    try:
        run = rundir.load_run(str(entry.get("run_id")), home)
    except rundir.RunDirError:
        cell["state"] = "missing" if entry.get("status") not in (None, "pending") else "pending"
        return cell
    plan = run.get("plan") or {}
    derived = plan.get("derived") or {}
    params = next((s.get("params") or {} for s in plan.get("stages") or [] if s.get("stage") == "base_train"), {})
    if _number(params.get("target_flops")) and params["target_flops"] > 0:
        cell["budget"] = float(params["target_flops"])
    cell["depth"] = derived.get("n_layer") or cell["depth"]
    cell["seed"] = run.get("seed") if run.get("seed") is not None else cell["seed"]
    cell["model"] = _model(plan)
    train = _stage(run, "base_train")
    metrics = rundir.result_metrics(train and train.get("result"))
    cell["state"] = "done" if metrics and run.get("status") == "success" else (run.get("status") or "pending")
    if not metrics:
        return cell
    cell["n"] = {c: parameter_count(derived.get("params"), c, metrics) for c in PARAMS}
    cell["tokens"] = _number(metrics.get("total_tokens")) or _number(derived.get("total_tokens"))
    cell["flops"] = _number(metrics.get("total_flops")) or _number(derived.get("total_flops"))
    evaluation = rundir.result_metrics((_stage(run, "base_eval") or {}).get("result"))
    cell["val_bpb"] = _number(metrics.get("val_bpb")) or _number(evaluation.get("val_bpb"))
    if _number(evaluation.get("core_metric")) is not None and not evaluation.get("core_partial"):
        cell["core_metric"] = float(evaluation["core_metric"])
    return cell


def read_cells(record, home=None):
    return [read_cell(e, home) for e in record["cells"] if isinstance(e, dict)] + \
        [read_cell(e, home, retired=True) for e in record.get("retired") or [] if isinstance(e, dict)]


# --- fitting ----------------------------------------------------------------------------------------

def _fit_cells(cells, convention, metric):
    return [Cell(budget=c["budget"], n=c["n"][convention], d=c["tokens"], value=c[metric]) for c in cells
            if c["state"] == "done" and not c["retired"] and c["budget"] and c["n"][convention] and c["tokens"]
            and c[metric] is not None]


def fit_cells(name, cells, convention="scaling", resamples=RESAMPLES, seed=0):
    """The fits of a study's cells (read_cells) in one parameter convention: {"val_bpb": fit, "core_metric": fit or
    {"error"} or None}. FitError (one line) when nothing can be fit: no finished cells, no FLOP budgets, too few
    points in every budget."""
    if convention not in PARAMS:
        raise FitError(f"unknown parameter convention {convention!r} (choose from {', '.join(PARAMS)})")
    current = [c for c in cells if not c["retired"]]
    done = [c for c in current if c["state"] == "done" and c["val_bpb"] is not None]
    if not done:
        states = {}
        for c in current:
            states[c["state"]] = states.get(c["state"], 0) + 1
        shown = ", ".join(f"{k} {v}" for k, v in states.items()) or "no cells"
        raise FitError(f"study {name}: no finished cells to fit yet ({shown}); `nanorun apply` its spec first")
    if not any(c["budget"] for c in done):
        raise FitError(f"study {name}: its cells have no FLOP budget (train.target_flops); an isoFLOP fit groups "
                       f"cells by budget")
    fits = {}
    for metric, sense in METRICS.items():
        points = _fit_cells(current, convention, metric)
        if metric != "val_bpb" and not points:
            fits[metric] = None
            continue
        try:
            fits[metric] = fit_isoflop(points, sense=sense, resamples=resamples, seed=seed)
        except FitError as e:
            if metric == "val_bpb":
                raise FitError(f"study {name}: {e}") from None
            fits[metric] = {"error": str(e)}
    return fits


def fit_report(name, convention="scaling", home=None, resamples=RESAMPLES, seed=0):
    """What `nanorun study show NAME` prints: the study's cells, per-budget optima and the laws across budgets."""
    record = read_study(name, home)
    cells = read_cells(record, home)
    fits = fit_cells(name, cells, convention, resamples, seed)
    current = [c for c in cells if not c["retired"]]
    states = {}
    for c in current:
        states[c["state"]] = states.get(c["state"], 0) + 1
    model = next((c["model"] for c in current if c["model"]), None)
    return {"study": name, "spec_path": record.get("spec_path"), "params": convention,
            "params_description": PARAMS[convention], "cells": len(current), "states": states,
            "fits": fits, "model": model, "fitted_at": time.time(),
            "cell_points": [{k: c[k] for k in ("cell", "run_id", "budget", "depth", "seed", "tokens", "flops",
                                              "val_bpb", "core_metric", "state")} | {"n": c["n"][convention]}
                            for c in current]}


def isoflop_curves(report, metric="val_bpb", samples=64):
    """What an isoFLOP plot of a fit_report draws for one metric, per budget: {"budget", "cells" [(N, value)] (the
    finished cells), "curve" [(N, value)] (the fitted quadratic over the measured N, widened to reach a vertex
    outside them), "vertex" (N*, value) or None, "flags", "used" (whether the optimum enters the laws)}. [] when the
    metric has no fit. Used by the PNG plots (runners.plots) and the TUI's Studies screen."""
    fit = report["fits"].get(metric)
    if not fit or "budgets" not in fit:
        return []
    out = []
    for row in fit["budgets"]:
        cells = sorted((p["n"], p[metric]) for p in report["cell_points"] if p["state"] == "done"
                       and p["budget"] == row["budget"] and p["n"] and p[metric] is not None)
        curve = []
        if row.get("coefficients"):
            lo, hi = math.log10(row["n_range"][0]), math.log10(row["n_range"][1])
            if row["n_star"] is not None:
                lo, hi = min(lo, math.log10(row["n_star"])), max(hi, math.log10(row["n_star"]))
            pad = 0.05 * (hi - lo)
            c0, c1, c2 = row["coefficients"]
            for i in range(samples):
                x = lo - pad + (hi - lo + 2 * pad) * i / (samples - 1)
                u = x - row["center"]
                curve.append((10 ** x, c0 + c1 * u + c2 * u * u))
        vertex = (row["n_star"], row["value_at_vertex"]) if row["n_star"] is not None else None
        out.append({"budget": row["budget"], "cells": cells, "curve": curve, "vertex": vertex,
                    "flags": list(row["flags"]), "used": row["budget"] in fit["used"]})
    return out


def depth_for(n_star, model, convention="scaling"):
    """The depth whose N (in the convention) is nearest N* in log, by nanochat.scaling, and that N."""
    def n_of(depth):
        counts = scaling.param_counts(depth, model["vocab_size"], model["aspect_ratio"], model["head_dim"])
        return parameter_count(counts, convention)
    depth = min(range(1, MAX_DEPTH + 1), key=lambda d: abs(math.log(n_of(d) / n_star)))
    return depth, n_of(depth)


def predict_report(name, flops, convention="scaling", home=None, resamples=RESAMPLES, seed=0):
    """What `nanorun study predict NAME --flops C` prints: N*, D*, the ratio and the val bpb the laws give at C, and
    the nearest depth with the tokens a `train.target_flops: C` run of that depth trains on."""
    report = fit_report(name, convention, home, resamples, seed)
    fit = report["fits"]["val_bpb"]
    p = predict(fit, flops)
    if p is None:
        raise FitError(f"study {name}: no laws to predict with: {fit['reason']}")
    model = report["model"]
    depth, n_depth = depth_for(p["n_star"], model, convention)
    fpt = scaling.flops_per_token(depth, model["vocab_size"], model["aspect_ratio"], model["head_dim"],
                                  model["max_seq_len"], model["window_pattern"])
    tokens = flops / fpt
    flags = ["extrapolated"] if p["extrapolated"] else []
    if depth in (1, MAX_DEPTH):
        flags.append("depth_at_search_limit")
    return {"study": name, "params": convention, "flops": flops, "n_star": p["n_star"], "d_star": p["d_star"],
            "ratio": p["ratio"], "val_bpb": p["value"], "depth": depth, "depth_params": n_depth,
            "depth_tokens": tokens, "depth_ratio": tokens / n_depth, "flags": flags,
            "budget_range": p["budget_range"], "exponents": fit["exponents"]}


# --- registry rows ------------------------------------------------------------------------------------

def _fit_rows(name, convention, fits, now):
    optima, laws = [], []
    for metric, fit in fits.items():
        if not fit or "budgets" not in fit:
            continue
        for r in fit["budgets"]:
            lo, hi = r.get("n_range") or (None, None)
            optima.append((name, convention, metric, r["budget"], r["n_points"], r["n_star"], r["d_star"], r["ratio"],
                           r["value_at_vertex"], lo, hi, list(r["flags"]), r.get("error"), now))
        e = fit["exponents"] or {}
        a, b, v = e.get("a") or {}, e.get("b") or {}, e.get("value") or {}
        ratio = fit["ratio"] or {}
        laws.append((name, convention, metric, len(fit["budgets"]), list(fit["used"]),
                     a.get("value"), a.get("low"), a.get("high"), a.get("coefficient"),
                     b.get("value"), b.get("low"), b.get("high"), b.get("coefficient"),
                     v.get("value"), v.get("coefficient"), ratio.get("mean"), ratio.get("min"), ratio.get("max"),
                     fit["resamples"], fit["valid_resamples"], fit["seed"], fit["confidence"], fit["reason"], now))
    return optima, laws


def study_rows(name, home=None, conventions=tuple(PARAMS), resamples=RESAMPLES, seed=0):
    """The rows of one study in every study table: {"studies": [...], "study_cells": [...], "scaling_optima": [...],
    "scaling_fits": [...]} (tuples in column order). A fit that cannot be made is one scaling_fits row with its
    reason."""
    record = read_study(name, home)
    cells = read_cells(record, home)
    now = time.time()
    rows = {"studies": [(name, _text(record.get("spec_path")), _text(record.get("spec_hash")),
                         _text(record.get("status")),
                         json.dumps(record.get("grid"), default=str), _integer(record.get("seeds")),
                         len(record["cells"]), len(record.get("retired") or []), _number(record.get("created_at")),
                         _number(record.get("updated_at")), _integer(record.get("applies")),
                         os.path.join(studies_root(home), name), now)],
            "study_cells": [(name, _integer(c["cell"]), str(c["run_id"]), _text(c["name"]),
                             json.dumps(c["overrides"], default=str), c["budget"], _integer(c["depth"]),
                             _integer(c["seed"]), _text(c["recorded_status"]), c["state"], c["retired"],
                             c["n"]["scaling"], c["n"]["all"], c["n"]["matrices"], c["tokens"], c["flops"],
                             c["val_bpb"], c["core_metric"], c["wall_seconds"], _text(c["error"])) for c in cells],
            "scaling_optima": [], "scaling_fits": []}
    for convention in conventions:
        try:
            fits = fit_cells(name, cells, convention, resamples, seed)
        except FitError as e:
            rows["scaling_fits"].append((name, convention, "val_bpb", 0, []) + (None,) * 13
                                        + (resamples, None, seed, None, str(e), now))
            continue
        optima, laws = _fit_rows(name, convention, fits, now)
        rows["scaling_optima"] += optima
        rows["scaling_fits"] += laws
    return rows


def write_study_rows(con, name, rows, conventions=tuple(PARAMS)):
    """Replace a study's rows (its fits only for `conventions`) in one transaction."""
    con.begin()
    try:
        for table in ("studies", "study_cells"):
            con.execute(f"DELETE FROM {table} WHERE study = ?", [name])
        for table in ("scaling_optima", "scaling_fits"):
            con.execute(f"DELETE FROM {table} WHERE study = ? AND list_contains(?, params)", [name, list(conventions)])
        for table, values in rows.items():
            if values:
                marks = ", ".join("?" * len(values[0]))
                con.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
        con.commit()
    except Exception:
        con.rollback()
        raise


def write_all(con, home=None, warn=print):
    """Every study under the home into the study tables (registry rebuild). A study record that cannot be read is
    skipped with a warning."""
    names = []
    for name in list_studies(home):
        try:
            rows = study_rows(name, home)
        except rundir.RunDirError as e:
            warn(f"warning: skipped study {name}: {e}")
            continue
        write_study_rows(con, name, rows)
        names.append(name)
    return names
