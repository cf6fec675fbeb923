"""The package's layers stay clean: every import in src/ (function-local and TYPE_CHECKING ones
included) is parsed, and a forbidden edge between layers or an import cycle between modules fails.

The layers, each importing only what is below it (docs/ARCHITECTURE.md):
config, hub, cpu -> kernels -> model -> quantization -> weights; processing; synth; data; generation (takes model
and processor as arguments) -> evaluation, training, serving -> cli. The public model class keeps
``from_pretrained``/``from_config``/``save_pretrained``/``generate`` as thin facades over weights/
and generation/: those four calls are the only upward imports, listed in FACADES.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "smolvlm"

# layer -> the layers it may import (itself is always allowed).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "hub": set(),
    "torchrun": set(),  # torchrun's RANK / WORLD_SIZE
    "memory": set(),  # handing freed heap blocks back to the OS (glibc malloc_trim)
    "cpu": set(),  # the CPU's features as PyTorch may use them (one home for feature checks)
    "kernels": {"cpu"},  # native CPU kernels (torch C++ extensions), built on first use
    "model": {"config", "kernels", "cpu"},  # kernels: a leaf of ops, like torch's own (decode attention)
    "quantization": {"config", "model", "memory", "kernels"},
    "weights": {"config", "hub", "model", "quantization", "memory"},
    "processing": {"config", "hub", "memory"},  # memory: a batch's temporaries back to the OS
    "synth": {"config"},
    "data": {"config"},  # dataset formats (the_cauldron rows -> chat messages)
    "generation": {"config", "model", "memory", "kernels"},  # kernels decided before a compiled trace
    "serving": {"config", "hub", "model", "weights", "processing", "generation"},  # a thin HTTP shell
    "evaluation": {"config", "hub", "torchrun", "model", "quantization", "weights", "processing", "synth", "data", "generation"},
    "training": {"config", "cpu", "hub", "torchrun", "model", "quantization", "weights", "processing", "synth", "data", "generation"},
    "cli": {"config", "hub", "torchrun", "model", "quantization", "weights", "processing", "synth", "data", "generation",
            "evaluation", "training", "serving", "smolvlm", "cpu", "kernels"},  # cpu, kernels: `smolvlm doctor`
    "smolvlm": {"config"},  # the package root: lazy attributes name their modules as strings
}
# (importing module, imported module): the model class's facades, imported when called.
FACADES = {
    ("smolvlm.model.vlm", "smolvlm.weights.load"),
    ("smolvlm.model.vlm", "smolvlm.weights.save"),
    ("smolvlm.model.vlm", "smolvlm.generation.generate"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    base = SRC.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports() -> dict[str, set[str]]:
    """module -> the smolvlm modules it imports anywhere in its file."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # "from smolvlm import hub" imports the module smolvlm.hub
                targets = [f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base for a in node.names]
            graph[mod].update(t for t in targets if t == "smolvlm" or t.startswith("smolvlm."))
        graph[mod].discard(mod)
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "smolvlm"


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted({layer(m) for m in imports()} - set(ALLOWED))
    assert not unknown, f"new top-level modules/packages {unknown}: add them to ALLOWED with the layers they may use"


def test_no_forbidden_edge_between_layers():
    bad = [f"{a} -> {b}" for a, targets in sorted(imports().items()) for b in sorted(targets)
           if layer(a) != layer(b) and layer(b) not in ALLOWED.get(layer(a), set()) and (a, b) not in FACADES]
    assert not bad, "imports that break the layering:\n" + "\n".join(bad)


def test_the_layer_table_itself_has_no_cycle():
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        assert state.get(n) != 1, f"layer cycle: {' -> '.join(path + [n])}"
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in ALLOWED[n]:
            visit(m, path + [n])
        state[n] = 2

    for n in ALLOWED:
        visit(n, [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between modules (as a path that returns to its start), or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if colour.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    graph = imports()
    for a, b in FACADES:
        graph[a].discard(b)
    # a package's __init__ importing its own submodules is the usual re-export, not a cycle
    graph = {a: {b for b in targets if not (b.startswith(a + ".") and (PACKAGE.parent / a.replace(".", "/")).is_dir())}
             for a, targets in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The parser is what the tests above stand on: check it on this repository's known edges."""
    graph = imports()
    assert "smolvlm.weights.load" in graph["smolvlm.model.vlm"]  # function-local (a facade)
    assert "smolvlm.hub" in graph["smolvlm.processing.processor"]  # "from smolvlm import hub"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
