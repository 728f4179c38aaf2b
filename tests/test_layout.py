"""The package's shape: who may import whom, no import cycles, one test file per module, the layout that
docs/design.md lists, `python -m`.

Modules are named by their dotted path inside the package: "data", and "tasks.base" for
src/ddpm/tasks/base.py; a package's __init__.py is the package ("tasks"), the top one's "__init__"."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "src" / "ddpm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}  # "__init__", "tasks", ...
MODULES = sorted(m for m in SOURCES if m not in PACKAGES and not m.rsplit(".", 1)[-1].startswith("__"))


def imports(module: str, source: str | None = None) -> dict[str, set[str]]:
    """The package modules ``module`` imports (anywhere in it: lazy imports inside functions count), each
    with the names it takes from it. ``from .pkg import mod`` of a sub-module counts as importing it.
    ``source``: the module's text, when not its file's."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    package = "" if package == "__init__" else package
    found: dict[str, set[str]] = {}

    def add(target: str, names: list[str]) -> None:
        for name in names:
            sub = f"{target}.{name}" if target else name
            if sub in SOURCES:
                found.setdefault(sub, set())
            else:
                found.setdefault(target or "__init__", set()).add(name)

    for node in ast.walk(ast.parse(SOURCES[module].read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            add(".".join(base), [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ddpm":
            add(node.module.removeprefix("ddpm").lstrip("."), [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ddpm":
                    found.setdefault(alias.name.removeprefix("ddpm").lstrip(".") or "__init__", set())
    return found


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    """Data flows one way: no chain of imports (at the top, or lazily inside a function) leads a module
    back to itself."""
    graph = {m: {t for t in imports(m) if t in SOURCES and t != m} for m in SOURCES}
    cycle = import_cycle(graph)
    if cycle:
        print("import cycle:", " -> ".join(cycle))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_and_the_import_reader_sees_every_import():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    source = """
from ..config import Config
from .helpers import helper
from ddpm.samplers import SAMPLERS
import ddpm.data

def later():
    from ..shards import load_all_shards
    from .. import rng
"""
    assert imports("pkg.module", source) == {
        "config": {"Config"},
        "pkg.helpers": {"helper"},
        "samplers": {"SAMPLERS"},
        "data": set(),
        "shards": {"load_all_shards"},
        "rng": set(),
    }
    # the samplers build on diffusion.py's Algorithm 2; diffusion.py imports no sampler, not even lazily
    assert "diffusion" in imports("samplers") and "samplers" not in imports("diffusion")
    assert "shards" in imports("data") and "data" not in imports("shards")


# The maths: no network, no trainer, no files, no data loading.
MATHS = {"schedules", "losses", "rng", "diffusion", "samplers"}
MATHS_MAY_IMPORT = MATHS | {"errors"}


@pytest.mark.parametrize("module", sorted(MATHS))
def test_the_maths_imports_only_maths(module):
    assert set(imports(module)) <= MATHS_MAY_IMPORT
    source = SOURCES[module].read_text()
    assert not re.search(r"^import (json|os|pathlib)|^from pathlib|\bopen\(", source, re.M)


@pytest.mark.parametrize("module", MODULES)
def test_nothing_below_the_cli_reaches_up(module):
    used = imports(module)
    in_cli = module.split(".")[0] == "cli"
    if not in_cli:
        assert not any(name.split(".")[0] == "cli" for name in used)
    if not in_cli and module != "__init__":
        assert "train" not in used
    # checkpoint.py is for checkpoints: its file helpers live in files.py
    assert used.get("checkpoint", set()) <= {
        "Checkpoint",
        "CHECKPOINT_NAME",
        "save_checkpoint",
        "load_optimizer_state",
        "resolved_values",
    }
    # data.py is for datasets: pixel conversions live in images.py, seeds in rng.py
    assert not used.get("data", set()) & {"to_uint8", "to_model_range", "derived_seed"}
    assert not any(name.startswith("_") for names in used.values() for name in names)


def test_every_module_with_logic_has_its_test_file():
    """tests/test_data.py for data.py; for tasks/base.py tests/test_tasks_base.py, or the sub-package's
    one test file tests/test_tasks.py."""
    no_logic = {"errors"}  # exception classes only
    names = {m: [m.replace(".", "_"), *([m.split(".")[0]] if "." in m else [])] for m in MODULES}
    missing = [
        m
        for m in MODULES
        if m not in no_logic and not any((ROOT / "tests" / f"test_{n}.py").is_file() for n in names[m])
    ]
    assert not missing


def documented_layout() -> set[str]:
    """The modules the layout of docs/design.md lists under src/ddpm/, a sub-package's (an indented
    ``pkg/`` line, its modules indented below it) as "pkg.module"."""
    design = (ROOT / "docs" / "design.md").read_text()
    layout = design.split("## Layout", 1)[1].split("```")[1].split("\ntests/")[0]
    listed, packages = set(), []  # packages: (indent, name) of the sub-packages the line is inside
    for indent, name, kind in re.findall(r"^( +)(\w+)(\.py|/)\s", layout, re.M):
        packages = [(i, p) for i, p in packages if i < len(indent)]
        if kind == "/":
            packages.append((len(indent), name))
        else:
            listed.add(".".join([p for _, p in packages] + [name]))
    return listed


def test_the_documented_layout_names_every_module():
    listed = documented_layout()
    top = {m for m in MODULES if "." not in m}
    assert {m for m in listed if "." not in m} == top | {"__main__"}


def test_the_documented_layout_names_every_sub_package_module():
    assert {m for m in documented_layout() if "." in m} == {m for m in MODULES if "." in m}


def test_python_dash_m_ddpm_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "ddpm", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: ddpm" in result.stdout
    assert "sample" in result.stdout and "train" in result.stdout
