"""
Scaling-law analysis of studies and comparisons (issue 12 items 4-5): isoFLOP fits recover known optima and
exponents from synthetic cells, degenerate budgets are flagged or refused, `nanorun study show|predict` and
`nanorun compare` work on a synthetic $NANORUN_HOME (run directories and a study record as the runners write
them; no training), and the t distribution matches known values.

    .venv/bin/python -m pytest -q tests/test_study_fit.py
"""

import hashlib
import json
import math
import os
import shutil

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from nanochat import scaling
from registry.db import registry_path
from registry.scaling_fit import Cell, FitError, fit_budget, fit_isoflop, predict
from runners.cli import main
from runners.compare import betainc, flops_to_reach, t_cdf, welch

# Synthetic truth: N*(C) = K_N C^A (so D* = C / (6 N*) ~ C^(1-A)), bpb at the optimum = 2 C^-0.05, and a bowl of
# curvature H in log10 N around N*.
A, K_N, H = 0.54, 1e8 / 1e18 ** 0.54, 0.1
BUDGETS = [1e18, 2.15e18, 4.64e18, 1e19]


def n_star(c):
    return K_N * c ** A


def bpb_star(c):
    return 2.0 * c ** -0.05


def synthetic(budgets=BUDGETS, grid=np.logspace(7.5, 9.1, 7), noise=0.0, seeds=1, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    cells = []
    for c in budgets:
        for n in grid:
            for _ in range(seeds):
                value = bpb_star(c) + H * (math.log10(n) - math.log10(n_star(c))) ** 2 + rng.normal(0, noise)
                cells.append(Cell(budget=c, n=float(n), d=c / (6 * n), value=float(value)))
    return cells


# --- the fits ---------------------------------------------------------------------------------------------

def test_exact_bowls_give_the_true_optima_and_exponents():
    fit = fit_isoflop(synthetic(), resamples=200)
    assert fit["used"] == BUDGETS and fit["reason"] is None
    for row, c in zip(fit["budgets"], BUDGETS):
        assert row["flags"] == []
        assert row["n_star"] == pytest.approx(n_star(c), rel=1e-6)
        # log D is linear in log N on an isoFLOP line, so the interpolated D* is exact too
        assert row["d_star"] == pytest.approx(c / (6 * n_star(c)), rel=1e-6)
        assert row["ratio"] == pytest.approx(row["d_star"] / row["n_star"])
        assert row["value_at_vertex"] == pytest.approx(bpb_star(c), abs=1e-9)
    e = fit["exponents"]
    assert e["a"]["value"] == pytest.approx(A, abs=1e-6) and e["b"]["value"] == pytest.approx(1 - A, abs=1e-6)
    assert e["a"]["coefficient"] == pytest.approx(K_N, rel=1e-4)
    assert e["value"]["value"] == pytest.approx(-0.05, abs=1e-6)
    assert e["a"]["low"] == pytest.approx(A, abs=1e-6) and e["a"]["high"] == pytest.approx(A, abs=1e-6)
    p = predict(fit, 1e20)
    assert p["n_star"] == pytest.approx(n_star(1e20), rel=1e-4) and p["extrapolated"]
    assert p["value"] == pytest.approx(bpb_star(1e20), rel=1e-4)
    assert not predict(fit, 3e18)["extrapolated"]


def test_noisy_seeds_recover_the_exponents_within_tolerance_and_the_interval_covers_them():
    """bpb noise of 0.003 (the reference's seed-to-seed spread is of this order), 3 seeds per cell: a and b within
    0.05 of the truth, N* per budget within 25%, and the 95% bootstrap intervals cover the truth."""
    fit = fit_isoflop(synthetic(noise=0.003, seeds=3, rng_seed=1), resamples=1000, seed=0)
    e = fit["exponents"]
    assert abs(e["a"]["value"] - A) < 0.05 and abs(e["b"]["value"] - (1 - A)) < 0.05
    assert e["a"]["low"] < A < e["a"]["high"] and e["b"]["low"] < 1 - A < e["b"]["high"]
    assert e["a"]["high"] - e["a"]["low"] < 0.3
    for row, c in zip(fit["budgets"], BUDGETS):
        assert abs(row["n_star"] / n_star(c) - 1) < 0.25
    assert fit["valid_resamples"] > 900
    again = fit_isoflop(synthetic(noise=0.003, seeds=3, rng_seed=1), resamples=1000, seed=0)
    assert again["exponents"] == e   # seeded: the same intervals every time


def test_a_vertex_outside_the_grid_is_flagged_and_left_out_of_the_laws():
    cells = synthetic(grid=np.logspace(7.0, 8.3, 6))   # N*(1e19) = 3.5e8 is above the largest N measured
    fit = fit_isoflop(cells, resamples=100)
    rows = {r["budget"]: r for r in fit["budgets"]}
    assert rows[1e19]["flags"] == ["vertex_above_grid"] and rows[1e18]["flags"] == []
    assert rows[1e19]["n_star"] > rows[1e19]["n_range"][1]   # reported, as the extrapolation it is
    assert 1e19 not in fit["used"] and len(fit["used"]) >= 2
    low = fit_budget([c for c in synthetic(grid=np.logspace(8.5, 9.5, 4)) if c.budget == 1e18])
    assert low["flags"] == ["vertex_below_grid"]


def test_a_fit_that_opens_downward_has_no_optimum():
    cells = [Cell(1e18, n, 1e9, 1.0 - 0.1 * (math.log10(n) - 8) ** 2) for n in (1e7, 1e8, 1e9, 3e9)]
    row = fit_budget(cells)
    assert row["flags"] == ["opens_downward"] and row["n_star"] is None
    # CORE is maximised: the same shape is a proper optimum there
    assert fit_budget(cells, sense="max")["n_star"] == pytest.approx(1e8, rel=1e-6)


def test_fewer_than_three_points_is_an_error_that_says_so():
    two = [Cell(1e18, 1e8, 1e9, 1.0), Cell(1e18, 2e8, 1e9, 0.9), Cell(1e18, 2e8, 1e9, 0.91)]
    with pytest.raises(FitError, match=r"budget 1e\+18 FLOPs: 2 points with distinct N \(3 cells\); a quadratic "
                                       r"fit needs at least 3"):
        fit_budget(two)
    with pytest.raises(FitError, match="needs at least 3"):
        fit_isoflop(two)
    # beside fittable budgets, the short budget is listed with its error and left out
    fit = fit_isoflop(synthetic(budgets=BUDGETS[1:]) + two, resamples=50)
    short = [r for r in fit["budgets"] if r["budget"] == 1e18]
    assert len(short) == 1 and short[0]["flags"] == ["too_few_points"] and "needs at least 3" in short[0]["error"]
    assert 1e18 not in fit["used"]


def test_one_usable_budget_gives_optima_but_no_laws():
    fit = fit_isoflop(synthetic(budgets=[1e18]), resamples=10)
    assert fit["exponents"] is None and "need at least 2" in fit["reason"]
    assert predict(fit, 1e20) is None


# --- the t distribution -----------------------------------------------------------------------------------

def test_incomplete_beta_and_t_cdf_match_known_values():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, abs=1e-12)            # uniform
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)         # 1 - (1-x)^4 - 4x(1-x)^3
    assert betainc(7.5, 7.5, 0.5) == pytest.approx(0.5, abs=1e-12)
    assert betainc(0.5, 0.5, 0.25) == pytest.approx(2 / math.pi * math.asin(0.5), abs=1e-12)   # arcsine law
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)                 # Cauchy
    for t in (-3.0, -0.5, 0.7, 2.0, 10.0):                                 # df=2 has a closed form
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_cdf(2.228138851986274, 10) == pytest.approx(0.975, abs=1e-9)   # the table's two-sided 5% at df 10
    assert t_cdf(12.706204736174705, 1) == pytest.approx(0.975, abs=1e-9)
    assert t_cdf(1.959963984540054, 1e6) == pytest.approx(0.975, abs=1e-6)  # the normal limit
    assert t_cdf(0.0, 5) == 0.5


def test_welch_on_a_textbook_example():
    a, b = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4], \
        [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    w = welch(a, b)   # Wikipedia's Welch's t-test example 1: t = 2.46 (here b - a), df = 24.99, p = 0.021
    assert w["t"] == pytest.approx(2.46, abs=0.01) and w["df"] == pytest.approx(24.99, abs=0.01)
    assert w["p"] == pytest.approx(0.021, abs=0.001)
    assert welch([1.0], [2.0, 3.0]) is None and welch([1.0, 1.0], [2.0, 2.0]) is None


def test_flops_to_reach_interpolates_in_log_log_and_flags_extrapolation():
    curve = [(1e15 * 2 ** i, 2.0 * (2 ** i) ** -0.1) for i in range(6)]   # bpb = 2 (F/1e15)^-0.1
    target = 2.0 * 10 ** -0.1 * 1.0                                       # reached at 1e16
    assert flops_to_reach(curve, target)[0] == pytest.approx(1e16, rel=1e-9)
    assert flops_to_reach(curve, target)[1] is False
    beyond, extrapolated = flops_to_reach(curve, 2.0 * 100 ** -0.1)       # 1e17: past the last point (3.2e16)
    assert beyond == pytest.approx(1e17, rel=1e-9) and extrapolated
    assert flops_to_reach([(1e15, 1.0), (2e15, 1.1)], 0.5) == (None, True)


# --- a synthetic home: run directories and a study record, as the runners write them --------------------

DEPTHS = [2, 4, 6, 8, 10, 12]
SMALL_BUDGETS = [1e15, 1e16, 1e17]
SMALL_A, SMALL_K = 0.5, 8e6 / 1e15 ** 0.5   # N*(scaling) = 8e6, 2.5e7, 8e7


def _key(*parts):
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def write_run(home, run_id, name, *, depth, budget, val_bpb, seed=0, core=None, spec_extra="", curve=(),
              status="success", batch=2 ** 16):
    """runs/{run_id}/run.json (plan with derived counts, base_train params with the budget) and its base_train
    stage directory (result.json with the numbers base_train writes; events with a val bpb curve: (fraction of the
    run, val bpb) points)."""
    counts = scaling.param_counts(depth)
    fpt = scaling.flops_per_token(depth)
    iterations = max(1, round(budget / (fpt * batch)))
    tokens = batch * iterations
    stages = []
    sdir = os.path.join(home, "stages", f"base_train-{_key(run_id)[:8]}")
    events = "".join(json.dumps({"time": 1.0, "kind": "metric", "step": round(f * iterations),
                                 "values": {"val/bpb": v}}) + "\n" for f, v in curve)
    _write(os.path.join(sdir, "events.jsonl"), events)
    if status == "success":
        _write(os.path.join(sdir, "result.json"), {"stage": "base_train", "status": "success", "metrics": {
            "val_bpb": val_bpb, "total_flops": fpt * tokens, "total_tokens": tokens, "flops_per_token": fpt,
            "total_batch_size": batch, "num_iterations": iterations, "params_total": counts["total"],
            "scaling_params": counts["transformer_matrices"] + counts["lm_head"], "depth": depth}})
    stages.append({"stage": "base_train", "key": _key(run_id), "dir": sdir, "status": status})
    if core is not None:
        edir = os.path.join(home, "stages", f"base_eval-{_key(run_id, 'e')[:8]}")
        _write(os.path.join(edir, "result.json"), {"stage": "base_eval", "status": "success",
                                                   "metrics": {"core_metric": core, "core_partial": False}})
        stages.append({"stage": "base_eval", "key": _key(run_id, "e"), "dir": edir, "status": "success"})
    plan = {"run_id": run_id, "derived": {"n_layer": depth, "params": counts, "vocab_size": 32768,
                                          "total_tokens": tokens, "total_flops": fpt * tokens},
            "stages": [{"stage": "base_train", "params": {"target_flops": budget, "aspect_ratio": 64,
                                                          "head_dim": 128, "max_seq_len": 2048,
                                                          "window_pattern": "SSSL"}}]}
    spec = f"name: {name}\nseed: {seed}\nmodel: {{depth: {depth}}}\ntrain: {{target_flops: {budget}}}\n{spec_extra}"
    _write(os.path.join(home, "runs", run_id, "run.json"), {
        "run_id": run_id, "name": name, "status": status, "plan": plan, "seed": seed, "spec_yaml": spec,
        "created_at": 1.0, "stages": stages})


def write_study(home, name="laws", budgets=SMALL_BUDGETS, depths=DEPTHS, with_core=True, pending=()):
    cells = []
    for c in budgets:
        for d in depths:
            counts = scaling.param_counts(d)
            x = math.log10(counts["transformer_matrices"] + counts["lm_head"])
            dx = x - math.log10(SMALL_K * c ** SMALL_A)
            run_id = f"{name}.d{d}.c{c:.0e}-{_key(name, d, c)[:8]}"
            if (d, c) not in pending:
                write_run(home, run_id, f"{name}.depth{d}", depth=d, budget=c, val_bpb=3.0 * c ** -0.04 + 0.2 * dx * dx,
                          core=0.2 - 0.05 * dx * dx if with_core else None)
            cells.append({"cell": len(cells) + 1, "run_id": run_id, "name": f"{name}.depth{d}",
                          "overrides": {"model.depth": d, "train.target_flops": c, "seed": 0},
                          "status": "pending" if (d, c) in pending else "success"})
    _write(os.path.join(home, "studies", name, "study.json"), {
        "study": name, "spec_path": f"specs/{name}.yaml",
        "grid": {"model.depth": depths, "train.target_flops": budgets},
        "seeds": 1, "status": "success", "cells": cells, "retired": [], "created_at": 1.0, "applies": 1})


def cli(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_study_show_and_predict_on_a_synthetic_home(nanorun_home):
    write_study(nanorun_home)
    code, out, err = cli(["study", "show", "laws", "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["params"] == "scaling" and report["cells"] == 18 and report["states"] == {"done": 18}
    fit = report["fits"]["val_bpb"]
    for row, c in zip(fit["budgets"], SMALL_BUDGETS):
        assert row["flags"] == [] and row["n_star"] == pytest.approx(SMALL_K * c ** SMALL_A, rel=1e-6)
        assert 1 < row["ratio"] < 1e3 and row["d_star"] > 0
    assert fit["exponents"]["a"]["value"] == pytest.approx(SMALL_A, abs=1e-6)
    assert fit["exponents"]["b"]["value"] == pytest.approx(1 - SMALL_A, abs=0.1)   # FLOPs/token is not exactly 6N
    core = report["fits"]["core_metric"]    # CORE is maximised at the same N*
    assert core["budgets"][0]["n_star"] == pytest.approx(SMALL_K * 1e15 ** SMALL_A, rel=1e-6)

    code, text, _ = cli(["study", "show", "laws"])
    assert code == 0 and "N* " in text and "C^0.500" in text and "tokens:params at the optimum" in text
    assert "val bpb: optimum per FLOP budget" in text and "CORE: optimum per FLOP budget" in text

    # the convention is selectable and recorded; all-params N* differs
    code, out, _ = cli(["study", "show", "laws", "--params", "all", "--json"])
    assert code == 0 and json.loads(out)["params"] == "all"
    assert json.loads(out)["fits"]["val_bpb"]["budgets"][0]["n_star"] != fit["budgets"][0]["n_star"]
    con = duckdb.connect(registry_path(nanorun_home), read_only=True)
    try:
        laws = con.execute("SELECT params, metric, a, a_low, a_high, b FROM scaling_fits "
                           "ORDER BY params, metric").fetchall()
        assert [(p, m) for p, m, *_ in laws] == [("all", "core_metric"), ("all", "val_bpb"),
                                                 ("scaling", "core_metric"), ("scaling", "val_bpb")]
        assert laws[-1][2] == pytest.approx(SMALL_A, abs=1e-6)
        assert laws[-1][3] == pytest.approx(SMALL_A, abs=1e-6) and laws[-1][4] == pytest.approx(SMALL_A, abs=1e-6)
        assert con.execute("SELECT count(*) FROM scaling_optima WHERE params = 'scaling' AND metric = 'val_bpb'"
                           ).fetchone()[0] == 3
        assert con.execute("SELECT count(*), count(val_bpb) FROM study_cells WHERE study = 'laws'"
                           ).fetchone() == (18, 18)
    finally:
        con.close()

    code, out, err = cli(["study", "predict", "laws", "--flops", "1e18", "--json"])
    assert code == 0, err
    p = json.loads(out)
    expected_n = SMALL_K * 1e18 ** SMALL_A
    assert p["n_star"] == pytest.approx(expected_n, rel=1e-4) and p["flags"] == ["extrapolated"]
    sizes = {d: scaling.scaling_params(d) for d in range(1, 64)}
    assert p["depth"] == min(sizes, key=lambda d: abs(math.log(sizes[d] / expected_n)))
    assert p["val_bpb"] == pytest.approx(3.0 * 1e18 ** -0.04, rel=1e-4)
    assert p["depth_tokens"] == pytest.approx(1e18 / scaling.flops_per_token(p["depth"]))
    code, text, _ = cli(["study", "predict", "laws", "--flops", "3e16"])
    assert code == 0 and "within the budgets fitted" in text and "depth      " in text


def test_registry_rebuild_fills_the_study_tables(nanorun_home):
    write_study(nanorun_home, with_core=False)
    code, out, err = cli(["registry", "rebuild"])
    assert code == 0, err
    con = duckdb.connect(registry_path(nanorun_home), read_only=True)
    try:
        assert con.execute("SELECT study, n_cells FROM studies").fetchall() == [("laws", 18)]
        rows = con.execute("SELECT params, metric, a, reason FROM scaling_fits ORDER BY params").fetchall()
        assert [r[:2] for r in rows] == [("all", "val_bpb"), ("matrices", "val_bpb"), ("scaling", "val_bpb")]
        assert rows[2][2] == pytest.approx(SMALL_A, abs=1e-6) and rows[2][3] is None
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 18
    finally:
        con.close()


def test_study_bad_input_is_one_line_and_exit_2(nanorun_home):
    write_study(nanorun_home, name="laws")
    write_study(nanorun_home, name="fresh", pending=[(d, c) for d in DEPTHS for c in SMALL_BUDGETS])
    write_study(nanorun_home, name="thin", depths=[2, 4], budgets=[1e15])
    cases = {
        ("study", "show", "nope"): "error: no study 'nope' under",
        ("study", "predict", "nope", "--flops", "1e20"): "error: no study 'nope' under",
        ("study", "show", "fresh"): "error: study fresh: no finished cells to fit yet (pending 18)",
        ("study", "show", "thin"): "error: study thin: budget 1e+15 FLOPs: 2 points with distinct N (2 cells); a "
                                   "quadratic fit needs at least 3",
        ("study", "predict", "laws", "--flops", "abc"): "error: --flops: not a number: 'abc' (e.g. --flops 1e20)",
        ("study", "predict", "laws", "--flops", "-1e20"): "error: --flops: must be a positive number of FLOPs",
        ("study", "predict", "laws", "--flops", "inf"): "error: --flops: must be a positive number of FLOPs",
    }
    for args, start in cases.items():
        code, out, err = cli(list(args))
        lines = err.strip().splitlines()
        assert (code, out, len(lines)) == (2, "", 1), (args, out, err)
        assert lines[0].startswith(start), (args, lines)


def test_a_partly_applied_study_fits_what_is_done(nanorun_home):
    write_study(nanorun_home, pending=[(12, 1e17), (10, 1e17), (8, 1e17), (6, 1e17)])
    code, out, err = cli(["study", "show", "laws", "--json"])
    assert code == 0, err
    fit = json.loads(out)["fits"]["val_bpb"]
    assert [r["flags"] for r in fit["budgets"]] == [[], [], ["too_few_points"]]
    assert fit["used"] == [1e15, 1e16] and fit["exponents"]["a"]["value"] == pytest.approx(SMALL_A, abs=1e-6)
    code, text, _ = cli(["study", "show", "laws"])
    assert code == 0 and "error: budget 1e+17 FLOPs: 2 points" in text
    # a cell deleted from disk: still listed (missing), the fit goes on without it
    record = json.load(open(os.path.join(nanorun_home, "studies", "laws", "study.json")))
    shutil.rmtree(os.path.join(nanorun_home, "runs", record["cells"][0]["run_id"]))
    code, out, _ = cli(["study", "show", "laws", "--json"])
    report = json.loads(out)
    assert code == 0 and report["states"] == {"done": 13, "missing": 1, "pending": 4}
    assert report["fits"]["val_bpb"]["budgets"][0]["n_points"] == 5


# --- compare -------------------------------------------------------------------------------------------------

def _seeds(home, name, finals, extra=""):
    for seed, final in enumerate(finals):
        curve = [(2.0 ** -k, final * 2 ** (0.1 * k)) for k in range(5, -1, -1)]   # bpb ~ FLOPs^-0.1, ending at final
        write_run(home, f"{name}-{_key(name, seed)[:8]}", name, depth=4, budget=1e15, val_bpb=final, seed=seed,
                  spec_extra=extra, curve=curve)


def test_compare_runs_with_seeds(nanorun_home, tmp_path):
    _seeds(nanorun_home, "base", [1.300, 1.304, 1.298])
    _seeds(nanorun_home, "wd", [1.280, 1.283, 1.279], extra="optim: {weight_decay: 0.1}\n")
    code, out, err = cli(["compare", "base", "wd", "--json"])
    assert code == 0, err
    c = json.loads(out)
    assert c["a"]["n"] == 3 and c["b"]["n"] == 3 and c["a"]["seeds"] == [0, 1, 2]
    assert c["a"]["mean"] == pytest.approx(1.3006667, abs=1e-6) and c["difference"] < 0
    assert {d["field"] for d in c["diff"]} == {"name", "optim.weight_decay"}
    assert c["welch"]["p"] < 0.01 and c["welch"]["significant"]
    # the baseline would need more FLOPs than it ran to reach wd's bpb: extended along its own curve (slope -0.1)
    m = c["multiplier"]
    assert m["extrapolated"] and m["value"] == pytest.approx((1.3006667 / 1.2806667) ** 10, rel=1e-2)
    code, out, _ = cli(["compare", "wd", "base", "--json"])   # the other way round: inside wd's curve
    m = json.loads(out)["multiplier"]
    assert not m["extrapolated"] and m["value"] == pytest.approx((1.2806667 / 1.3006667) ** 10, rel=1e-2)
    code, text, _ = cli(["compare", "base", "wd"])
    assert code == 0 and "significant at 0.05" in text and "compute multiplier" in text and "seeds 0, 1, 2" in text
    # a single run per side: no t-test, said so
    _seeds(nanorun_home, "solo", [1.29])
    code, text, _ = cli(["compare", "base", "solo"])
    assert code == 0 and "needs at least 2 seeds per side" in text
    code, _, err = cli(["compare", "base", "nothing"])
    assert code == 2 and err.strip().startswith("error: unknown run 'nothing'")
    # a spec file stands for its newest run; a study of seeds for its cells; a study with a grid is refused
    spec = tmp_path / "wd.yaml"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec.write_text(open(os.path.join(root, "specs", "cpu_demo.yaml")).read().replace("name: cpu_demo", "name: wd"))
    code, out, err = cli(["compare", "base", str(spec), "--json"])
    assert code == 0, err
    assert json.loads(out)["b"]["n"] == 3
    wd = sorted(os.listdir(os.path.join(nanorun_home, "runs")))
    seeds = [{"cell": i + 1, "run_id": r, "overrides": {"seed": i}}
             for i, r in enumerate(x for x in wd if x.startswith("wd-"))]
    _write(os.path.join(nanorun_home, "studies", "wd_seeds", "study.json"), {"study": "wd_seeds", "cells": seeds})
    code, out, err = cli(["compare", "base", "wd_seeds", "--json"])
    assert code == 0 and json.loads(out)["b"]["label"] == "study wd_seeds" and json.loads(out)["b"]["n"] == 3, err
    write_study(nanorun_home, with_core=False)
    code, _, err = cli(["compare", "base", "laws"])
    assert code == 2 and err.strip() == "error: study laws: its cells are 18 recipes (a grid); compare takes one " \
                                        "recipe per side: name one cell's run instead"
