"""The package's import structure: layers import only downwards and no module imports itself
back through others (function-level imports count too: a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sheepop"

# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS = [
    ("sheepop", "sheepop.errors", "sheepop.units", "sheepop.net", "sheepop.compat", "sheepop.logs",
     "sheepop.storage", "sheepop.output_paths", "sheepop.extensions", "sheepop.startup", "sheepop.cpu_allocator", "sheepop.eval_tasks"),
    ("sheepop.model.config", "sheepop.model.hf_config", "sheepop.config"),
    ("sheepop.perf", "sheepop.plan", "sheepop.model", "sheepop.data"),
    ("sheepop.train",),
    ("sheepop.monitor",),
    ("sheepop.driver",),
    ("sheepop.cli", "sheepop.__main__"),
]


def layer_of(module: str) -> int:
    best, depth = None, -1
    for n, prefixes in enumerate(LAYERS):
        for p in prefixes:
            # "sheepop" itself is the package's __init__ only, not a prefix of everything
            if (module == p or (p != "sheepop" and module.startswith(p + "."))) and len(p) > depth:
                best, depth = n, len(p)
    assert best is not None, f"{module}: not in any layer of tests/unit/test_layers.py"
    return best


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from sheepop import perf` imports sheepop.perf; `from sheepop.x import f` imports sheepop.x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for n in names:
            if n.startswith("sheepop"):
                while n not in known and "." in n:
                    n = n.rsplit(".", 1)[0]
                if n in known:
                    found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(p, known) - {m} for m, p in mods.items()}


def test_layers_import_only_downwards():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in graph().items() for d in deps
              if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" → ".join(path[path.index(d):] + [d]) if d in path else f"{m} → {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
