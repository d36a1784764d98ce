"""Import rules of DESIGN.md, checked in a fresh interpreter by inspecting sys.modules."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_after(code):
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _top(mods):
    return {m.split(".")[0] for m in mods}


@pytest.mark.parametrize("package", ["specs", "registry", "runners.plan", "runners.execute", "runners.cli",
                                     "nanochat.scaling", "nanochat.hardware", "nanochat.probe", "nanochat.rundir",
                                     "nanochat.memory"])
def test_torch_free_packages(package):
    mods = _modules_after(f"import {package}")
    assert "torch" not in mods, f"{package} imports torch"


def test_nanochat_never_imports_the_product_layers():
    code = "import pkgutil, importlib, nanochat, nanochat.stages\n" \
           "for m in pkgutil.walk_packages(nanochat.__path__, 'nanochat.'):\n" \
           "    importlib.import_module(m.name)\n"
    top = _top(_modules_after(code))
    assert not top & {"specs", "registry", "runners", "tui"}, top & {"specs", "registry", "runners", "tui"}


def test_specs_is_light():
    top = _top(_modules_after("import specs"))
    assert not top & {"torch", "duckdb", "textual", "nanochat", "registry", "runners"}


def test_registry_never_imports_torch():
    top = _top(_modules_after("import registry, pkgutil, importlib\n"
                              "for m in pkgutil.walk_packages(registry.__path__, 'registry.'):\n"
                              "    importlib.import_module(m.name)\n"))
    assert "torch" not in top and "textual" not in top


@pytest.mark.parametrize("argv", [["--help"], ["plan", "specs/d12.yaml"], ["validate", "specs/d12.yaml"]])
def test_fast_cli_commands_do_not_import_torch(argv):
    code = ("import sys; sys.argv = ['nanorun'] + %r\n"
            "from runners.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n" % (argv,))
    mods = _modules_after(code)
    assert "torch" not in mods and "textual" not in mods
