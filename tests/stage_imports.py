"""Which modules of a package a stage script imports, followed statically (``ast``; nothing runs).

Used by tests/test_dvc_deps.py to prove that each DVC stage depends on exactly the library code it
runs. What counts as an import (``pkg`` stands for ``package_dir.name``):

* ``import pkg.x`` / ``import pkg.x as y`` / ``import pkg``; ``from pkg import x`` (a submodule when
  ``pkg/x.py`` or ``pkg/x/__init__.py`` exists, otherwise a name from ``__init__.py``);
  ``from pkg.x import y`` (and ``y`` when it is itself a submodule); relative forms;
  ``importlib.import_module("pkg.x")`` / ``__import__("pkg.x")`` with a literal name;
* imports anywhere in a file, lazy ones in function bodies included. Not counted: the body of
  ``if TYPE_CHECKING:`` and, in imported modules, ``if __name__ == "__main__":``.

Importing a module runs the ``__init__.py`` of its package and every parent, so those count too.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path


def _module_file(package_dir: Path, parts: tuple[str, ...]) -> Path | None:
    """File of the package module ``parts`` (names below the package, () = the package itself)."""
    base = package_dir.joinpath(*parts)
    init = base / "__init__.py"
    if init.is_file():
        return init
    if parts:
        py = base.with_name(base.name + ".py")
        if py.is_file():
            return py
    return None


def _with_parents(package_dir: Path, parts: tuple[str, ...]) -> list[Path]:
    """Files Python runs for ``import <package>.<parts>``: every enclosing __init__.py, then the module.

    Empty when the module does not exist (the import would fail; nothing to depend on).
    """
    target = _module_file(package_dir, parts)
    if target is None:
        return []
    files = []
    for i in range(len(parts)):
        init = _module_file(package_dir, parts[:i])
        if init is not None and init.name == "__init__.py":
            files.append(init)
    files.append(target)
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


class _ImportCollector(ast.NodeVisitor):
    """Collects (level, module, names) for every import statement that can run."""

    def __init__(self, is_entry: bool) -> None:
        self.is_entry = is_entry
        # (level, dotted module or "", imported names or None for `import a.b`)
        self.found: list[tuple[int, str, tuple[str, ...] | None]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test) or (not self.is_entry and _is_main_guard(node.test)):
            for stmt in node.orelse:  # the else branch does run
                self.visit(stmt)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((0, alias.name, None))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node.level, node.module or "", tuple(a.name for a in node.names)))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                self.found.append((0, arg.value, None))
        self.generic_visit(node)


def _package_of(file: Path, package_dir: Path) -> tuple[str, ...] | None:
    """Package (as parts below the root package) that relative imports in ``file`` start from."""
    try:
        rel = file.resolve().relative_to(package_dir.resolve())
    except ValueError:
        return None  # not a module of the package (the stage script): relative imports do not apply
    parts = rel.parts[:-1]
    return tuple(parts)


def _imported_files(file: Path, package_dir: Path, is_entry: bool) -> list[Path]:
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    collector = _ImportCollector(is_entry)
    collector.visit(tree)
    root = package_dir.name
    here = _package_of(file, package_dir)
    files: list[Path] = []
    for level, module, names in collector.found:
        if level:
            if here is None or level - 1 > len(here):
                continue
            base = here[: len(here) - (level - 1)]
            parts = base + (tuple(module.split(".")) if module else ())
        else:
            dotted = module.split(".")
            if dotted[0] != root:
                continue  # another package
            parts = tuple(dotted[1:])
        files += _with_parents(package_dir, parts)
        for name in names or ():
            if name != "*":  # `from pkg.x import y` where y is itself a submodule
                files += _with_parents(package_dir, parts + (name,))
    return files


def stage_modules(script: Path, package_dir: Path = Path("src/nucleiseg"), root: Path | None = None) -> list[str]:
    """Sorted paths of the modules of ``package_dir`` that running ``script`` imports, transitively.

    Paths are ``package_dir / <module file>`` in POSIX form (so ``src/nucleiseg/config.py`` when
    run from the repository root with the default), or relative to ``root`` when it is given.
    ``script`` itself is not in the list, even when it lies inside the package.
    """
    script, package_dir = Path(script), Path(package_dir)
    if not package_dir.is_dir():
        raise FileNotFoundError(f"package directory not found: {package_dir}")
    seen: dict[Path, Path] = {}  # resolved -> as spelled under package_dir
    queue = deque([(script, True)])
    start = script.resolve()
    while queue:
        file, is_entry = queue.popleft()
        for dep in _imported_files(file, package_dir, is_entry):
            key = dep.resolve()
            if key not in seen and key != start:
                seen[key] = dep
                queue.append((dep, False))
    out = []
    for dep in seen.values():
        if root is not None:
            dep = dep.resolve().relative_to(Path(root).resolve())
        out.append(dep.as_posix())
    return sorted(out)


def folder_deps(modules: list[str], package_dir: Path, root: Path) -> list[str]:
    """``modules`` with every package folder whose .py files are all used collapsed to the folder.

    A stage that uses a package whole depends on its folder (a new module in it counts too); one
    that uses part of it depends on exactly those files, so editing the rest re-runs nothing.
    """
    used = set(modules)
    out: set[str] = set(used)
    for folder in sorted((root / package_dir).rglob("*"), key=lambda p: len(p.parts)):
        if not folder.is_dir() or not (folder / "__init__.py").is_file():
            continue
        files = {p.relative_to(root).as_posix() for p in folder.rglob("*.py")}
        if files and files <= used:
            rel = folder.relative_to(root).as_posix()
            out = {m for m in out if not m.startswith(rel + "/")} | {rel}
    return sorted(out)
