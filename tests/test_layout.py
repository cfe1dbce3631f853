"""The architecture as the tree shows it: no import cycles in engine/, engine/ never imports the app,
the app never imports torch (tested in test_tui), and serving, training and the stores stay layered."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every import of an engine/tui module by an engine module, at any depth (lazy imports included:
    a cycle through a function-level import is still a cycle)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "engine").rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[module_name(path)] = {m for m in found if m.split(".")[0] in ("engine", "tui", "textual")}
    return graph


def test_engine_never_imports_the_app_or_textual():
    offenders = {m: sorted(d for d in deps if d.split(".")[0] in ("tui", "textual")) for m, deps in imports().items()}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_import_cycles_in_engine():
    every = imports()
    graph = {m: {d for d in deps if d in every} for m, deps in every.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in sorted(graph[m]):
            assert seen.get(d) != 1, " -> ".join([*path, m, d])
            if d not in seen:
                visit(d, [*path, m])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [])


def test_stores_and_training_do_not_reach_into_serving():
    """The stores serve both sides; training runs in its own process and loads no serving code
    beyond model resolution (engine.serve.model), which both sides share."""
    for m, deps in imports().items():
        if m.startswith("engine.store"):
            assert not {d for d in deps if d.startswith(("engine.serve", "engine.train"))}, m
        if m.startswith("engine.train"):
            assert not {d for d in deps if d.startswith("engine.serve") and not d.startswith("engine.serve.model")}, m
