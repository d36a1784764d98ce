"""Issue 14 item 1: a stage knob's default is declared once. Every option a spec can set for a stage (its
`stages:` options, and for base_train the `model:` and `train:` sections) is a flag of that stage with the same
default, so running a stage by hand with the reference's flags and applying a spec that leaves the field out
train the same model. The few differences are deliberate and listed here with the reason."""

import importlib

import pytest

import specs.schema as S

# (stage, spec field) -> why the spec's default differs from the flag's, or the flag's name when it is renamed
DIFFERENT = {
    ("base_train", "depth"): "required in a spec; the flag keeps the reference's default 20",
    ("base_train", "device_batch_size"): "spec 'auto': the plan picks it from the memory estimate, then passes it",
    ("base_train", "dtype"): "spec 'auto': the plan resolves it from the hardware and passes it (flag None = auto)",
    ("base_train", "wandb_run"): "a runner option (the stage's --run flag gets the run id)",
    ("base_eval", "device_batch_size"): "spec None: the plan passes base_train's batch",
    ("base_eval", "bundle"): "a spec gets the reference's full CORE bundle (download); the stage run by hand builds "
                             "the offline bundle from packages (--bundle-source offline), which needs no network",
}
RENAMED = {("base_eval", "bundle"): "bundle_source"}


def spec_fields(stage):
    models = [S.STAGE_OPTIONS[stage]] + ([S.ModelSpec, S.TrainSpec] if stage == "base_train" else [])
    return [(name, field) for model in models for name, field in model.model_fields.items()]


def normalized(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("stage", [s for s in S.STAGE_OPTIONS
                                   if hasattr(importlib.import_module(f"nanochat.stages.{s}"), "build_parser")])
def test_spec_options_are_stage_flags_with_the_same_default(stage):
    flags = {a.dest: a.default for a in importlib.import_module(f"nanochat.stages.{stage}").build_parser()._actions}
    problems = []
    for name, field in spec_fields(stage):
        if (stage, name) in DIFFERENT:
            continue
        flag = RENAMED.get((stage, name), name)
        if flag not in flags:
            problems.append(f"{stage}: spec field {name!r} is not a flag of the stage")
        elif normalized(flags[flag]) != normalized(field.get_default(call_default_factory=True)):
            problems.append(f"{stage}: {name} defaults to {field.default!r} in the spec, {flags[flag]!r} as a flag")
    assert not problems, "\n".join(problems)


def test_the_listed_differences_are_still_real():
    """An entry above that no longer differs is stale: remove it, so the list stays the truth."""
    for (stage, name), why in DIFFERENT.items():
        flags = {a.dest: a.default for a in importlib.import_module(f"nanochat.stages.{stage}").build_parser()._actions}
        field = dict(spec_fields(stage))[name]
        flag = RENAMED.get((stage, name), name)
        assert flag not in flags or normalized(flags[flag]) != normalized(field.default), (stage, name, why)
