"""The package's structure, pinned: layers in one direction, no import cycle, no private name across modules,
no module past the size limit. Imports are read with ``ast``, those inside functions included, so a lazy import
cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minialign"

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = ("base", "config", "data", "ops", "modeling", "training", "evaluation", "reporting", "commands", "cli")
TOP_LEVEL = {"minialign.cli": "cli", "minialign.__main__": "cli", "minialign": "base"}
MAX_LINES = 450
# --help must not load torch
TORCH_FREE = ("minialign.config.schema", "minialign.config.online", "minialign.base.errors", "minialign.base.files")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return module.split(".")[1]


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported minialign module, line, names taken from it) for every import statement in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, []) for a in node.names if a.name.startswith("minialign")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("minialign"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in known]
            found += [(s, node.lineno, []) for s in submodules]
            rest = [n for n in names if f"{source}.{n}" not in known]
            if rest or not submodules:
                found.append((source, node.lineno, rest))
    return [(m, line, names) for m, line, names in found if m in known and m != me]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {target for target, _, _ in imports(p, known) if target != "minialign"} for m, p in known.items()}


def test_layers_are_known():
    for m in modules():
        assert layer(m) in LAYERS, f"{m} is in no layer: add its folder to LAYERS in tests/test_layers.py"


def test_imports_go_down_the_layers():
    known = modules()
    wrong = []
    for m, path in known.items():
        mine = LAYERS.index(layer(m))
        for target, line, _ in imports(path, known):
            if target == "minialign":
                continue
            theirs = LAYERS.index(layer(target))
            if theirs > mine:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer(m)}) imports {target} ({layer(target)})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_across_modules():
    known = modules()
    wrong = []
    for m, path in known.items():
        tree = ast.parse(path.read_text())
        for target, line, names in imports(path, known):
            wrong += [f"{m}:{line} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minialign"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_only_cli_imports_commands():
    known = modules()
    wrong = [f"{m}:{line} imports {target}" for m, p in known.items() if layer(m) not in ("commands", "cli")
             for target, line, _ in imports(p, known) if layer(target) == "commands"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n} lines (limit {MAX_LINES}): split it"


def test_config_layer_is_torch_free():
    known = modules()
    for m, path in known.items():
        if not m.startswith(TORCH_FREE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "transformers") for n in names), f"{m} imports {names}"


def test_package_holds_only_source_and_presets():
    """Leftovers of a merge or a patch (``.orig``, ``.rej``, editor backups) once shipped inside the package."""
    import subprocess

    root = PACKAGE.parent
    try:
        tracked = subprocess.run(["git", "ls-files", "minialign"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    stray = [f for f in tracked if not f.endswith((".py", ".yaml"))]
    assert not stray, f"files in the package that are neither source nor presets: {stray}"
