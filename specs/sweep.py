"""
Studies: a spec with a `sweep:` block expands into cells, each an ordinary spec (the base with the cell's values
set). Pure (pydantic + yaml): `runners.study` plans and schedules the cells.

    sweep:
      grid:                                   # dotted paths into the spec -> values; the cartesian product
        model.depth: [10, 12, 14]
        train.target_flops: [1e18, 1e19]
      seeds: 2                                # each combination twice, seed 0 and seed 1

Paths name spec fields (`model.depth`), list items by index (`data.train.0.weight`) and stage options by stage name
(`stages.base_eval.max_per_task`). Every problem points at the sweep entry: an unknown path or an empty list at its
key, a value that makes a cell invalid at that value, with the cells it breaks.

    study = specs.read_study("specs/scaling_laws.yaml")    # None for a plain spec; SpecError listing every problem
    [(c.label, c.spec.name) for c in study.cells]
"""

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field

import pydantic
import yaml

from specs import loader
from specs.errors import SpecError
from specs.schema import DEFAULT_STAGES, STAGE_OPTIONS, Spec

MAX_CELLS = 1000   # a larger study is refused without --yes: likely a typo in a grid, and hours of planning output


@dataclass(frozen=True)
class Cell:
    index: int                 # 0-based, in grid order (the last grid path varies fastest, seeds innermost)
    overrides: dict            # dotted path -> value, in grid order, then "seed"
    spec: Spec                 # the base with the overrides set, named after the study and its values, no sweep block
    positions: dict = field(default_factory=dict)   # dotted path -> "FILE:LINE:COL" of its value in the sweep block

    @property
    def label(self):
        return " ".join(f"{path}={show(value)}" for path, value in self.overrides.items()) or "(base)"


@dataclass(frozen=True)
class Study:
    path: str
    spec: Spec                 # the base spec, with its sweep block
    cells: tuple

    @property
    def name(self):
        return self.spec.name


def show(value):
    """A value as a label shows it: 1e+18 -> 1e18, True -> true, lists/mappings as compact JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{value:g}")
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def cell_count(sweep):
    return math.prod(len(values) for values in sweep.grid.values()) * (sweep.seeds or 1)


# --- paths ------------------------------------------------------------------------------------------

def split_path(path):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _kind(tp):
    """('model', cls) | ('list', item type) | ('value', None) for a field annotation."""
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return "model", tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        return "list", args[0]
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        kinds = [_kind(a) for a in inner]
        return next((k for k in kinds if k[0] != "value"), ("value", None))
    return "value", None


def _stage_names(data):
    items = data.get("stages")
    if not isinstance(items, list):
        return list(DEFAULT_STAGES)
    names = [item if isinstance(item, str) else next(iter(item), None) if isinstance(item, dict) else None
             for item in items]
    return [n for n in names if n]


def path_problem(path, data):
    """Why `path` cannot be swept in the base spec `data` (raw YAML data), or None."""
    if not path or any(p == "" for p in path.split(".")):
        return "not a dotted path into the spec (e.g. model.depth)"
    parts = split_path(path)
    if parts[0] == "sweep":
        return "a sweep cannot set its own sweep block"
    if parts[0] == "name":
        return "cells are named after the study and their values; sweep another field"
    kind, cls, node, done = "model", Spec, data, []
    i = 0
    while i < len(parts):
        part, where = parts[i], ".".join(map(str, done)) or "the spec"
        if cls is Spec and part == "stages" and i + 1 < len(parts):
            stage = parts[i + 1]
            if stage not in STAGE_OPTIONS:
                close = difflib.get_close_matches(str(stage), list(STAGE_OPTIONS), n=1)
                return f"unknown stage {stage!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + \
                    "; stage options are swept as stages.STAGE.OPTION"
            if stage not in _stage_names(data):
                return f"stage {stage!r} is not in this spec's stages ({', '.join(_stage_names(data))})"
            kind, cls, node, done, i = "model", STAGE_OPTIONS[stage], None, done + ["stages", stage], i + 2
            continue
        if kind == "list":
            if not isinstance(part, int):
                return f"{where} is a list: index it with a number (e.g. {where}.0)"
            if isinstance(node, list) and part >= len(node):
                return f"{where} has {len(node)} item(s) in the base spec: index {part} is out of range"
            kind, cls = _kind(cls)
            node = node[part] if isinstance(node, list) else None
        elif kind == "model":
            fields = cls.model_fields
            if part not in fields:
                close = difflib.get_close_matches(str(part), list(fields), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"unknown field {part!r} in {where}{hint}"
            kind, cls = _kind(fields[part].annotation)
            node = node.get(part) if isinstance(node, dict) else None
        else:
            return f"{where} is a single value, it has no field {part!r}"
        done.append(part)
        i += 1
    return None


def _set(data, parts, value):
    """Set `value` at `parts` in raw spec data, creating missing mappings (path_problem has checked the path)."""
    node = data
    if parts[0] == "stages" and len(parts) >= 2:
        items = data.setdefault("stages", list(DEFAULT_STAGES))
        for j, item in enumerate(items):
            name = item if isinstance(item, str) else next(iter(item))
            if name == parts[1]:
                break
        options = {} if isinstance(item, str) else dict(item[name] or {})
        if len(parts) == 2:
            options = value
        else:
            inner = options
            for p in parts[2:-1]:
                inner = inner.setdefault(p, {})
            inner[parts[-1]] = value
        items[j] = {name: options}
        return
    for p in parts[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
            node[p] = {}   # a section left out (or left empty) in the base
        node = node[p]
    node[parts[-1]] = value


# --- naming -----------------------------------------------------------------------------------------

def _slug(value):
    text = show(value).lower()
    text = re.sub(r"[^a-z0-9_.-]+", "_", text).strip("_.-")
    return text if text and len(text) <= 16 else hashlib.sha256(show(value).encode()).hexdigest()[:6]


def cell_name(base, overrides):
    """`base.depth10.target_flops1e18`: the study's name and the cell's values (seeds aside, so seeds of one recipe
    share a name); a hash of the values when that would pass the 80-character limit of a spec name."""
    parts = []
    for path, value in overrides.items():
        if path == "seed":
            continue
        key = next(p for p in reversed(split_path(path)) if isinstance(p, str))
        parts.append(f"{key}{_slug(value)}")
    if not parts:
        return base
    name = ".".join([base] + parts)
    if len(name) > 80:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{base[:70]}.{digest}"
    return name


# --- expansion --------------------------------------------------------------------------------------

def _where(filename, node):
    return f"{filename}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _grid_nodes(root):
    """(sweep key node, {grid path: (key node, value node)}, seeds value node) from the composed YAML."""
    hit = loader._child(root, "sweep")
    if hit is None:
        return None, {}, None
    sweep_key, sweep_node = hit
    grid = loader._child(sweep_node, "grid")
    entries = {}
    if grid is not None and isinstance(grid[1], yaml.MappingNode):
        for k, v in grid[1].value:
            if isinstance(k, yaml.ScalarNode):
                entries[k.value] = (k, v)
    seeds = loader._child(sweep_node, "seeds")
    return sweep_key, entries, seeds[1] if seeds else None


def _culprit(loc, overrides):
    """The override a validation error at schema `loc` is about: one at, above or below the error, else the one that
    shares the longest prefix with it, else the first."""
    if loc[:1] == ["stages"]:   # stages.<index>.<name>.options.<field> -> stages.<name>.<field>
        loc = [p for p in loc if not isinstance(p, int) and p != "options"]
    best, best_score = next(iter(overrides)), -1
    for path in overrides:
        parts, common = split_path(path), 0
        for a, b in zip(parts, loc):
            if a != b:
                break
            common += 1
        score = common + (100 if common == min(len(parts), len(loc)) else 0)
        if score > best_score:
            best, best_score = path, score
    return best


def grid_problems(root, data, filename):
    """Problems of the grid's entries themselves, from the raw YAML (so `nanorun validate` reports them beside the
    base spec's own problems): paths that name no field, empty lists, a value listed twice."""
    grid = (data.get("sweep") or {}).get("grid") if isinstance(data.get("sweep"), dict) else None
    if not isinstance(grid, dict):
        return []
    _, entries, _ = _grid_nodes(root)
    problems = []
    for path, values in grid.items():
        if not isinstance(path, str) or path not in entries:
            continue
        key_node, value_node = entries[path]
        why = path_problem(path, data)
        if why:
            problems.append(f"{_where(filename, key_node)}: sweep.grid.{path}: {why}")
        elif not isinstance(values, list):
            continue   # the schema says so: expected a list
        elif not values:
            problems.append(f"{_where(filename, value_node)}: sweep.grid.{path}: an empty list: give at least one value")
        else:
            seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
            twice = next((v for i, v in enumerate(values) if seen[i] in seen[:i]), None)
            if len(set(seen)) < len(seen):
                problems.append(f"{_where(filename, value_node)}: sweep.grid.{path}: {show(twice)} is listed twice "
                                f"(it would be the same runs)")
    return problems


def entry_name(path, sweep):
    """How a problem names the sweep entry that set `path`: sweep.grid.PATH, or sweep.seeds for the seed."""
    return "sweep.seeds" if path == "seed" and sweep.seeds and "seed" not in sweep.grid else f"sweep.grid.{path}"


def by_position(problems):
    """Problem lines sorted by their FILE:LINE:COL."""
    def key(line):
        m = re.match(r".*?:(\d+):(\d+): ", line)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return sorted(problems, key=key)


def expand_parsed(root, data, base, filename, *, max_cells=MAX_CELLS, over_limit="raise"):
    """-> (cells, problems) for the valid base spec `base` parsed from `data` / node tree `root`.
    Grid problems (unknown paths, empty lists, conflicts) come first; then, unless the study has more than max_cells
    cells (over_limit "raise": one problem saying so; "skip": cells are not checked), every cell is validated and
    its problems reported at the sweep value that causes them."""
    sweep = base.sweep
    sweep_key, entries, seeds_node = _grid_nodes(root)
    where_sweep = _where(filename, sweep_key) if sweep_key is not None else filename
    problems = grid_problems(root, data, filename)
    if sweep.seeds is not None and "seed" in sweep.grid:
        problems.append(f"{_where(filename, seeds_node)}: sweep.seeds: the grid already sets seed; use one or the other")
    if sweep.gpus_per_cell is not None and "hardware.gpus_per_node" in sweep.grid:
        problems.append(f"{_where(filename, entries['hardware.gpus_per_node'][0])}: sweep.grid.hardware.gpus_per_node: "
                        f"sweep.gpus_per_cell already sets each cell's devices; use one or the other")
    if problems:
        return [], problems
    count = cell_count(sweep)
    if count > max_cells:
        if over_limit == "skip":
            return [], []
        dims = " x ".join(f"{len(v)} {p}" for p, v in sweep.grid.items())
        dims += f" x {sweep.seeds} seeds" if sweep.seeds else ""
        return [], [f"{where_sweep}: sweep: {count:,} cells ({dims}) is over {max_cells:,}; "
                    f"pass --yes to plan or apply that many"]

    base_data = {k: v for k, v in data.items() if k != "sweep"}
    value_where = {path: [_where(filename, n) for n in entries[path][1].value]
                   if path in entries and isinstance(entries[path][1], yaml.SequenceNode) else [where_sweep] * len(values)
                   for path, values in sweep.grid.items()}
    seeds = range(sweep.seeds) if sweep.seeds else [None]
    combos = itertools.product(*[list(enumerate(v)) for v in sweep.grid.values()], seeds)
    cells, failures = [], {}   # (position, message) -> [cell numbers]
    for index, combo in enumerate(combos):
        *picks, seed = combo
        overrides, positions = {}, {}
        for path, (i, value) in zip(sweep.grid, picks):
            overrides[path], positions[path] = value, value_where[path][i]
        if seed is not None:
            overrides["seed"] = seed
            positions["seed"] = _where(filename, seeds_node) if seeds_node is not None else where_sweep
        cell_data = copy.deepcopy(base_data)
        for path, value in overrides.items():
            _set(cell_data, split_path(path), copy.deepcopy(value))
        cell_data["name"] = cell_name(base.name, overrides)
        cell_data["tags"] = list(dict.fromkeys(list(base.tags) + [f"study:{base.name}"]))
        if sweep.gpus_per_cell is not None:
            cell_data.setdefault("hardware", {})
            cell_data["hardware"] = dict(cell_data["hardware"] or {}, gpus_per_node=sweep.gpus_per_cell)
        cell = Cell(index=index, overrides=overrides, spec=None, positions=positions)
        try:
            spec = Spec.model_validate(cell_data)
        except pydantic.ValidationError as e:
            for err in e.errors():
                loc = loader._full_loc(err)
                culprit = _culprit(loc, overrides) if overrides else None
                field_path = loader._dotted(loader._yaml_loc(loc))
                pos = positions.get(culprit, where_sweep)
                failures.setdefault((pos, f"{entry_name(culprit, sweep)}: {field_path}: {loader._message(err, loc)}"),
                                    []).append(cell)
            continue
        for pos, message in _horizon_problems(spec, overrides, positions, root, filename):
            failures.setdefault((pos, message), []).append(cell)
        cells.append(Cell(index=index, overrides=overrides, spec=spec, positions=positions))
    def line_col(item):
        numbers = re.findall(r":(\d+):(\d+)$", item[0][0])
        return tuple(map(int, numbers[0])) if numbers else (0, 0)
    for (pos, message), bad in sorted(failures.items(), key=line_col):
        problems.append(f"{pos}: {message} ({which_cells(bad, count)})")
    return cells, problems


def which_cells(bad, count):
    """'cell 3 of 8: model.depth=0 ...' or 'cells 3, 7 of 8' (1-based, as `nanorun plan` numbers them)."""
    if len(bad) == 1:
        return f"cell {bad[0].index + 1} of {count}: {bad[0].label}"
    numbers = ", ".join(str(c.index + 1) for c in bad[:12]) + (", ..." if len(bad) > 12 else "")
    return f"cells {numbers} of {count}"


def _horizon_problems(spec, overrides, positions, root, filename):
    """A cell must have one training horizon: num_iterations and target_flops both set is a conflict (the reference
    silently takes num_iterations), and a swept ratio that a set horizon overrides would sweep nothing."""
    t = spec.train
    def at(field):
        path = f"train.{field}"
        if path in positions:
            return positions[path], f"sweep.grid.{path}"
        node, key_node, _, rest = loader._locate(root, ["train", field])
        return _where(filename, node if not rest else (key_node or node)), path
    out = []
    if t.num_iterations > 0 and t.target_flops > 0:
        pos, name = at("target_flops" if "train.target_flops" in overrides else "num_iterations")
        out.append((pos, f"{name}: conflicting horizons: num_iterations {t.num_iterations} and target_flops "
                         f"{show(t.target_flops)} are both set; set one of them to -1"))
    elif "train.target_param_data_ratio" in overrides and (t.num_iterations > 0 or t.target_flops > 0):
        other = "num_iterations" if t.num_iterations > 0 else "target_flops"
        pos, name = at("target_param_data_ratio")
        out.append((pos, f"{name}: conflicting horizons: {other} is set and overrides the swept ratio; "
                         f"set {other} to -1"))
    return out


def read_study(path, max_cells=MAX_CELLS):
    """The Study in the spec file at `path`, every cell expanded and validated; None when the spec has no sweep block.
    Raises SpecError listing every problem, or one saying the grid is over `max_cells` (None = no limit)."""
    filename = str(path)
    root, data, problems = loader._parse(loader._read(path), filename)
    if data is None:
        raise SpecError(problems)
    try:
        base = Spec.model_validate(data)
    except pydantic.ValidationError as e:
        raise SpecError(by_position(problems + loader._pydantic_problems(e, root, filename)
                                    + grid_problems(root, data, filename))) from None
    if problems:
        raise SpecError(problems)
    if base.sweep is None:
        return None
    cells, problems = expand_parsed(root, data, base, filename,
                                    max_cells=math.inf if max_cells is None else max_cells)
    if problems:
        raise SpecError(problems)
    return Study(path=filename, spec=base, cells=tuple(cells))
