"""
IsoFLOP scaling-law fits (numpy only; no files): the analysis of nanochat's dev/scaling_analysis.ipynb, with
its degenerate cases made explicit (reference/nanochat.md 5.2, 14.3).

Per FLOP budget C, a quadratic of the metric (val bpb; CORE when present) in log10 N; its vertex is the
compute-optimal N*, the metric at the vertex is the budget's best value, and D* (tokens) is read off the measured
cells at N* by linear interpolation of log D against log N. Across budgets, N* ~ C^a and D* ~ C^b by least squares
in log-log (Hoffmann et al. 2022, approach 2: arXiv 2203.15556), with percentile bootstrap intervals from resampling
the cells within each budget (seeded, so a fit is reproducible).

    from registry.scaling_fit import Cell, fit_isoflop
    fit = fit_isoflop([Cell(budget=1e18, n=3.1e7, d=5.4e9, value=1.02), ...], sense="min")
    fit["exponents"]["a"]       # {"value", "low", "high", "coefficient"}: N* = coefficient * C^value
"""

from dataclasses import dataclass

import numpy as np

from specs.errors import NanorunError

MIN_POINTS = 3          # distinct N per budget: a quadratic needs three
RESAMPLES = 1000
CONFIDENCE = 0.95


class FitError(NanorunError):
    """Data that cannot be fit (too few points): bad input, one line, exit 2."""
    exit_code = 2


@dataclass(frozen=True)
class Cell:
    budget: float     # the nominal FLOP budget the cell was trained at (train.target_flops)
    n: float          # parameters, in the chosen convention
    d: float          # tokens trained on
    value: float      # val bpb (lower is better) or CORE (higher is better)


# --- one budget -----------------------------------------------------------------------------------------

def quadratic_fit(u, y, weights):
    """Least-squares y = c0 + c1 u + c2 u^2 for each row of `weights` (R, n) (bootstrap counts; ones for the plain
    fit), by the 3x3 normal equations, batched. Returns (coefficients (R, 3), ok (R,)): ok is False where the
    weighted points have fewer than MIN_POINTS distinct u (the system is singular there)."""
    u, y, w = np.asarray(u, float), np.asarray(y, float), np.atleast_2d(np.asarray(weights, float))
    _, group = np.unique(u, return_inverse=True)
    per_u = np.zeros((w.shape[0], group.max() + 1))
    np.add.at(per_u.T, group, w.T)
    ok = (per_u > 0).sum(axis=1) >= MIN_POINTS
    powers = np.stack([np.ones_like(u), u, u * u], axis=1)                     # (n, 3)
    lhs = np.einsum("rn,ni,nj->rij", w, powers, powers)                        # (R, 3, 3)
    rhs = np.einsum("rn,ni,n->ri", w, powers, y)                               # (R, 3)
    lhs[~ok] = np.eye(3)
    rhs[~ok] = 0.0
    return np.linalg.solve(lhs, rhs[..., None])[..., 0], ok


def _interp_extrap(x, xs, ys):
    """Piecewise-linear interpolation through (xs, ys) (xs sorted, distinct), extended linearly past both ends."""
    x = np.asarray(x, float)
    inside = np.interp(x, xs, ys)
    lo = ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi = ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return np.where(x < xs[0], lo, np.where(x > xs[-1], hi, inside))


def _budget_arrays(cells):
    x = np.log10([c.n for c in cells])
    y = np.array([c.value for c in cells], float)
    # D per distinct N (seeds of one depth share N and, up to rounding, D): mean of log D
    xs = np.unique(x)
    ds = np.array([np.mean(np.log10([c.d for c, xi in zip(cells, x) if xi == v])) for v in xs])
    return x, y, xs, ds


def fit_budget(cells, sense="min"):
    """The isoFLOP fit of one budget's cells. FitError when they have fewer than MIN_POINTS distinct N. Returns
    {"budget", "n_points", "n_range", "coefficients" (in u = log10 N - center), "center", "n_star", "d_star",
    "ratio", "value_at_vertex", "best_cell", "flags"}. Flags: "opens_downward"/"opens_upward" (no optimum: the
    vertex is a maximum of bpb or a minimum of CORE; n_star is then None), "vertex_below_grid"/"vertex_above_grid"
    (the optimum lies outside the measured N: reported, but it is an extrapolation)."""
    budget = cells[0].budget
    x, y, xs, ds = _budget_arrays(cells)
    if len(xs) < MIN_POINTS:
        raise FitError(f"budget {budget:.3g} FLOPs: {len(xs)} point{'s' if len(xs) != 1 else ''} with distinct N "
                       f"({len(cells)} cells); a quadratic fit needs at least {MIN_POINTS}")
    center = float(x.mean())
    coef, _ = quadratic_fit(x - center, y, np.ones((1, len(x))))
    c0, c1, c2 = (float(v) for v in coef[0])
    best = min(cells, key=lambda c: c.value) if sense == "min" else max(cells, key=lambda c: c.value)
    out = {"budget": budget, "n_points": len(cells), "n_distinct": len(xs), "n_range": [10 ** xs[0], 10 ** xs[-1]],
           "center": center, "coefficients": [c0, c1, c2], "n_star": None, "d_star": None, "ratio": None,
           "value_at_vertex": None, "best_cell": {"n": best.n, "d": best.d, "value": best.value}, "flags": []}
    if (c2 <= 0) if sense == "min" else (c2 >= 0):
        out["flags"].append("opens_downward" if sense == "min" else "opens_upward")
        return out
    u = -c1 / (2 * c2)
    x_star = center + u
    if x_star < xs[0]:
        out["flags"].append("vertex_below_grid")
    elif x_star > xs[-1]:
        out["flags"].append("vertex_above_grid")
    n_star, d_star = 10 ** x_star, 10 ** float(_interp_extrap(x_star, xs, ds))
    out.update(n_star=n_star, d_star=d_star, ratio=d_star / n_star, value_at_vertex=c0 + c1 * u + c2 * u * u)
    return out


def usable(row):
    """Whether a budget's optimum enters the fits across budgets: a real optimum inside the measured grid."""
    return row.get("n_star") is not None and not row["flags"]


# --- across budgets ----------------------------------------------------------------------------------------

def _slopes(x, ys):
    """Least-squares slope and intercept of each row of ys (R, k) against x (k,)."""
    xc = x - x.mean()
    slope = (ys - ys.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    return slope, ys.mean(axis=1) - slope * x.mean()


def _bootstrap(groups, rows, sense, resamples, seed):
    """log10 N*, log10 D* and the metric at the vertex of every resample (R, k) for the usable budgets, and the mask
    of resamples in which every budget still has a proper optimum."""
    rng = np.random.default_rng(seed)
    k = len(groups)
    log_n, log_d, value = (np.empty((resamples, k)) for _ in range(3))
    valid = np.ones(resamples, bool)
    for j, (cells, row) in enumerate(zip(groups, rows)):
        x, y, xs, ds = _budget_arrays(cells)
        n = len(cells)
        draws = rng.integers(0, n, size=(resamples, n))
        w = np.zeros((resamples, n))
        np.add.at(w, (np.repeat(np.arange(resamples), n), draws.ravel()), 1.0)
        coef, ok = quadratic_fit(x - row["center"], y, w)
        c0, c1, c2 = coef.T
        proper = ok & ((c2 > 0) if sense == "min" else (c2 < 0))
        c2 = np.where(proper, c2, 1.0)
        u = -c1 / (2 * c2)
        log_n[:, j] = row["center"] + u
        log_d[:, j] = _interp_extrap(log_n[:, j], xs, ds)
        value[:, j] = c0 + c1 * u + c2 * u * u
        valid &= proper
    return log_n, log_d, value, valid


def power_law(budgets, values, boot=None, confidence=CONFIDENCE):
    """value = coefficient * C^exponent by least squares in log10-log10; with boot (R, k) log10 values of the
    resamples, the percentile interval of the exponent."""
    x = np.log10(budgets)
    slope, intercept = _slopes(x, np.log10(values)[None, :])
    out = {"value": float(slope[0]), "coefficient": float(10 ** intercept[0]), "low": None, "high": None}
    if boot is not None and len(boot):
        s, _ = _slopes(x, boot)
        tail = (1 - confidence) / 2 * 100
        out["low"], out["high"] = (float(v) for v in np.percentile(s, [tail, 100 - tail]))
    return out


def fit_isoflop(cells, sense="min", resamples=RESAMPLES, seed=0, confidence=CONFIDENCE):
    """Per-budget optima and the laws across budgets. A budget that cannot be fit (FitError) is listed with its
    error and left out, as are flagged budgets (no optimum, or one outside the grid); the laws need two usable
    budgets. FitError when no budget can be fit at all. Returns {"budgets": [rows], "used": [budgets],
    "exponents": {"a": N* law, "b": D* law, "value": the metric at the optimum vs C} or None, "ratio",
    "resamples", "valid_resamples", "seed", "confidence", "reason"}."""
    by_budget = {}
    for c in cells:
        by_budget.setdefault(c.budget, []).append(c)
    rows, groups, errors = [], [], []
    for budget in sorted(by_budget):
        try:
            row = fit_budget(by_budget[budget], sense)
        except FitError as e:
            errors.append(str(e))
            rows.append({"budget": budget, "n_points": len(by_budget[budget]), "error": str(e), "n_star": None,
                         "d_star": None, "ratio": None, "value_at_vertex": None, "flags": ["too_few_points"]})
            continue
        rows.append(row)
        if usable(row):
            groups.append(by_budget[budget])
    if not cells or len(errors) == len(rows):
        raise FitError("; ".join(errors) if errors else "no finished cells to fit")
    used = [r for r in rows if "error" not in r and usable(r)]
    out = {"budgets": rows, "used": [r["budget"] for r in used], "exponents": None, "ratio": None,
           "resamples": resamples, "valid_resamples": None, "seed": seed, "confidence": confidence, "reason": None}
    if len(used) < 2:
        out["reason"] = (f"{len(used)} budget{'s' if len(used) != 1 else ''} with an optimum inside the grid; "
                         f"the laws across budgets need at least 2")
        return out
    budgets = np.array([r["budget"] for r in used])
    n_star, d_star = np.array([r["n_star"] for r in used]), np.array([r["d_star"] for r in used])
    value = np.array([r["value_at_vertex"] for r in used])
    log_n, log_d, boot_value, valid = _bootstrap(groups, used, sense, resamples, seed)
    positive = bool((value > 0).all())   # a power law of the metric itself needs it positive (bpb always is)
    ok = valid & (boot_value > 0).all(axis=1) if positive else valid
    out["valid_resamples"] = int(ok.sum())
    out["exponents"] = {
        "a": power_law(budgets, n_star, log_n[ok], confidence),
        "b": power_law(budgets, d_star, log_d[ok], confidence),
        "value": power_law(budgets, value, np.log10(boot_value[ok]), confidence) if positive else None,
    }
    ratios = d_star / n_star
    out["ratio"] = {"mean": float(ratios.mean()), "min": float(ratios.min()), "max": float(ratios.max())}
    return out


def predict(fit, flops):
    """N*, D*, their ratio and the metric at the optimum the laws give for `flops`; extrapolated = outside the
    budgets the laws were fit on. None when the fit has no laws."""
    e = fit.get("exponents")
    if not e:
        return None
    n = e["a"]["coefficient"] * flops ** e["a"]["value"]
    d = e["b"]["coefficient"] * flops ** e["b"]["value"]
    value = e["value"]["coefficient"] * flops ** e["value"]["value"] if e.get("value") else None
    lo, hi = min(fit["used"]), max(fit["used"])
    return {"flops": flops, "n_star": n, "d_star": d, "ratio": d / n, "value": value,
            "extrapolated": not (lo * (1 - 1e-9) <= flops <= hi * (1 + 1e-9)), "budget_range": [lo, hi]}
