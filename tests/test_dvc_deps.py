"""dvc.yaml's stage deps are each stage's script plus exactly the library modules it imports (issue 10).

Depending on the whole of src/nucleiseg re-ran download, tiling and training after an edit of
report.py or cli.py, which no stage imports. `nucleiseg.depgraph` derives the deps from the
imports; these tests pin down what it counts as an import and that dvc.yaml is in sync with it.
When test_dvc_yaml_deps_match_imports fails, run `python -m nucleiseg.depgraph --write`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from nucleiseg.depgraph import check, expected_deps, main, rewrite_deps, stage_modules

REPO = Path(__file__).resolve().parents[1]


def write(root: Path, files: dict[str, str]) -> None:
    for rel, body in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(body))


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """A tiny package `toypkg` under tmp_path/src, plus a folder for stage scripts; cwd = tmp_path."""
    write(
        tmp_path,
        {
            "src/toypkg/__init__.py": "VERSION = '1'\n",
            "src/toypkg/a.py": "from .b import helper\n",  # a -> b -> c (transitive)
            "src/toypkg/b.py": "from . import c\n\ndef helper():\n    return c.x\n",
            "src/toypkg/c.py": "x = 1\n",
            "src/toypkg/lazy.py": "def f():\n    from .heavy import thing\n    return thing\n",
            "src/toypkg/heavy.py": "thing = 2\n",
            "src/toypkg/cyc1.py": "from . import cyc2\n",
            "src/toypkg/cyc2.py": "from .cyc1 import *\n",
            "src/toypkg/unrelated.py": "import toypkg.a\n",  # imports things, but nobody imports it
            "src/toypkg/sub/__init__.py": "",
            "src/toypkg/sub/deep.py": "from ..c import x\nfrom . import leaf\n",
            "src/toypkg/sub/leaf.py": "",
            "src/toypkg/typed.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .heavy import thing\n"
                "else:\n    from .c import x\n"
            ),
            "src/toypkg/guarded.py": "x = 1\nif __name__ == '__main__':\n    from .heavy import thing\n",
            "src/toypkg/dyn.py": "import importlib\nmod = importlib.import_module('toypkg.c')\n",
        },
    )
    (tmp_path / "stages").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def modules_of(pkg: Path, script_body: str) -> list[str]:
    script = pkg / "stages" / "s.py"
    script.write_text(textwrap.dedent(script_body))
    return [p.removeprefix("src/toypkg/") for p in stage_modules(Path("stages/s.py"), Path("src/toypkg"))]


def test_no_package_import_no_deps(pkg):
    assert modules_of(pkg, "import os\nimport numpy\nfrom collections import deque\n") == []


def test_import_package_only_runs_init(pkg):
    assert modules_of(pkg, "import toypkg\n") == ["__init__.py"]


def test_import_dotted_module(pkg):
    assert modules_of(pkg, "import toypkg.c as cc\n") == ["__init__.py", "c.py"]


def test_from_package_import_module_and_name(pkg):
    # `c` is a module, `VERSION` a name defined in __init__.py: only c.py is added
    assert modules_of(pkg, "from toypkg import c, VERSION\n") == ["__init__.py", "c.py"]


def test_from_module_import_name_is_transitive(pkg):
    # a -> (from .b import helper) b -> (from . import c) c
    assert modules_of(pkg, "from toypkg.a import x\n") == ["__init__.py", "a.py", "b.py", "c.py"]


def test_lazy_import_in_function_body_counts(pkg):
    assert modules_of(pkg, "from toypkg.lazy import f\n") == ["__init__.py", "heavy.py", "lazy.py"]


def test_lazy_import_in_the_script_counts(pkg):
    assert modules_of(pkg, "def main():\n    import toypkg.c\n") == ["__init__.py", "c.py"]


def test_cycle_terminates(pkg):
    assert modules_of(pkg, "import toypkg.cyc1\n") == ["__init__.py", "cyc1.py", "cyc2.py"]


def test_subpackage_runs_its_init_and_relative_parent_imports(pkg):
    # toypkg.sub.deep: `from ..c import x` and `from . import leaf`
    assert modules_of(pkg, "from toypkg.sub.deep import x\n") == [
        "__init__.py",
        "c.py",
        "sub/__init__.py",
        "sub/deep.py",
        "sub/leaf.py",
    ]


def test_from_package_import_subpackage_module(pkg):
    assert modules_of(pkg, "from toypkg.sub import leaf\n") == ["__init__.py", "sub/__init__.py", "sub/leaf.py"]


def test_unrelated_module_not_included(pkg):
    # unrelated.py imports a (and so b, c) but is imported by nobody
    mods = modules_of(pkg, "from toypkg import a\nfrom toypkg.lazy import f\n")
    assert "unrelated.py" not in mods
    assert mods == ["__init__.py", "a.py", "b.py", "c.py", "heavy.py", "lazy.py"]


def test_type_checking_block_does_not_count_but_else_does(pkg):
    assert modules_of(pkg, "import toypkg.typed\n") == ["__init__.py", "c.py", "typed.py"]


def test_main_guard_of_an_imported_module_does_not_count(pkg):
    assert modules_of(pkg, "import toypkg.guarded\n") == ["__init__.py", "guarded.py"]


def test_main_guard_of_the_script_counts(pkg):
    assert modules_of(pkg, "if __name__ == '__main__':\n    import toypkg.c\n") == ["__init__.py", "c.py"]


def test_import_module_with_a_literal_name(pkg):
    assert modules_of(pkg, "import importlib\nimportlib.import_module('toypkg.dyn')\n") == [
        "__init__.py",
        "c.py",
        "dyn.py",
    ]


def test_missing_module_is_ignored(pkg):
    # the import would fail at run time; there is no file to depend on
    assert modules_of(pkg, "from toypkg import nope\nimport toypkg.gone\n") == ["__init__.py"]


def test_other_package_with_a_similar_name_is_ignored(pkg):
    assert modules_of(pkg, "import toypkg_extra.c\nfrom toypkgs import c\n") == []


def test_root_makes_paths_relative(pkg):
    (pkg / "stages" / "s.py").write_text("import toypkg.c\n")
    got = stage_modules(pkg / "stages" / "s.py", pkg / "src" / "toypkg", root=pkg)
    assert got == ["src/toypkg/__init__.py", "src/toypkg/c.py"]


# --------------------------------------------------------------------------- the real dvc.yaml


def test_dvc_yaml_deps_match_imports():
    """Each stage's src/ deps in dvc.yaml == the package modules its script imports. No more, no less.

    Fix a failure with `python -m nucleiseg.depgraph --write` (then review the dvc.yaml diff).
    """
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages, "dvc.yaml has no stages"
    problems = []
    for name, stage in stages.items():
        script = f"stages/{name}.py"
        assert (REPO / script).is_file(), f"stage {name}: no {script}"
        deps = stage.get("deps") or []
        if script not in deps:
            problems.append(f"{name}: {script} is not among its deps")
        listed = sorted(d for d in deps if d == "src" or d.startswith("src/"))
        want = stage_modules(REPO / script, REPO / "src/nucleiseg", root=REPO)
        assert want, f"stage {name} imports nothing from nucleiseg?"
        if listed != want:
            problems.append(
                f"{name}: missing {sorted(set(want) - set(listed))}, extra {sorted(set(listed) - set(want))}"
            )
    assert not problems, "dvc.yaml deps out of date (python -m nucleiseg.depgraph --write):\n" + "\n".join(problems)


def test_every_cached_output_is_ignored_by_the_committed_gitignore(tmp_path):
    """DVC adds an output to a .gitignore unless git already ignores it (scmrepo's Git.ignore, which DVC calls):
    with every cached out of dvc.yaml in the committed .gitignore, `dvc repro` and `dvc exp apply` leave git
    clean. Non-cached outs (metrics, plots, run.json) are meant to be committed; reports/ is regenerated."""
    from scmrepo.git import Git

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text((REPO / ".gitignore").read_text())
    outs = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs") or []:
            name, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if opts.get("cache", True):
                outs.append(name)
    assert "data/raw" in outs and "models/model.pt" in outs
    scm = Git(str(tmp_path))
    not_ignored = [name for name in outs + ["reports/results.md"] if not scm.is_ignored(str(tmp_path / name))]
    assert not not_ignored, f"add to .gitignore: {['/' + n for n in not_ignored]}"
    assert not scm.is_ignored(str(tmp_path / "metrics" / "eval.json"))


def test_report_and_cli_are_in_no_stage():
    """The point of issue 10: modules only the CLI uses must not re-run the pipeline."""
    for script in sorted((REPO / "stages").glob("*.py")):
        mods = stage_modules(script, REPO / "src/nucleiseg", root=REPO)
        assert "src/nucleiseg/report.py" not in mods, script.name
        assert "src/nucleiseg/cli.py" not in mods, script.name
        assert "src/nucleiseg/depgraph.py" not in mods, script.name


# --------------------------------------------------------------------------- --check / --write

DVC_YAML = """\
# Top comment: kept.
stages:
  first:   # stage comment
    cmd: python stages/first.py
    deps:
      - stages/first.py
      - src/toypkg   # the whole library (to be replaced)
      - data/raw    # raw data, kept
    params:
      - seed   # kept
    outs:
      - data/out

  second:
    cmd: python stages/second.py --fast
    deps:
    # a comment in front of a data dep stays with it
    - data/out
    - "src/toypkg/c.py"
    outs:
    - models/m.pt:
        cache: false

plots:
  - Curves:
      x: epoch
"""


@pytest.fixture
def project(pkg):
    write(pkg, {"stages/first.py": "from toypkg.a import helper\n", "stages/second.py": "import toypkg.lazy\n"})
    (pkg / "dvc.yaml").write_text(DVC_YAML)
    return pkg


def test_write_is_idempotent_and_keeps_comments(project, capsys):
    path = project / "dvc.yaml"
    args = ["--dvc-yaml", str(path), "--package-dir", "src/toypkg"]
    assert main(["--check", *args]) == 1
    out = capsys.readouterr().out
    assert "first: extra src/toypkg" in out and "second: missing stages/second.py" in out

    assert main(["--write", *args]) == 0
    once = path.read_text()
    assert main(["--write", *args]) == 0
    assert path.read_text() == once  # idempotent
    assert main(["--check", *args]) == 0

    # comments and everything outside the deps lists are unchanged
    for line in DVC_YAML.splitlines():
        if "to be replaced" in line or '"src/toypkg/c.py"' in line:
            assert line not in once
        else:
            assert line in once.splitlines(), line
    assert once.startswith("# Top comment: kept.\nstages:\n  first:   # stage comment\n")

    old, new = yaml.safe_load(DVC_YAML), yaml.safe_load(once)
    assert new["stages"]["first"]["deps"] == [
        "stages/first.py",
        "src/toypkg/__init__.py",
        "src/toypkg/a.py",
        "src/toypkg/b.py",
        "src/toypkg/c.py",
        "data/raw",
    ]
    # script first (added when missing), then modules, then the data deps; indentation style kept
    assert new["stages"]["second"]["deps"] == [
        "stages/second.py",
        "src/toypkg/__init__.py",
        "src/toypkg/heavy.py",
        "src/toypkg/lazy.py",
        "data/out",
    ]
    assert "    - stages/second.py\n    - src/toypkg/__init__.py\n" in once
    assert "    # a comment in front of a data dep stays with it\n    - data/out\n" in once
    for name in old["stages"]:
        old["stages"][name].pop("deps"), new["stages"][name].pop("deps")
    assert new == old


def test_rewrite_deps_keeps_crlf_and_rejects_flow_lists(project):
    stages = yaml.safe_load(DVC_YAML)["stages"]
    expected = expected_deps(project, stages, Path("src/toypkg"))
    crlf = rewrite_deps(DVC_YAML.replace("\n", "\r\n"), expected)
    assert crlf == rewrite_deps(DVC_YAML, expected).replace("\n", "\r\n")
    assert check(stages, expected) != []

    flow = DVC_YAML.replace(
        "    deps:\n      - stages/first.py\n      - src/toypkg   # the whole library (to be replaced)\n"
        "      - data/raw    # raw data, kept\n",
        "    deps: [stages/first.py, src/toypkg, data/raw]\n",
    )
    with pytest.raises(ValueError, match="block-style"):
        rewrite_deps(flow, expected)


def test_command_line_check_on_the_repo_runs():
    """`python -m nucleiseg.depgraph` works from the repository root (exit 0 or 1, never a crash)."""
    proc = subprocess.run(
        [sys.executable, "-m", "nucleiseg.depgraph", "--check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
