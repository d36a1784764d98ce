"""
`nanorun compare A B`: does variant B beat baseline A beyond noise, and what is it worth in compute? A and B are
runs (an id, a unique prefix, a spec name or a spec file: its newest run) or studies; a run stands for every
finished run of its recipe (its spec minus the seed), a study for its finished cells (one recipe: a study of seeds).

    from runners.compare import compare, render_compare
    print(render_compare(compare("d12-1a2b3c4d", "d12_wd-5e6f7a8b")))

Reports the field-by-field spec diff, the final val bpb per side (mean +- sample std over seeds), Welch's t-test
(the t distribution's CDF via the regularized incomplete beta function; no scipy) and the compute multiplier: the
FLOPs the baseline needs to reach the variant's final val bpb, by log-log interpolation of the baseline's
val-bpb-vs-FLOPs curve (flagged when it has to extrapolate), over the FLOPs the variant used.
"""

import hashlib
import json
import math
import os

import yaml

from nanochat import rundir
from specs.errors import InputError

# --- statistics ----------------------------------------------------------------------------------------


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), which
    converges fast for x < (a+1)/(a+b+2); the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) covers the rest.
    (Abramowitz & Stegun 26.5.8.)"""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1] (got {x})")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                     + b * math.log1p(-x)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),            # even step d_2m
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_2m+1
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return front * h


def t_cdf(t, df):
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional, as Welch's is)."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def welch(a, b):
    """Welch's unequal-variance t-test of mean(b) - mean(a): {"t", "df", "p"} (two-sided), or None with fewer than
    two values on a side or no spread at all."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        return None
    t = (mb - ma) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return {"t": t, "df": df, "p": betainc(df / 2, 0.5, df / (df + t * t))}


# --- the runs of a side ----------------------------------------------------------------------------------


def _spec(run):
    try:
        spec = yaml.safe_load(run.get("spec_yaml") or "") or {}
    except yaml.YAMLError:
        spec = {}
    return spec if isinstance(spec, dict) else {}


def recipe_key(run):
    """The spec minus its seed: seeds of one recipe share it (a run without a spec is a recipe of its own)."""
    spec = {k: v for k, v in _spec(run).items() if k != "seed"}
    if not spec:
        return str(run.get("run_id"))
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _train(run):
    stages = [s for s in run.get("stages") or [] if s.get("stage") == "base_train"]
    return stages[-1] if stages else None


def _finished(run):
    return bool(rundir.result_metrics((_train(run) or {}).get("result")).get("val_bpb") is not None)


def _all_runs(home):
    runs = {}
    for run_id in rundir.run_ids(home):
        try:
            runs[run_id] = rundir.load_run(run_id, home)
        except rundir.RunDirError:
            continue
    return runs


def side(ref, home=None, runs=None):
    """(label, [loaded runs]) that `ref` stands for; InputError when it names nothing finished, RunDirError when it
    names no run or study."""
    runs = _all_runs(home) if runs is None else runs
    study = os.path.join(home or rundir.home(), "studies", ref, "study.json")
    if os.path.isfile(study):
        record = rundir.read_json(study)
        members = [runs[c["run_id"]] for c in record.get("cells") or [] if c.get("run_id") in runs
                   and _finished(runs[c["run_id"]])]
        if not members:
            raise InputError(f"study {ref}: no finished cells to compare")
        if len({recipe_key(r) for r in members}) > 1:
            raise InputError(f"study {ref}: its cells are {len({recipe_key(r) for r in members})} recipes (a grid); "
                             f"compare takes one recipe per side: name one cell's run instead")
        return f"study {ref}", members
    if ref.endswith((".yaml", ".yml")) and os.path.isfile(ref):   # a spec: its newest run, by the spec's name
        import specs
        ref = specs.load(ref).name
    run_id = rundir.match_run(ref, runs, rundir.runs_dir(home))
    if not _finished(runs[run_id]):
        raise InputError(f"run {run_id}: no finished base_train (no final val bpb) to compare")
    key = recipe_key(runs[run_id])
    members = [r for r in runs.values() if recipe_key(r) == key and _finished(r)]
    return run_id, sorted(members, key=lambda r: (r.get("seed") is None, r.get("seed"), r["run_id"]))


# --- what is compared ----------------------------------------------------------------------------------


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def spec_diff(a, b):
    """[{"field", "a", "b"}] of the fields whose values differ (seed left out: each side lists its seeds)."""
    fa, fb = flatten({k: v for k, v in _spec(a).items() if k != "seed"}), \
        flatten({k: v for k, v in _spec(b).items() if k != "seed"})
    return [{"field": f, "a": fa.get(f), "b": fb.get(f)} for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)]


def curve(run):
    """[(FLOPs, val bpb)] of a run's base_train, from its events (FLOPs = flops_per_token * batch * step)."""
    train = _train(run)
    metrics = rundir.result_metrics(train.get("result"))
    per_step = (metrics.get("flops_per_token") or 0) * (metrics.get("total_batch_size") or 0)
    if not per_step and metrics.get("num_iterations") and metrics.get("total_flops"):
        per_step = metrics["total_flops"] / metrics["num_iterations"]
    points = {}
    for _, event in rundir.read_events(os.path.join(train["path"], "events.jsonl")):
        values, step = event.get("values"), event.get("step")
        if event.get("kind") != "metric" or not isinstance(values, dict) or not isinstance(step, int) or step <= 0:
            continue
        value = values.get("val/bpb", values.get("val_bpb"))
        if isinstance(value, (int, float)) and value > 0:
            points[step * per_step] = float(value)
    return sorted(points.items())


def flops_to_reach(points, target):
    """FLOPs at which the curve [(FLOPs, bpb)] first reaches `target`, interpolated in log-log, and whether it had
    to extrapolate (the target is beyond the curve's last point, or above its first). None when it cannot tell."""
    points = [(f, v) for f, v in points if f > 0]
    if len(points) < 2:
        return None, False
    logs = [(math.log(f), math.log(v)) for f, v in points]
    y = math.log(target)
    hit = next((i for i, (_, v) in enumerate(logs) if v <= y), None)
    if hit is not None and hit > 0:
        (x0, y0), (x1, y1) = logs[hit - 1], logs[hit]
        return math.exp(x0 + (y - y0) * (x1 - x0) / (y1 - y0)), False
    (x0, y0), (x1, y1) = logs[:2] if hit == 0 else logs[-2:]
    if y1 >= y0:   # flat or rising: no trend to extend
        return None, True
    return math.exp(x0 + (y - y0) * (x1 - x0) / (y1 - y0)), True


def _mean_curve(runs):
    """The baseline's curve averaged over its seeds, at the FLOPs every seed logged."""
    curves = [dict(curve(r)) for r in runs]
    common = set(curves[0]).intersection(*curves[1:])
    return [(f, sum(c[f] for c in curves) / len(curves)) for f in sorted(common)]


def _summary(label, runs):
    finals = [float(rundir.result_metrics(_train(r)["result"])["val_bpb"]) for r in runs]
    flops = [rundir.result_metrics(_train(r)["result"]).get("total_flops") for r in runs]
    mean, std = mean_std(finals)
    return {"label": label, "run_ids": [r["run_id"] for r in runs], "seeds": [r.get("seed") for r in runs],
            "val_bpb": finals, "mean": mean, "std": std, "n": len(finals),
            "flops": sum(flops) / len(flops) if all(isinstance(f, (int, float)) for f in flops) else None}


def compare(a, b, home=None, alpha=0.05):
    """Baseline `a` against variant `b`: {"a", "b" (side summaries), "diff" (spec fields), "difference" (mean b - a),
    "welch" ({"t", "df", "p", "significant"} or None), "multiplier" ({"value", "baseline_flops", "variant_flops",
    "extrapolated"} or None)}."""
    runs = _all_runs(home)
    (label_a, runs_a), (label_b, runs_b) = side(a, home, runs), side(b, home, runs)
    sa, sb = _summary(label_a, runs_a), _summary(label_b, runs_b)
    test = welch(sa["val_bpb"], sb["val_bpb"])
    if test:
        test["significant"] = test["p"] < alpha
        test["alpha"] = alpha
    multiplier = None
    needed, extrapolated = flops_to_reach(_mean_curve(runs_a), sb["mean"])
    if needed and sb["flops"]:
        multiplier = {"value": needed / sb["flops"], "baseline_flops": needed, "variant_flops": sb["flops"],
                      "target_bpb": sb["mean"], "extrapolated": extrapolated}
    return {"a": sa, "b": sb, "diff": spec_diff(runs_a[0], runs_b[0]), "difference": sb["mean"] - sa["mean"],
            "welch": test, "multiplier": multiplier}


def render_compare(c):
    a, b = c["a"], c["b"]

    def side_line(name, s):
        std = f" +- {s['std']:.4f}" if s["std"] is not None else ""
        seeds = ", ".join(str(x) for x in s["seeds"])
        return f"  {name} {s['label']}: val bpb {s['mean']:.4f}{std} (n={s['n']}, seeds {seeds})"

    lines = [f"compare {a['label']} (baseline A) with {b['label']} (variant B)", ""]
    lines.append(f"spec diff ({len(c['diff'])} field{'s' if len(c['diff']) != 1 else ''}, seed aside):"
                 if c["diff"] else "spec diff: none (the same recipe, seed aside)")
    lines += [f"  {d['field']}: {d['a']!r} -> {d['b']!r}" for d in c["diff"]]
    lines += ["", "final val bpb (lower is better):", side_line("A", a), side_line("B", b),
              f"  B - A = {c['difference']:+.4f}"]
    w = c["welch"]
    if w:
        verdict = "significant" if w["significant"] else "not significant"
        lines.append(f"  Welch's t = {w['t']:.3f}, df = {w['df']:.1f}, p = {w['p']:.4g}: {verdict} at {w['alpha']}")
    else:
        lines.append("  Welch's t-test: needs at least 2 seeds per side with some spread (add seeds: sweep.seeds)")
    m = c["multiplier"]
    if m:
        how = "extrapolated beyond the baseline's curve" if m["extrapolated"] else "interpolated on its curve"
        lines.append(f"compute multiplier {m['value']:.3g}x: the baseline needs {m['baseline_flops']:.3g} FLOPs to "
                     f"reach B's {m['target_bpb']:.4f} ({how}); B used {m['variant_flops']:.3g}")
    else:
        lines.append("compute multiplier: unknown (the baseline logged too few val bpb points, or its curve does not "
                     "fall where it would have to be extended)")
    return "\n".join(lines)
