"""The layers run one way: cli -> {serve, train, eval, data, recipe} -> generation -> model -> processing
(`client`, used by data and eval, sits on processing).

Imports are read from the source (module level and inside functions alike), so a violation
fails here before it can grow.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "phi4rv"
UPPER = ("phi4rv.train", "phi4rv.eval", "phi4rv.serve", "phi4rv.recipe", "phi4rv.cli")
# what each package may not import
FORBIDDEN = {
    "processing": ("phi4rv.model", "phi4rv.generation", "phi4rv.data", "phi4rv.chat_model", "phi4rv.client", *UPPER),
    "model": ("phi4rv.generation", "phi4rv.data", "phi4rv.chat_model", "phi4rv.client", *UPPER),
    "data": ("phi4rv.model", "phi4rv.generation", "phi4rv.chat_model", *UPPER),
    "generation": ("phi4rv.data", "phi4rv.chat_model", *UPPER),
    # the OpenAI-compatible client, shared by data/ and eval/: it needs the chat format only
    "client": ("phi4rv.model", "phi4rv.generation", "phi4rv.data", "phi4rv.chat_model", *UPPER),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The phi4rv modules `path` imports; `from phi4rv.x import y` counts as phi4rv.x.y when y is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / sub.replace(".", "/") / "__init__.py").is_file()
                out.add(sub if is_module else node.module)
    return {m for m in out if m == "phi4rv" or m.startswith("phi4rv.")}


def test_lower_layers_never_import_upper_ones():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        paths = (PACKAGE / pkg).rglob("*.py") if (PACKAGE / pkg).is_dir() else [PACKAGE / f"{pkg}.py"]
        for path in paths:
            for m in imports(path):
                if any(m == f or m.startswith(f + ".") for f in forbidden) and not m.startswith(f"phi4rv.{pkg}"):
                    bad.append(f"{module_name(path)} imports {m}")
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in `graph` (module -> the modules it imports) as a path a -> ... -> a, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if state.get(d) is None and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if state.get(m) is None and (found := visit(m)):
            return found
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles():
    """No cycle among phi4rv's modules, counting imports inside functions too: a cycle hidden in a
    function still means two modules that cannot be understood (or changed) one without the other."""
    graph = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)
