"""
YAML -> Spec, with every problem reported as `FILE:LINE:COL: field.path: message`.

PyYAML's composed node tree keeps a start mark for every key and value, so each pydantic error `loc`
is walked down the tree to the node it is about: the key for an unknown field, the parent mapping's key
for a missing field, the value otherwise. YAML 1.1 quirks are fixed on the way in: `1e18` is a float
(PyYAML makes it a string) and duplicate keys are errors (PyYAML silently keeps the last).

    nanorun validate specs/cpu_demo.yaml     # or: python -c "import specs; print(specs.validate('x.yaml'))"
"""

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path

import pydantic
import yaml

from specs.errors import SpecError
from specs.schema import STAGE_MODELS, STAGE_NAMES, Spec


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e18, 1.5e-3 and 2.0E+9 as floats (YAML 1.2 style)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


# --- parsing ----------------------------------------------------------------------------------------

def _parse(text, filename):
    """-> (root node, python data, problems). Problems are YAML-level: syntax, duplicates, shape."""
    def where(mark):
        return f"{filename}:{mark.line + 1}:{mark.column + 1}"

    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        alias_problem = _check_aliases(root, where)
        if alias_problem:
            return None, None, [alias_problem]
        data = None if root is None else loader.construct_document(root)
        if data is None:   # no document, or only comments / `---`
            return None, None, [f"{filename}:1:1: the spec is empty (expected a mapping with name, data, model, ...)"]
        problems = _duplicate_keys(root, (), where)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = ""
        if e.context and e.context_mark and e.problem_mark:   # e.g. "while parsing a flow mapping"
            context = f" ({e.context} started at line {e.context_mark.line + 1})"
        return None, None, [f"{where(mark)}: invalid YAML: {e.problem or e.context}{context}"]
    except yaml.YAMLError as e:
        return None, None, [f"{filename}:1:1: invalid YAML: {e}"]
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else _show(data)
        return None, None, [f"{where(root.start_mark)}: the top level must be a mapping of spec fields (got {got})"]
    return root, data, problems


MAX_NODES = 100_000   # a spec is a few hundred nodes; aliases may not blow it up past this


def _check_aliases(root, where):
    """A problem line for a recursive alias (a node that contains itself) or an alias bomb (aliases of aliases
    expanding past MAX_NODES), else None; checked on the composed graph before anything is constructed."""
    if root is None:
        return None
    visits, stack = 0, [(root, frozenset())]
    while stack:
        node, ancestors = stack.pop()
        visits += 1
        if visits > MAX_NODES:
            return f"{where(root.start_mark)}: the spec expands to over {MAX_NODES:,} YAML nodes through aliases"
        if id(node) in ancestors:
            return f"{where(node.start_mark)}: a YAML alias refers to a node that contains it (recursive alias)"
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            inner = ancestors | {id(node)}
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            stack.extend((child, inner) for child in children)
    return None


def _duplicate_keys(node, path, where):
    """Duplicate mapping keys anywhere below `node`, reported at the second occurrence."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        first = {}
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else None
            sub = path + (k,)
            if k in first:
                problems.append(f"{where(key.start_mark)}: {_dotted(sub)}: duplicate key {k!r} "
                                f"(first defined at line {first[k].start_mark.line + 1})")
            elif k is not None:
                first[k] = key
            problems += _duplicate_keys(value, sub, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, path + (i,), where)
    return problems


# --- pydantic error -> YAML node --------------------------------------------------------------------

def _child(node, key):
    """-> (key node or None, value node) for `key` in a mapping / index in a sequence, or None."""
    if isinstance(node, yaml.MappingNode):
        for k, v in reversed(node.value):   # the last duplicate wins, as in the constructed data
            if isinstance(k, yaml.ScalarNode) and k.value == str(key):
                return k, v
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        return None, node.value[key]
    return None


def _full_loc(err):
    """The error's loc, extended by the validator's ctx["at"] (a dotted path below it)."""
    at = (err.get("ctx") or {}).get("at")
    extra = [int(p) if p.isdigit() else p for p in str(at).split(".")] if at else []
    return list(err["loc"]) + extra


def _yaml_loc(loc):
    """A schema loc as a path in the YAML document. Stage items are `name` or `{name: options}` there,
    and Stage(name, options) in the schema, whose discriminated union also adds the tag to the loc."""
    if len(loc) < 3 or loc[0] != "stages" or not isinstance(loc[1], int):
        return loc
    rest = loc[2:]
    if rest[0] in STAGE_NAMES:
        rest = rest[1:]
    if rest[:1] == ["options"]:
        rest = ["<options>"] + rest[1:]
    return loc[:2] + rest


def _locate(root, loc):
    """Walk `loc` down the node tree. -> (node, key node of node or None, resolved path, unresolved rest)."""
    node, key_node, path = root, None, []
    for i, part in enumerate(loc):
        if part == "<options>":   # the value of a one-key stage mapping; a bare name has no node for it
            if isinstance(node, yaml.MappingNode) and len(node.value) == 1:
                key_node, node = node.value[0]
                path.append(key_node.value)
            continue
        hit = _child(node, part)
        if hit is None:
            return node, key_node, path, loc[i:]
        key_node, node = hit
        path.append(part)
    return node, key_node, path, []


def _dotted(path):
    return ".".join(str(p) for p in path if p is not None) or "(top level)"


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def _model_at(loc):
    """The pydantic model class that owns the last element of a schema `loc` (for did-you-mean), or None."""
    cls = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if cls is Spec and part == "stages":
            cls = None
            continue
        if cls is None and part in STAGE_MODELS:
            cls = STAGE_MODELS[part]
            continue
        field = cls.model_fields.get(part) if cls else None
        if field is None:
            return None
        cls = _unwrap_model(field.annotation)
    return cls


def _unwrap_model(tp):
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "dict": "a mapping", "model": "a mapping", "model_attributes": "a mapping", "list": "a list",
               "tuple": "a list"}
_COMPARE = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(err, loc):
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        cls = _model_at(loc)
        names = list(cls.model_fields) if cls else []
        hint = _did_you_mean(loc[-1], names)
        if not hint and cls is not None and not names:
            hint = " (this stage takes no options)"
        return f"unknown field {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind == "finite_number":
        return f"must be a finite number (got {_show(value)})"
    if kind == "invalid_key":
        return f"field names must be strings (got {_show(value)})"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float":
        base = kind.split("_")[0] if kind != "model_attributes_type" else "model_attributes"
        if base in _TYPE_NAMES:
            return f"expected {_TYPE_NAMES[base]} (got {_show(value)})"
    if kind in _COMPARE:
        limit = next(iter(ctx.values()))
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"must be {_COMPARE[kind]} {limit} (got {_show(value)})"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        return f"must be one of {', '.join(map(repr, choices))} (got {_show(value)}){_did_you_mean(value, choices)}"
    if kind == "union_tag_invalid":
        return f"unknown stage {ctx.get('tag')!r}{_did_you_mean(ctx.get('tag'), STAGE_NAMES)}; " \
               f"known stages: {', '.join(STAGE_NAMES)}"
    if kind in ("union_tag_not_found", "model_attributes_type") and loc[:1] == ["stages"]:
        return "a stage is a name or a one-key mapping 'name: {options}'"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern', '').strip('^$')} (got {_show(value)})"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind in ("string_too_short", "string_too_long"):
        return f"{err['msg'].replace('String should', 'must')} (got {_show(value)})"
    return re.sub(r"^(Value|Assertion) error, ", "", err["msg"])


def _pydantic_problems(exc, root, filename):
    out = []
    for err in exc.errors():
        value = err.get("input")
        if err["type"] == "too_short" and isinstance(value, (list, tuple)) and \
                len(value) >= (err.get("ctx") or {}).get("min_length", 0):
            continue   # pydantic's echo of failed items, not a real length problem
        loc = _full_loc(err)
        node, key_node, path, rest = _locate(root, _yaml_loc(loc))
        if err["type"] == "missing":
            mark = (key_node or node).start_mark   # the parent's key line, e.g. `model:`
            path = path + rest[:1]
        elif err["type"] in ("extra_forbidden", "invalid_key") and not rest:
            mark = (key_node or node).start_mark
        else:
            mark = node.start_mark
        out.append((mark.line, mark.column,
                    f"{filename}:{mark.line + 1}:{mark.column + 1}: {_dotted(path)}: {_message(err, loc)}"))
    return [line for _, _, line in sorted(out, key=lambda t: (t[0], t[1]))]


# --- public API -------------------------------------------------------------------------------------

def _check(text, filename):
    """-> (Spec or None, problems)."""
    root, data, problems = _parse(text, filename)
    if data is None:
        return None, problems
    try:
        spec = Spec.model_validate(data)
    except pydantic.ValidationError as e:
        if "sweep" not in data:
            return None, problems + _pydantic_problems(e, root, filename)
        from specs.sweep import by_position, grid_problems   # a study's grid paths are checked beside the base
        return None, by_position(problems + _pydantic_problems(e, root, filename) + grid_problems(root, data, filename))
    if spec.sweep is not None and not problems:   # a study: every cell must be a valid spec too
        from specs.sweep import MAX_CELLS, expand_parsed
        problems = expand_parsed(root, data, spec, filename, max_cells=MAX_CELLS, over_limit="skip")[1]
    return (None if problems else spec), problems


def validate_text(text, filename="<string>"):
    """Every problem in a spec given as text, as 'FILE:LINE:COL: field.path: message' lines ([] = valid)."""
    return _check(text, filename)[1]


def load_text(text, filename="<string>"):
    """Spec from YAML text; raises SpecError listing every problem."""
    spec, problems = _check(text, filename)
    if problems:
        raise SpecError(problems)
    return spec


def _read(path):
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: spec file not found" if not p.exists() else f"{path}: not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def validate(path):
    """Every problem in the spec file at `path` ([] = valid). A missing file is one problem."""
    try:
        text = _read(path)
    except SpecError as e:
        return e.problems
    return validate_text(text, str(path))


def load(path):
    """The validated, frozen Spec in the YAML file at `path`; raises SpecError listing every problem."""
    return load_text(_read(path), str(path))


def _canonical(spec):
    canonical = spec.model_dump(mode="json", exclude={"description", "tags"})
    if canonical.get("sweep") is None:   # a plain spec hashes as it did before studies existed
        canonical.pop("sweep", None)
    for where in ("launcher", "slurm", "skypilot"):   # where a run is launched is not what it computes: same run id
        canonical["hardware"].pop(where, None)
    if canonical.get("sweep"):   # nor how many of a study's cells run at once
        canonical["sweep"].pop("max_parallel", None)
    return canonical


def _sha(canonical):
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def spec_hash(spec):
    """sha256 hex of the validated spec (defaults filled in), ignoring description, tags, the launcher and
    sweep.max_parallel."""
    return _sha(_canonical(spec))


def recipe_hash(spec):
    """spec_hash without the seed: runs that differ only in their seed share it (the leaderboard's groups)."""
    canonical = _canonical(spec)
    canonical.pop("seed", None)
    return _sha(canonical)


def dump_yaml(spec, exclude_defaults=False):
    """YAML text that loads back to an equal Spec. Stages with default options are written as bare names."""
    data = spec.model_dump(mode="json", exclude={"stages"}, exclude_defaults=exclude_defaults)
    sweep = data.pop("sweep", None)
    stages = []
    for stage in spec.stages:
        options = stage.options.model_dump(mode="json", exclude_defaults=True)
        stages.append({stage.name: options} if options else stage.name)
    data["stages"] = stages
    if sweep is not None:
        data["sweep"] = sweep
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)
