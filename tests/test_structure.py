"""The package's shape: one folder per layer, no folder importing a folder above it, every module
importing on its own, no import cycle, and no module reaching into another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dforce"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import in the file, those under TYPE_CHECKING included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {name: set() for name in mods}
    for name, path in mods.items():
        for module, names in imports(path):
            targets = [module, *(f"{module}.{n}" for n in names)]
            edges[name] |= {t for t in targets if t in mods and t not in (name, "dforce")}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if not state.get(nxt) and (found := visit(nxt, stack)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if not state.get(node) and (found := visit(node, [])):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    edges = graph()
    assert len(edges) > 20 and edges["dforce.training.train"]  # the graph was read
    assert cycle(edges) is None, " -> ".join(cycle(edges))


def test_every_module_imports_on_its_own():
    """Each module in a fresh set of `dforce` modules, all in one interpreter (one start-up)."""
    names = sorted(name for name in modules() if name != "dforce.__main__")  # that one runs the CLI
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'dforce' or m.startswith('dforce.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_private_names_from_other_modules(name):
    path = modules()[name]
    private = [
        f"{module}.{n}"
        for module, names in imports(path)
        if module.startswith("dforce")
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert not private, f"{path.name} imports private names {private}"


# The layers, bottom up (docs/ARCHITECTURE.md). Folders of one rank are independent of each other; the
# package's own `__init__` (DforceError, the lazy public API) sits below them all, the command line on top.
LAYERS = {"data": 0, "models": 0, "diffusion": 1, "training": 2, "evaluation": 3, "cli": 4}


def layer(module: str) -> str:
    """`dforce.training.objectives.dmd` -> training; the package's top-level modules -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in LAYERS else "cli"


def test_every_module_sits_in_a_layer_folder():
    top = sorted(name for name, path in modules().items() if path.parent == PACKAGE and name != "dforce")
    assert top == ["dforce.__main__", "dforce.cli", "dforce.commands"]
    assert {layer(name) for name in modules() if name != "dforce"} == set(LAYERS)


def test_no_folder_imports_a_folder_above_or_beside_it():
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        if source != "dforce"
        for target in targets
        if layer(source) != layer(target) and LAYERS[layer(source)] <= LAYERS[layer(target)]
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_the_layer_check_sees_a_crossing():
    assert layer("dforce.diffusion.loss") == "diffusion" and layer("dforce.commands") == "cli"
    assert LAYERS[layer("dforce.diffusion.loss")] <= LAYERS[layer("dforce.training.config")]


def test_the_public_api_imports_lazily():
    """`import dforce` loads no torch (the CLI starts fast); every public name resolves to its module's."""
    script = (
        "import importlib, sys, dforce\n"
        "assert 'torch' not in sys.modules, 'import dforce loaded torch'\n"
        "for name, module in dforce.PUBLIC.items():\n"
        "    assert getattr(dforce, name) is getattr(importlib.import_module(module), name), name\n"
        "assert set(dforce.PUBLIC) <= set(dir(dforce))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
