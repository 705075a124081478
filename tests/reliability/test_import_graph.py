"""The package has no import cycle: every `import` of an xlsparse module (at any depth of a file,
lazy imports included) is an edge, read from the source with ast; the graph must be acyclic."""
import ast
import pathlib

import xlsparse

ROOT = pathlib.Path(xlsparse.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ["xlsparse", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the xlsparse modules it imports}."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ops_and_triton_do_not_import_each_other_privately():
    graph = import_graph()
    assert "xlsparse.ops.registry" in graph["xlsparse.triton.compose"]
    for name, edges in graph.items():
        if name.startswith("xlsparse.ops"):
            assert not any(e.startswith("xlsparse.triton") for e in edges), f"{name} imports triton"
        if name.startswith("xlsparse.triton"):
            assert edges <= {"xlsparse.ops.registry", "xlsparse.ops.checks", "xlsparse.ops",
                             *(m for m in graph if m.startswith("xlsparse.triton"))}, f"{name}: {edges}"
