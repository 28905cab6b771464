"""Package boundaries, read from the source with ast (no import needed, so a violation in a module no
test happens to import is found too):

- proxyd/ never imports ollama_emulator: the emulator is a test double, not part of the product
  (app.py --demo may start one; app.py is not under proxyd/);
- ollama_emulator/ never imports proxyd: a double that shares the code it checks agrees with its bugs;
- the modules of proxyd/ import each other without a cycle.

Every import counts, at module level or inside a function (a function-level import that closes a cycle
is still a dependency in both directions); only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; for ``from m import a`` both ``m`` and
    ``m.a`` (``a`` may be a submodule). Relative imports are resolved against the file's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    if child.level - 1 >= len(base):  # climbs out of the top-level package
                        out.append((child.lineno, "." * child.level + (child.module or "")))
                        continue
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                out.append((child.lineno, module))
                out.extend((child.lineno, f"{module}.{alias.name}") for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def sources(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, f"no Python files under {package}/"
    return found


def offending(package: str, forbidden: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources(package)
        for line, module in imported(path)
        if module == forbidden or module.startswith(forbidden + ".") or module.startswith(".")
    ]


def test_proxyd_does_not_import_the_emulator():
    assert offending("proxyd", "ollama_emulator") == []


def test_the_emulator_does_not_import_proxyd():
    assert offending("ollama_emulator", "proxyd") == []


def test_importing_the_emulator_loads_no_proxyd_module():
    """The same at run time, in a fresh interpreter (catches an importlib call that ast cannot see)."""
    code = ("import sys, ollama_emulator.handlers, ollama_emulator.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'proxyd'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a path (first node repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycles_within_proxyd():
    modules = {module_name(p): p for p in sources("proxyd")}
    graph = {
        name: {m for _, m in imported(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
