"""The shape of the code: imports flow one way (no cycles), only storage.py touches pyarrow.fs, and
skinray's console lines are written by the console module."""

import ast
from pathlib import Path

import skinray

PACKAGE = Path(skinray.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each skinray module -> the skinray modules it imports, anywhere in it (inside functions too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name and t != "skinray"}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _imports()
    assert len(graph) > 40 and "skinray.storage" in graph["skinray.score"]  # the walk sees the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_storage_touches_the_filesystem_layer():
    users = [
        p.name
        for p in PACKAGE.rglob("*.py")
        if p.name != "storage.py"
        and "pyarrow.fs" in p.read_text()
        and any("pyarrow.fs" in line and "import" in line for line in p.read_text().splitlines())
    ]
    assert users == []


def test_skinray_console_lines_are_written_by_the_console_module():
    """`[skinray] ...` progress lines and warnings come from console.say/console.warn (one format,
    one stream each); other modules do not spell the prefix out."""
    spelled = [
        f"{p.relative_to(PACKAGE)}:{n}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "console.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "[skinray]" in line or "[pipeline]" in line
    ]
    assert spelled == []
    assert "[skinray]" in (PACKAGE / "console.py").read_text()  # the check reads real source
