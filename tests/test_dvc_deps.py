"""dvc.yaml's stage deps are each stage's script plus exactly the library code it imports.

A package folder is listed when the stage uses every module in it, otherwise the files it uses:
editing the overlay code must not retrain, editing the CLI or the report must re-run nothing.
`stage_imports` (a test helper) follows the imports statically; these tests pin down what it counts
as an import and that dvc.yaml and the train stage's params agree with the code.
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from stage_imports import folder_deps, stage_modules

from nucleiseg.cli import PIPELINE_MODEL
from nucleiseg.evaluate.outputs import OPERATING_POINT_FILE
from nucleiseg.train.stage import PARAMS as TRAIN_PARAMS

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


# --------------------------------------------------------------------------- folders


def test_folder_deps_collapse_only_whole_packages(pkg):
    mods = stage_modules(pkg / "src/toypkg/sub/deep.py", pkg / "src/toypkg", root=pkg) + ["src/toypkg/sub/deep.py"]
    assert folder_deps(sorted(mods), Path("src/toypkg"), pkg) == ["src/toypkg/__init__.py", "src/toypkg/c.py", "src/toypkg/sub"]
    partial = ["src/toypkg/__init__.py", "src/toypkg/sub/__init__.py", "src/toypkg/sub/leaf.py"]
    assert folder_deps(partial, Path("src/toypkg"), pkg) == partial


# --------------------------------------------------------------------------- the real dvc.yaml

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_code(name: str) -> list[str]:
    return folder_deps(stage_modules(REPO / f"stages/{name}.py", REPO / "src/nucleiseg", root=REPO), Path("src/nucleiseg"), REPO)


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



@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_yaml_deps_match_imports(name):
    """Each stage's src/ deps in dvc.yaml == the package code its script imports, folded into folders
    where it uses a whole package. No more, no less."""
    deps = STAGES[name].get("deps") or []
    assert f"stages/{name}.py" in deps
    listed = sorted(d for d in deps if d == "src" or d.startswith("src/"))
    assert listed == stage_code(name), "set the stage's src/ deps in dvc.yaml to the expected list"


def test_only_evaluate_reaches_the_stage_outputs_and_no_stage_the_cli():
    """Overlays, CSVs and the MLflow logging of results live where only the evaluate stage reaches them;
    the CLI and the report in no stage."""
    for name in STAGES:
        code = stage_code(name)
        assert "src/nucleiseg/cli.py" not in code and "src/nucleiseg/track/report.py" not in code, name
        assert "src/nucleiseg/track" not in code, name
        if name != "evaluate":
            assert not any(c.startswith("src/nucleiseg/evaluate/outputs.py") or c == "src/nucleiseg/evaluate" for c in code), name
    assert "src/nucleiseg/train" in stage_code("train") and "src/nucleiseg/train" not in stage_code("infer")


def test_train_params_are_the_keys_its_code_reads():
    """The train stage lists the infer/evaluate keys its validation reads, not whole sections, and the
    resume checkpoint is keyed by the same list."""
    assert STAGES["train"]["params"] == list(TRAIN_PARAMS)
    assert "evaluate.overlays" not in TRAIN_PARAMS and "infer" not in TRAIN_PARAMS and "evaluate" not in TRAIN_PARAMS


# --------------------------------------------------------------------------- paths: named once, in the cmd


def cmd_paths(name: str) -> dict[str, str]:
    """{flag: path} of a stage's `cmd`: `python stages/<name>.py --flag path ...`."""
    python, script, *args = shlex.split(STAGES[name]["cmd"])
    assert (python, script) == ("python", f"stages/{name}.py") and len(args) % 2 == 0, STAGES[name]["cmd"]
    assert all(flag.startswith("--") for flag in args[::2]), STAGES[name]["cmd"]
    return dict(zip(args[::2], args[1::2]))


def declared_paths(name: str) -> set[str]:
    """The data files a stage's deps and outs/metrics/plots list (its code excluded)."""
    stage = STAGES[name]
    paths = {d for d in stage.get("deps") or [] if not d.startswith(("src/", "stages/"))}
    for key in ("outs", "metrics", "plots"):
        paths |= {out if isinstance(out, str) else next(iter(out)) for out in stage.get(key) or []}
    return paths


@pytest.mark.parametrize("name", list(STAGES))
def test_each_data_path_is_named_in_the_cmd_and_declared(name):
    """What a stage reads and writes is given on its command line and listed under its deps or outs: a
    path renamed in one place and not the other fails here, not in a `dvc repro` that reads a stale file."""
    assert set(cmd_paths(name).values()) == declared_paths(name)


def test_no_stage_script_or_library_module_writes_a_pipeline_path():
    """The scripts and the library take their paths as arguments: no string in them is one of dvc.yaml's
    data paths with a folder in it (docstrings aside; a bare `overlays` is also an argument or artifact name).
    The CLI's default model file is the train stage's, checked here."""
    pipeline = {path for name in STAGES for path in declared_paths(name) if "/" in path}
    found = []
    for path in sorted([*(REPO / "stages").glob("*.py"), *(REPO / "src").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value.strip("/") in pipeline and not (path.name == "cli.py" and node.value == PIPELINE_MODEL):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "take these paths from the stage's command line (dvc.yaml cmd):\n" + "\n".join(found)
    assert cmd_paths("train")["--model"] == PIPELINE_MODEL


def test_the_operating_point_lands_next_to_the_model_file():
    """`nucleiseg predict --model <file>` reads operating_point.json next to it."""
    model = Path(cmd_paths("train")["--model"])
    assert cmd_paths("evaluate")["--operating-point"] == str(model.with_name(OPERATING_POINT_FILE))
    assert cmd_paths("infer")["--model"] == str(model)
