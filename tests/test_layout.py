"""The import picture of the project: no circle in `training/`, no arrow from a lower layer to a higher one, and no
function-local import of project modules (they hide such arrows) unless a `# local import:` comment says why.

Anyone can print the picture: `python -m pytest tests/test_layout.py -q -s`.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("models", "training", "service", "benchmarks")

# Lowest first; a module may import modules of its own layer or of a lower one (the audit, a package of its own,
# is one layer; `training.train`, the entry point, is the top and nothing imports it).
TRAINING_LAYERS = [
    ["training.options"],
    ["training.config"],
    ["training.data"],
    ["training.metrics", "training.distributed", "training.model_card"],
    ["training.attacks", "training.attacks.*"],
    ["training.inference", "training.runs", "training.export"],
    ["training.evaluate", "training.classifier", "training.shields", "training.clean_logits"],
    ["training.joint"],  # stage 3 builds on the Shield stage's attacker
    ["training.audit", "training.audit.*"],
    ["training.train"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body (`from pkg import submodule` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return {name for name in found if name in known}


def package_graph(package: str) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imported(path, known) - {name} for name, path in known.items()}


def training_graph() -> dict[str, set[str]]:
    return package_graph("training")


def layer_of(name: str) -> int:
    for index, patterns in enumerate(TRAINING_LAYERS):
        if any(fnmatch(name, pattern) for pattern in patterns):
            return index
    raise AssertionError(f"{name} has no layer in tests/test_layout.py::TRAINING_LAYERS: place it there")


def test_training_imports_have_no_circle():
    graph = training_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"import circle in training/: {' -> '.join(error.args[1])}") from None
    print("\n" + "\n".join(f"{name} -> {', '.join(sorted(graph[name])) or '-'}" for name in order))


@pytest.mark.parametrize("package", ["models", "service", "benchmarks"])
def test_no_import_circle_in(package):
    graph = package_graph(package)  # function-local imports count: they are arrows too
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"import circle in {package}/: {' -> '.join(error.args[1])}") from None


def test_training_imports_point_down_the_layers():
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in training_graph().items() for target in targets
              if layer_of(target) > layer_of(name)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_function_local_project_imports_without_a_reason():
    hidden = []
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            tree = ast.parse("\n".join(lines))
            for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                for node in ast.walk(function):
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        continue
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(n.split(".")[0] in PROJECT for n in names) and "# local import:" not in lines[
                            node.lineno - 1]:
                        hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not hidden, "function-local project imports (move them up, or say why with '# local import:'):\n" + \
        "\n".join(hidden)


def test_the_checks_see_a_circle_and_an_upward_arrow():
    """The checks above can fail: a made-up circle is reported, and the entry point is the top layer."""
    try:
        list(TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())
    except CycleError:
        pass
    else:
        raise AssertionError("graphlib did not report a circle")
    assert layer_of("training.train") > layer_of("training.evaluate") > layer_of("training.metrics")
    assert "training.metrics" in training_graph()["training.evaluate"]
