"""Check the package's module structure: import cycles, private names, sizes.

    python tools/check_imports.py                 # the onnx_net2net package
    python tools/check_imports.py --skip-size onnx_net2net/io.py

Reports, and exits 1 if there are any:

* import cycles between the package's modules, counting imports inside
  functions too (a cycle hidden in a function is still a cycle). Importing
  `a.b.c` also runs the packages `a.b` and `a`, so those count as imported
  too, except the packages the importing module itself belongs to (they are
  already being imported when it runs). Imports under `if TYPE_CHECKING:`
  never run and do not count;
* private names (`_name`) imported from another module;
* modules over MAX_LINES lines.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MAX_LINES = 600
ROOT = Path(__file__).resolve().parent.parent


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name ('pkg.sub' for pkg/sub/__init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def resolve(module: str, level: int, target: str | None, modules: dict[str, Path]) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package(module, modules) else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import that runs."""
    found = []
    for node in _running_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node.level, node.module, modules)
            names = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, [], node.lineno))
                else:
                    names.append(alias.name)
            found.append((source, names, node.lineno))
    return found


def _running_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack += child.orelse
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges between the package's modules, and the private names imported across them."""
    graph, private = {name: set() for name in modules}, []
    for module, path in modules.items():
        for target, names, line in imports_of(module, path, modules):
            if target not in modules:
                continue
            graph[module] |= {name for name in _with_packages(target) if name in modules and name != module
                              and not _is_ancestor(name, module)}
            private += [f"{_shown(path)}:{line}: imports {name} from {target}" for name in names
                        if name.startswith("_") and not name.startswith("__")]
    return graph, private


def _with_packages(name: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a']: importing a module runs its packages."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def long_modules(modules: dict[str, Path], skip: set[Path]) -> list[str]:
    found = []
    for path in modules.values():
        count = len(path.read_text().splitlines())
        if count > MAX_LINES and path.resolve() not in skip:
            found.append(f"{_shown(path)}: {count} lines (more than {MAX_LINES})")
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=str(ROOT / "onnx_net2net"), help="the package folder")
    parser.add_argument("--skip-size", nargs="*", default=[], metavar="PATH",
                        help="modules whose line count is not checked")
    args = parser.parse_args()
    modules = module_names(Path(args.package).resolve())
    graph, private = import_graph(modules)
    problems = [f"import cycle: {' <-> '.join(component)}" for component in cycles(graph)]
    problems += [f"private name: {line}" for line in private]
    problems += [f"long module: {line}" for line in long_modules(modules, {Path(p).resolve() for p in args.skip_size})]
    print("\n".join(problems) if problems else f"{len(modules)} modules: no cycles, no private imports, "
                                                  f"none over {MAX_LINES} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
