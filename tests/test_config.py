"""params.yaml: the defaults live in one place (config.Params), and every bad value is one line naming its key
(issue 12), from the library and from a stage's command line."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from stage_commands import stage_argv

from nucleiseg.core.config import Params, params_from_dict, read_params
from nucleiseg.core.errors import NucleisegError

REPO = Path(__file__).resolve().parents[1]
ZEROS = "0" * 64


def test_params_yaml_equals_the_defaults():
    """params.yaml and the dataclass defaults are the same values: edit both or neither."""
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == Params().as_dict()
    assert read_params(REPO / "params.yaml") == Params()


def test_dvc_set_param_changes_only_the_lines_it_sets(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through DVC's own writer (ruamel): a file already in its style
    (block lists, null as an empty value) comes back with only the set lines changed."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    before = (REPO / "params.yaml").read_text()
    path.write_text(before)
    apply_overrides(str(path), ["train.epochs=3", "backbone=resnet18", "evaluate.score_threshold=0.5", "data.sha256=null"])
    changed = [(a, b) for a, b in zip(before.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(before.splitlines()) == len(path.read_text().splitlines())
    assert [b.split("#")[0].strip() for _, b in changed] == ["backbone: resnet18", "epochs: 3", "score_threshold: 0.5"]


def test_as_dict_round_trips_and_flat_names_every_param(tiny_params):
    assert params_from_dict(tiny_params.as_dict()) == tiny_params
    flat = Params().flat()
    assert flat["backbone"] == "resnet50" and flat["train.augment.crop"] == 384 and flat["infer.window"] == 512
    assert "model.backbone" not in flat  # the backbone is a top-level key only


def test_the_backbone_is_the_top_level_key():
    assert params_from_dict({"backbone": "resnet18"}).model.backbone == "resnet18"
    with pytest.raises(NucleisegError, match="top-level 'backbone'"):
        params_from_dict({"model": {"backbone": "resnet18"}})


def _with(text: str, dotted: str, value_text: str) -> str:
    """params.yaml's text with `dotted` (section.key or top-level key) set to the YAML `value_text`."""
    doc = yaml.safe_load(text)
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = "@@VALUE@@"
    return yaml.safe_dump(doc, sort_keys=False).replace("'@@VALUE@@'", value_text)


# (key set, YAML text of the value, key the message must name)
BAD_VALUES = [
    ("train.epochs", "-3", "train.epochs"),
    ("train.epochs", "0", "train.epochs"),
    ("tile.size", "big", "tile.size"),
    ("tile.min_visible", "lots", "tile.min_visible"),
    ("train.lr", "fast", "train.lr"),
    ("data.val_images", "two", "data.val_images"),
    ("infer.window", "big", "infer.window"),
    ("infer.window", "16", "infer.window"),
    ("infer.batch_size", "0", "infer.batch_size"),
    ("infer.score", "best", "infer.score"),
    ("data.sha256", "12345", "data.sha256"),
    ("data.sha256", ZEROS, "data.sha256"),  # unquoted: YAML reads an integer, the check would vanish
    ("data.sha256", "'abc'", "data.sha256"),
    ("train.augment.flip", "maybe", "train.augment.flip"),
    ("seed", "-1", "seed"),
    ("backbone", "resnet152", "backbone"),
    ("data.fold", "-1", "data.fold"),
    ("data.fold", "last", "data.fold"),
    ("data.fold", "true", "data.fold"),
    ("evaluate.score_threshold", "1.0", "evaluate.score_threshold"),
    ("infer.tta", "true", "infer.tta"),  # was a boolean: now none | flip | d4
    ("train.augment.stain", "2", "train.augment.stain"),
    ("train.augment.scale_sampling", "log", "train.augment.scale_sampling"),
    ("train.augment.copy_paste", "1.5", "train.augment.copy_paste"),  # a probability
    ("train.augment.copy_paste", "yes", "train.augment.copy_paste"),
    ("train.augment.copy_paste_max", "0", "train.augment.copy_paste_max"),
    ("train.augment.copy_paste_max", "2.5", "train.augment.copy_paste_max"),
]
TYPO_KEYS = [
    ("data.val_image", "2", "data.val_image"),
    ("evaluate.max_det_all", "3000", "evaluate.max_det_all"),
    ("sead", "0", "sead"),
    ("train.augment.crops", "96", "train.augment.crops"),
]


def _one_line_error(path: Path) -> str:
    with pytest.raises(NucleisegError) as info:
        read_params(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("dotted, value, key", BAD_VALUES, ids=[f"{d}={v[:12]}" for d, v, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(tmp_path, dotted, value, key):
    path = tmp_path / "params.yaml"
    path.write_text(_with((REPO / "params.yaml").read_text(), dotted, value))
    message = _one_line_error(path)
    assert f"{key} = " in message, message
    assert str(path) in message and "expected" in message


def test_an_unquoted_sha256_is_read_as_an_integer_and_refused(tmp_path):
    text = _with((REPO / "params.yaml").read_text(), "data.sha256", ZEROS)
    assert yaml.safe_load(text)["data"]["sha256"] == 0
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert "quotes" in _one_line_error(path)
    path.write_text(_with((REPO / "params.yaml").read_text(), "data.sha256", f"'{ZEROS}'"))
    assert read_params(path).data.sha256 == ZEROS


@pytest.mark.parametrize("dotted, value, key", TYPO_KEYS, ids=[d for d, _, _ in TYPO_KEYS])
def test_unknown_key_is_one_line_naming_it(tmp_path, dotted, value, key):
    path = tmp_path / "params.yaml"
    path.write_text(_with((REPO / "params.yaml").read_text(), dotted, value))
    message = _one_line_error(path)
    assert f"unknown key '{key}'" in message, message


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"tile": {"size": 128, "overlap": 128}}, "tile.overlap"),
        ({"infer": {"window": 128, "overlap": 200}}, "infer.overlap"),
        ({"train": {"augment": {"scale": [1.2, 0.8]}}}, "train.augment.scale"),
        ({"data": {"source": "synthetic", "sha256": ZEROS}}, "data.sha256"),
        ({"tile": "big"}, "'tile' must be a mapping"),
        ({"data": {"fold": "all"}}, "data.fold = 'all' holds out no val images"),
    ],
)
def test_values_that_do_not_fit_together(values, needle):
    with pytest.raises(NucleisegError, match=needle) as info:
        params_from_dict(values)
    assert "\n" not in str(info.value)


def test_unreadable_params_files(tmp_path):
    with pytest.raises(NucleisegError, match="not found"):
        read_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    assert "not valid YAML" in _one_line_error(bad)
    bad.write_text("- a list\n")
    assert "mapping of sections" in _one_line_error(bad)


@pytest.mark.slow
def test_tile_stage_with_a_bad_param_is_one_error_line_and_writes_nothing(tmp_path, tiny_data, stage_environment):
    """`python stages/tile.py` with a bad value in its own section or another's: exit 2, one `error:` line naming
    the key, no traceback, nothing written (the check runs before any work)."""
    import shutil

    shutil.copytree(tiny_data / "data" / "raw", tmp_path / "data" / "raw")
    for dotted, value in (("tile.size", "big"), ("train.epochs", "-3")):
        (tmp_path / "params.yaml").write_text(_with((REPO / "params.yaml").read_text(), dotted, value))
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        done = subprocess.run(stage_argv("tile"), cwd=tmp_path, env=stage_environment(tmp_path),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert f"{dotted} = {value!r}" in lines[0] or f"{dotted} = {value}" in lines[0], lines[0]
        assert "Traceback" not in done.stderr + done.stdout
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_dvc_can_set_every_list_param(tmp_path):
    """`dvc exp run -S key=[...]` on each list param rewrites only that list. With a comment on the list key's own
    line, DVC's writer merged the next two keys into one invalid line (`lr_gamma: 0.1 warmup_iters: 200`), which
    broke scripts/demo's `-S train.lr_milestones=[]`."""
    from dvc.utils.hydra import apply_overrides

    from nucleiseg.core.config import flatten

    text = (REPO / "params.yaml").read_text()
    defaults = flatten(yaml.safe_load(text))
    path = tmp_path / "params.yaml"
    for key, value in defaults.items():
        if not isinstance(value, list):
            continue
        for new in ([], value[:1] or [1]):
            path.write_text(text)
            apply_overrides(str(path), [f"{key}={json.dumps(new)}"])
            assert flatten(yaml.safe_load(path.read_text())) == {**defaults, key: new}, (key, new)
