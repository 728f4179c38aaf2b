"""The package's shape: who may import whom, one test file per module, the README's layout, `python -m`."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "src" / "ddpm"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))


def imports(module: str) -> dict[str, set[str]]:
    """The package modules ``module`` imports (anywhere in it), each with the names it takes."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.setdefault(node.module or "", set()).update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm"):
            found.setdefault(node.module.removeprefix("ddpm").lstrip("."), set()).update(
                a.name for a in node.names
            )
    return found


# The maths: no network, no trainer, no files, no data loading.
MATHS = {"schedules", "losses", "rng", "diffusion", "samplers"}
MATHS_MAY_IMPORT = MATHS | {"errors"}


@pytest.mark.parametrize("module", sorted(MATHS))
def test_the_maths_imports_only_maths(module):
    assert set(imports(module)) <= MATHS_MAY_IMPORT
    source = (PACKAGE / f"{module}.py").read_text()
    assert not re.search(r"^import (json|os|pathlib)|^from pathlib|\bopen\(", source, re.M)


@pytest.mark.parametrize("module", MODULES)
def test_nothing_below_the_cli_reaches_up(module):
    used = imports(module)
    if module != "cli":
        assert "cli" not in used
    if module not in ("cli", "__init__"):
        assert "train" not in used
    # checkpoint.py is for checkpoints: its file helpers live in files.py
    assert used.get("checkpoint", set()) <= {
        "Checkpoint",
        "CHECKPOINT_NAME",
        "save_checkpoint",
        "load_optimizer_state",
    }
    # data.py is for datasets: pixel conversions live in images.py, seeds in rng.py
    assert not used.get("data", set()) & {"to_uint8", "to_model_range", "derived_seed"}
    assert not any(name.startswith("_") for names in used.values() for name in names)


def test_every_module_with_logic_has_its_test_file():
    no_logic = {"errors"}  # exception classes only
    missing = [m for m in MODULES if m not in no_logic and not (ROOT / "tests" / f"test_{m}.py").is_file()]
    assert not missing


def test_the_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1].split("\ntests/")[0]
    listed = set(re.findall(r"^\s+(\w+)\.py\s", layout, re.M))
    assert listed == set(MODULES) | {"__main__"}


def test_python_dash_m_ddpm_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "ddpm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: ddpm" in result.stdout
    assert "sample" in result.stdout and "train" in result.stdout
