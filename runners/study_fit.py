"""
The text of `nanorun study show NAME` (per-budget optima and the laws across budgets) and `nanorun study predict
NAME --flops C`, over registry.studies; and recording a fit in the registry's study tables.

    from registry.studies import fit_report
    from runners.study_fit import render_fit
    print(render_fit(fit_report("scaling_laws")))
"""

import math

from specs.errors import InputError

FLAG_TEXT = {
    "vertex_below_grid": "the optimum is below the smallest N measured (an extrapolation: add smaller depths)",
    "vertex_above_grid": "the optimum is above the largest N measured (an extrapolation: add larger depths)",
    "opens_downward": "the fit opens downward: no minimum in this budget",
    "opens_upward": "the fit opens upward: no maximum in this budget",
    "too_few_points": "too few points for a quadratic",
}
METRIC_NAMES = {"val_bpb": "val bpb", "core_metric": "CORE"}


def parse_flops(text):
    """A --flops value (1e20, 2.5e19): positive and finite, else InputError (one line, exit 2)."""
    try:
        flops = float(str(text).replace("_", ""))
    except ValueError:
        raise InputError(f"--flops: not a number: {text!r} (e.g. --flops 1e20)") from None
    if not math.isfinite(flops) or flops <= 0:
        raise InputError(f"--flops: must be a positive number of FLOPs (got {text})")
    return flops


def _g(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


def _law(name, law):
    if law is None:
        return []
    ci = f"  [{law['low']:.3f}, {law['high']:.3f}]" if law.get("low") is not None else ""
    return [f"  {name:<9} ~ C^{law['value']:.3f}{ci}   ({name} = {law['coefficient']:.4g} * C^{law['value']:.3f})"]


def _render_metric(metric, fit):
    label = METRIC_NAMES[metric]
    if fit is None:
        return []
    if "budgets" not in fit:
        return [f"{label}: no fit ({fit['error']})"]
    lines = [f"{label}: optimum per FLOP budget (a quadratic in log10 N; its vertex is N*)",
             f"  {'budget':>9} {'cells':>5} {'N measured':>17} {'N*':>9} {'D*':>9} {'D*/N*':>7} "
             f"{label + '*':>9}  flags"]
    for r in fit["budgets"]:
        lo, hi = r.get("n_range") or (None, None)
        measured = f"{_g(lo)}-{_g(hi)}" if lo else "-"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}"
        value = "-" if r["value_at_vertex"] is None else f"{r['value_at_vertex']:.4f}"
        lines.append(f"  {r['budget']:>9.3g} {r['n_points']:>5} {measured:>17} {_g(r['n_star']):>9} "
                     f"{_g(r['d_star']):>9} {ratio:>7} {value:>9}  {', '.join(r['flags']) or 'ok'}")
    flagged = sorted({f for r in fit["budgets"] for f in r["flags"]})
    lines += [f"  {f}: {FLAG_TEXT.get(f, f)}" for f in flagged]
    lines += [f"  error: {r['error']}" for r in fit["budgets"] if r.get("error")]
    if not fit["exponents"]:
        lines.append(f"  laws across budgets: none ({fit['reason']})")
        return lines
    used = ", ".join(f"{b:.3g}" for b in fit["used"])
    lines += [f"  laws over {len(fit['used'])} budgets ({used}), with {fit['confidence']:.0%} bootstrap intervals:",
              f"  {fit['resamples']} resamples of the cells within budgets, {fit['valid_resamples']} with an optimum "
              f"in every budget (seed {fit['seed']})"]
    e = fit["exponents"]
    lines += _law("N*", e["a"]) + _law("D*", e["b"]) + _law(label + "*", e.get("value"))
    r = fit["ratio"]
    lines.append(f"  tokens:params at the optimum: {r['min']:.1f}-{r['max']:.1f} (mean {r['mean']:.1f})")
    return lines


def render_fit(report):
    states = ", ".join(f"{k} {v}" for k, v in report["states"].items())
    lines = [f"study {report['study']}  ({report['cells']} cells: {states})",
             f"N (--params {report['params']}): {report['params_description']}", ""]
    for metric, fit in report["fits"].items():
        block = _render_metric(metric, fit)
        if block:
            lines += block + [""]
    return "\n".join(lines).rstrip()


def render_predict(p):
    lo, hi = p["budget_range"]
    where = "extrapolated beyond" if "extrapolated" in p["flags"] else "within"
    bpb = "-" if p["val_bpb"] is None else f"{p['val_bpb']:.4f}"
    lines = [f"study {p['study']} at C = {p['flops']:.3g} FLOPs  (N: --params {p['params']}; {where} the "
             f"budgets fitted, {lo:.3g}-{hi:.3g})",
             f"  N*         {p['n_star']:.4g} parameters   (N* ~ C^{p['exponents']['a']['value']:.3f})",
             f"  D*         {p['d_star']:.4g} tokens       (D* ~ C^{p['exponents']['b']['value']:.3f})",
             f"  D*/N*      {p['ratio']:.2f} tokens per parameter",
             f"  val bpb    {bpb} expected at the optimum",
             f"  depth      {p['depth']}: N = {p['depth_params']:.4g}; with train.target_flops {p['flops']:.3g} it "
             f"trains on {p['depth_tokens']:.4g} tokens ({p['depth_ratio']:.2f} per parameter)"]
    if "depth_at_search_limit" in p["flags"]:
        lines.append("  warning: the depth is at the end of the range searched; N* is far from any model here")
    return "\n".join(lines)


def record_fit(name, convention, home=None, timeout=2.0):
    """Write the study's rows (its fit in `convention`) to the registry. Returns None, or why it could not (another
    process holds the file, a newer schema): the fit is still shown."""
    from registry.db import connect, registry_path
    from registry.studies import study_rows, write_study_rows
    from specs.errors import RegistryError
    rows = study_rows(name, home, conventions=(convention,))
    try:
        con = connect(registry_path(home), timeout=timeout)
    except RegistryError as e:
        return str(e)
    try:
        write_study_rows(con, name, rows, conventions=(convention,))
    finally:
        con.close()
    return None
