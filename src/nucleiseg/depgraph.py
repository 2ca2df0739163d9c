"""Which library modules each DVC stage really runs, so dvc.yaml can depend on exactly those.

Every stage used to depend on the whole folder ``src/nucleiseg``: editing a module no stage imports
(report.py, cli.py) re-ran download, tiling and training. Here the imports of a stage script are
followed statically (``ast``, nothing is imported or executed) through the package, transitively,
and the stage's deps become its script plus those module files.

What counts as an import of a package module (``nucleiseg`` below stands for ``package_dir.name``):

* ``import nucleiseg.x`` / ``import nucleiseg.x as y`` / ``import nucleiseg``;
* ``from nucleiseg import x, y``: ``x`` is taken as a submodule when ``nucleiseg/x.py`` (or
  ``nucleiseg/x/__init__.py``) exists, otherwise as a name defined in ``__init__.py``;
* ``from nucleiseg.x import y`` (and ``y`` too when it is itself a submodule);
* relative forms inside the package: ``from . import x``, ``from .x import y``, ``from ..x import y``;
* ``importlib.import_module("nucleiseg.x")`` / ``__import__("nucleiseg.x")`` with a literal name;
* imports anywhere in a file: function bodies (lazy imports run when the function is called),
  ``try`` blocks, class bodies.  Not counted: the body of ``if TYPE_CHECKING:`` and, in library
  modules (not in the stage script itself), the body of ``if __name__ == "__main__":`` -- neither
  runs when the module is imported.

Importing any module of a package runs the ``__init__.py`` of the package and of every parent
package, so those are included whenever a module below them is.  Imports of other packages are
ignored (they belong in requirements.txt, not in the stage deps).

Command line (run from the repository root)::

    python -m nucleiseg.depgraph           # print each stage's expected deps
    python -m nucleiseg.depgraph --check   # exit 1 listing the differences with dvc.yaml
    python -m nucleiseg.depgraph --write   # rewrite the deps: lists of dvc.yaml in place

``--write`` edits only the ``deps:`` blocks, textually, so comments and the order of everything
else survive: ``stages/<name>.py`` first, then the ``src/`` modules sorted, then the other deps
(``data/raw`` ...) as they were. It is idempotent.

This module must not import the package (it may be run while the package is broken) and uses only
the standard library; PyYAML is imported inside :func:`main`, to read dvc.yaml.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import deque
from pathlib import Path

__all__ = ["stage_modules", "stage_script", "expected_deps", "check", "rewrite_deps", "main"]


# --------------------------------------------------------------------------- import graph


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


# --------------------------------------------------------------------------- dvc.yaml

_PY_IN_CMD = re.compile(r"(?:^|\s)python[\d.]*\s+(?:-\S+\s+)*([^\s;&|]+\.py)\b")


def stage_script(name: str, stage: dict) -> str:
    """Script a stage runs: the ``python <path>.py`` in its cmd, else ``stages/<name>.py``."""
    cmd = stage.get("cmd")
    cmds = cmd if isinstance(cmd, list) else [cmd] if isinstance(cmd, str) else []
    for c in cmds:
        m = _PY_IN_CMD.search(c)
        if m:
            return m.group(1)
    return f"stages/{name}.py"


def _is_src(dep: str, src_prefix: str) -> bool:
    return dep == src_prefix.rstrip("/") or dep.startswith(src_prefix)


def expected_deps(
    root: Path, stages: dict, package_dir: Path, src_prefix: str = "src/"
) -> dict[str, tuple[str, list[str], list[str]]]:
    """For each stage: (script, expected src modules, the stage's other deps in their order)."""
    out = {}
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            continue
        script = stage_script(name, stage)
        if not (root / script).is_file():
            raise FileNotFoundError(f"stage {name!r}: script {script} not found")
        modules = stage_modules(root / script, root / package_dir, root=root)
        deps = [d for d in stage.get("deps") or [] if isinstance(d, str)]
        others = [d for d in deps if d != script and not _is_src(d, src_prefix)]
        out[name] = (script, modules, others)
    return out


def check(stages: dict, expected: dict, src_prefix: str = "src/") -> list[str]:
    """Human-readable differences between dvc.yaml's deps and the expected ones (empty: in sync)."""
    problems = []
    for name, (script, modules, _) in expected.items():
        deps = [d for d in stages[name].get("deps") or [] if isinstance(d, str)]
        if script not in deps:
            problems.append(f"{name}: missing {script}")
        listed = {d for d in deps if _is_src(d, src_prefix)}
        for d in sorted(set(modules) - listed):
            problems.append(f"{name}: missing {d}")
        for d in sorted(listed - set(modules)):
            problems.append(f"{name}: extra {d}")
    return problems


_KEY = re.compile(r"^(\s*)(['\"]?)([^'\"#:\s][^'\"#:]*?)\2\s*:(\s*(#.*)?)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank_or_comment(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#")


def _item_value(lines: list[str]) -> object:
    """Parsed value of one ``- item`` (with its continuation lines)."""
    import yaml

    cut = _indent(lines[0])
    text = "".join(l[cut:] for l in lines)
    parsed = yaml.safe_load(text)
    return parsed[0] if isinstance(parsed, list) and parsed else None


def _yaml_scalar(value: str) -> str:
    import yaml

    return yaml.safe_dump([value], default_flow_style=False, width=10**6).strip()[2:]


def rewrite_deps(text: str, expected: dict, src_prefix: str = "src/") -> str:
    """``text`` (a dvc.yaml) with each stage's ``deps:`` block made script, src modules, other deps.

    Only the lines of the deps blocks change. Comment and blank lines inside a block stay in front
    of the item that followed them; those in front of a replaced (script or src) entry move to the
    top of the block. Raises ValueError for a layout it cannot edit safely (flow-style lists,
    a stage with a script but no deps block).
    """
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if "\r\n" in text else "\n"
    # find `stages:` at column 0
    try:
        top = next(i for i, l in enumerate(lines) if re.match(r"^stages\s*:\s*(#.*)?$", l.rstrip("\r\n")))
    except StopIteration:
        raise ValueError("no top-level `stages:` key") from None
    end_stages = next(
        (i for i in range(top + 1, len(lines)) if not _blank_or_comment(lines[i]) and _indent(lines[i]) == 0),
        len(lines),
    )
    # stage keys: the least-indented keys inside the stages block
    body = [i for i in range(top + 1, end_stages) if not _blank_or_comment(lines[i])]
    if not body:
        return text
    stage_indent = min(_indent(lines[i]) for i in body)
    stage_starts = [i for i in body if _indent(lines[i]) == stage_indent]
    replacements: list[tuple[int, int, list[str]]] = []
    done = set()
    for k, start in enumerate(stage_starts):
        stop = stage_starts[k + 1] if k + 1 < len(stage_starts) else end_stages
        m = _KEY.match(lines[start].rstrip("\r\n"))
        if not m:
            raise ValueError(f"line {start + 1}: expected a stage name, got {lines[start].rstrip()!r}")
        name = m.group(3)
        if name not in expected:
            continue
        keys = [i for i in range(start + 1, stop) if not _blank_or_comment(lines[i])]
        key_indent = min((_indent(lines[i]) for i in keys), default=None)
        deps_line = next(
            (
                i
                for i in keys
                if _indent(lines[i]) == key_indent and re.match(r"^\s*deps\s*:", lines[i])
            ),
            None,
        )
        if deps_line is None:
            raise ValueError(f"stage {name!r} has no deps: block; add one (with {expected[name][0]}) first")
        if not re.match(r"^\s*deps\s*:\s*(#.*)?$", lines[deps_line].rstrip("\r\n")):
            raise ValueError(f"line {deps_line + 1}: stage {name!r}: only block-style deps lists can be rewritten")
        # the block: `- ` items at indent >= key_indent, their continuation lines, comments/blank between
        items: list[tuple[list[str], list[str]]] = []  # (leading comment/blank lines, item lines)
        pending: list[str] = []
        item_indent = None
        i = deps_line + 1
        block_end = i
        while i < stop:
            line = lines[i]
            if _blank_or_comment(line):
                pending.append(line)
                i += 1
                continue
            ind = _indent(line)
            if line.lstrip(" ").startswith("-") and ind >= key_indent and (item_indent is None or ind == item_indent):
                item_indent = ind
                cur = [line]
                i += 1
                while i < stop and not _blank_or_comment(lines[i]) and _indent(lines[i]) > ind:
                    cur.append(lines[i])
                    i += 1
                items.append((pending, cur))
                pending = []
                block_end = i
                continue
            break
        # `pending` now holds comment/blank lines after the last item: they stay where they are
        script, modules, _ = expected[name]
        if item_indent is None:
            item_indent = key_indent + 2
        prefix = " " * item_indent + "- "
        head: list[str] = []  # comments that were in front of replaced entries
        kept: list[str] = []
        for leading, cur in items:
            value = _item_value(cur)
            if isinstance(value, str) and (value == script or _is_src(value, src_prefix)):
                head += leading
            else:
                kept += leading + cur
        new_block = head + [prefix + _yaml_scalar(d) + newline for d in [script, *modules]] + kept
        replacements.append((deps_line + 1, block_end, new_block))
        done.add(name)
    missing = set(expected) - done
    if missing:
        raise ValueError(f"stages not found in the text: {sorted(missing)}")
    for a, b, new in reversed(replacements):
        lines[a:b] = new
    return "".join(lines)


def _verify(old_text: str, new_text: str, expected: dict) -> None:
    """The rewrite changed exactly the deps lists, and to what was expected."""
    import yaml

    old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    for name, (script, modules, others) in expected.items():
        want = [script, *modules, *others]
        got = [d for d in new["stages"][name].get("deps") or []]
        if got != want:
            raise AssertionError(f"rewrite of stage {name!r} gave deps {got}, expected {want}")
        new["stages"][name]["deps"] = old["stages"][name].get("deps")
    if old != new:
        raise AssertionError("rewrite changed more than the deps lists")


def main(argv: list[str] | None = None) -> int:
    import yaml

    ap = argparse.ArgumentParser(prog="python -m nucleiseg.depgraph", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's deps differ from the imports")
    mode.add_argument("--write", action="store_true", help="rewrite the deps: lists of dvc.yaml in place")
    ap.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="default: %(default)s")
    ap.add_argument(
        "--package-dir", type=Path, default=Path("src/nucleiseg"), help="relative to dvc.yaml's folder; default: %(default)s"
    )
    args = ap.parse_args(argv)

    path: Path = args.dvc_yaml
    root = path.parent
    text = path.read_text(encoding="utf-8")
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    src_prefix = args.package_dir.parts[0] + "/"
    expected = expected_deps(root, stages, args.package_dir, src_prefix)

    if args.check:
        problems = check(stages, expected, src_prefix)
        for p in problems:
            print(p)
        if problems:
            print(f"{path}: deps out of date; run `python -m nucleiseg.depgraph --write`", file=sys.stderr)
            return 1
        print(f"{path}: deps match the imports")
        return 0
    if args.write:
        new_text = rewrite_deps(text, expected, src_prefix)
        _verify(text, new_text, expected)
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            print(f"{path}: deps rewritten")
        else:
            print(f"{path}: already up to date")
        return 0
    for name, (script, modules, others) in expected.items():
        print(f"{name}:")
        for d in [script, *modules, *others]:
            print(f"  - {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
