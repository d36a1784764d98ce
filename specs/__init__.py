"""
nanorun specs: the Pydantic schema of a YAML run spec, its loader (errors as FILE:LINE:COL: field: message)
and the shipped specs (specs/*.yaml). Imports only pydantic and yaml.

    import specs
    spec = specs.load("specs/cpu_demo.yaml")        # frozen Spec, or SpecError with every problem
    specs.stage_names(spec)                         # ['data', 'tok_train', 'base_train', 'base_eval']
    specs.stage_options(spec, "base_eval")          # BaseEvalOptions with inherited values filled in
    specs.read_study("specs/scaling_laws.yaml")     # a spec with a sweep block: its cells (specs/sweep.py)
"""

from pathlib import Path

from specs.errors import DataError, LaunchError, NanorunError, RegistryError, SpecError
from specs.loader import dump_yaml, load, load_text, recipe_hash, spec_hash, validate, validate_text
from specs.schema import (STAGE_NAMES, STAGE_NEEDS, DataSpec, HardwareSpec, ModelSpec, Spec, TokenizerSpec,
                          TrainSource, TrainSpec, ValSource, stage_names, stage_options, vocab_size)
from specs.sweep import MAX_CELLS, Cell, Study, read_study

SPECS_DIR = Path(__file__).resolve().parent   # where the shipped *.yaml live


def shipped_specs():
    """Paths of the specs that ship with nanorun, sorted by name."""
    return sorted(SPECS_DIR.glob("*.yaml"))


__all__ = ["load", "load_text", "validate", "validate_text", "spec_hash", "recipe_hash", "dump_yaml", "stage_names",
           "stage_options", "vocab_size", "shipped_specs", "SPECS_DIR", "STAGE_NAMES", "STAGE_NEEDS", "Spec",
           "HardwareSpec", "DataSpec", "TrainSource", "ValSource", "TokenizerSpec", "ModelSpec", "TrainSpec",
           "NanorunError", "SpecError", "RegistryError", "LaunchError", "DataError", "read_study", "Study", "Cell",
           "MAX_CELLS"]
