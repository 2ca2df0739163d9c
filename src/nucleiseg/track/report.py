"""The results tables: per recipe, the mean ± sd of the val metrics over its folds; then one row per
finished, evaluated MLflow run, best val AP50 first.

Reads the project's store (`tracking.configure()`: `<repo>/mlruns/mlflow.db`, or
MLFLOW_TRACKING_URI) and writes `reports/results.md`, the homework's
"Table of Experiment Results", with the homework's baselines above it.

A recipe is the `recipe` tag the train stage sets (a hash of every param except
`tracking.RECIPE_EXCLUDED`: the fold, the seed and settings that cannot change a model);
the runs of one recipe over folds (and seeds) share it.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nucleiseg.core.config import Params
from nucleiseg.core.errors import NucleisegError
from nucleiseg.core.io import atomic_path
from nucleiseg.data.sources import describe_source
from nucleiseg.track import runs as tracking

# The homework's Mask R-CNN baselines on the CodaLab leaderboard (AP50, top-100 detections per image).
BASELINES = {"R50": 0.206, "R101": 0.142}

METRICS = ("ap50", "ap50_all", "f1", "aji", "pq")
LEAD_COLUMNS = ["run", "run id", "data", "backbone", "weights", "epochs", "best epoch"]
METRIC_COLUMNS = ["AP50", "AP50 (all dets)", "F1", "AJI", "PQ"]
TAIL_COLUMNS = ["train stage time", "finished"]
# Runs logged before the train stage recorded its wall time (train/stage_seconds) only have
# the training loops' time; their cells say so.
LOOPS_ONLY = " (loops only)"

# The fold means of the recipe table, in its column order.
CV_METRICS = ("ap50_all", "ap50", "f1", "pq", "aji")
CV_HEADERS = ["val ap50_all", "val ap50 (top 100)", "val F1", "val PQ", "val AJI"]
SHOWN_DIFFERENCES = 6


@dataclass
class Row:
    run_name: str
    run_id: str
    data_source: str
    backbone: str
    weights: str
    epochs: str
    best_epoch: int | None
    metrics: dict[str, float]
    train_seconds: float | None
    end_time_ms: int | None
    test_ap50: float | None = None
    train_loops_only: bool = False  # train_seconds counts the training loops only, not the whole stage
    recipe: str = ""  # the `recipe` tag ('' for runs logged before recipes were tagged)
    fold: str = ""  # the `fold` tag: a fold number, or 'all' (the all-data model, no val)
    seed: str = ""
    params: dict = field(default_factory=dict)
    score_threshold: float | None = None  # the operating point the evaluate stage chose on this fold's val


@dataclass
class Recipe:
    """One recipe's fold runs (one per (seed, fold): the newest) and its newest all-data run, if any."""

    recipe: str
    folds: list[Row]
    final: Row | None = None

    @property
    def data_source(self) -> str:
        return (self.folds or [self.final])[0].data_source

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.folds if metric in r.metrics]

    def by_split(self, metric: str) -> dict[tuple[str, str], float]:
        return {(r.seed, r.fold): r.metrics[metric] for r in self.folds if metric in r.metrics}


def mean_sd(values: list[float]) -> str:
    """'0.745 ± 0.012' (sample standard deviation); one value: '0.745 ± -'; none: ''."""
    if not values:
        return ""
    sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "-"
    return f"{statistics.fmean(values):.3f} ± {sd}"


def paired_gain(recipe: Recipe, baseline: Recipe, metric: str) -> tuple[float, float | None, int]:
    """(mean gain over the (seed, fold) splits both ran, its standard error (None for one split), number of splits)."""
    mine, theirs = recipe.by_split(metric), baseline.by_split(metric)
    gains = [mine[k] - theirs[k] for k in sorted(set(mine) & set(theirs))]
    if not gains:
        return math.nan, None, 0
    se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else None
    return statistics.fmean(gains), se, len(gains)


def gain_cell(recipe: Recipe, baseline: Recipe, metric: str = "ap50_all") -> str:
    """'+0.012 ± 0.008 (5 folds): yes', ± twice the standard error; 'yes' when the gain exceeds it."""
    if recipe is baseline:
        return "baseline"
    gain, se, n = paired_gain(recipe, baseline, metric)
    if n == 0:
        return "no common folds"
    if se is None:
        return f"{gain:+.3f} (1 fold: no standard error)"
    return f"{gain:+.3f} ± {2 * se:.3f} ({n} folds): {'yes' if gain > 2 * se else 'no'}"


def differences(params: dict) -> str:
    """A recipe's logged params that differ from the defaults (the data source has its own column)."""
    defaults = {k: str(v) for k, v in Params().flat().items()}
    skipped = set(tracking.RECIPE_EXCLUDED) | {"data.source", "data.sha256"}
    changed = [f"{k}={v}" for k, v in sorted(params.items()) if k in defaults and k not in skipped and v != defaults[k]]
    if not changed:
        return "defaults"
    more = len(changed) - SHOWN_DIFFERENCES
    return ", ".join(changed[:SHOWN_DIFFERENCES]) + (f", +{more} more" if more > 0 else "")


def group_recipes(rows: list[Row], final_rows: list[Row]) -> list[Recipe]:
    """Recipes of the tagged runs, best mean val ap50_all first; a (seed, fold) that ran twice counts once (the newer run)."""
    newest: dict[str, dict[tuple[str, str], Row]] = {}
    for r in sorted((r for r in rows if r.recipe and r.fold != "all"), key=lambda r: r.end_time_ms or 0):
        newest.setdefault(r.recipe, {})[(r.seed, r.fold)] = r
    finals = {r.recipe: r for r in sorted(final_rows, key=lambda r: r.end_time_ms or 0)}
    recipes = [Recipe(key, sorted(runs.values(), key=lambda r: (r.seed, r.fold)), finals.get(key)) for key, runs in newest.items()]
    recipes += [Recipe(key, [], final) for key, final in finals.items() if key not in newest]

    def rank(recipe: Recipe) -> float:
        values = recipe.values("ap50_all")
        return -statistics.fmean(values) if values else 1.0

    return sorted(recipes, key=rank)


def find_recipe(recipes: list[Recipe], prefix: str) -> Recipe:
    found = [r for r in recipes if r.recipe.startswith(prefix)]
    if len(found) != 1:
        known = ", ".join(r.recipe for r in recipes) or "none"
        raise NucleisegError(f"--baseline {prefix} {'matches several recipes' if found else 'matches no recipe'}; "
                             f"recipes in the store: {known}")
    return found[0]


def format_duration(seconds: float | None) -> str:
    """3725 -> '1h 02m', 754 -> '12m 34s', 42.4 -> '42s'."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_time(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _store_label() -> str:
    """Where the runs came from, without local paths or credentials (the report may be committed)."""
    from urllib.parse import urlparse

    if tracking.uses_local_store():
        return "mlruns/mlflow.db"
    parsed = urlparse(tracking.tracking_uri())
    return f"{parsed.scheme}://{parsed.hostname or ''}{f':{parsed.port}' if parsed.port else ''}"


def _store_exists() -> bool:
    """False when the local SQLite store has not been created yet (no pipeline run so far)."""
    return not tracking.uses_local_store() or (tracking.store_dir() / "mlflow.db").is_file()


def _search(experiment: str) -> list:
    if not _store_exists():
        raise NucleisegError(f"{tracking.store_dir() / 'mlflow.db'}: no MLflow store yet; run the pipeline first (dvc repro)")
    import mlflow

    experiment_id = tracking.configure(experiment)
    return mlflow.search_runs(experiment_ids=[experiment_id], filter_string="attributes.status = 'FINISHED'", output_format="list")


def _row(run) -> Row:
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    best = metrics.get("train/best_epoch")
    stage_seconds = metrics.get("train/stage_seconds")
    return Row(
        run_name=run.info.run_name or "",
        run_id=run.info.run_id,
        data_source=data_source(tags, params),
        backbone=tags.get("backbone") or params.get("backbone", ""),
        weights=params.get("model.weights", ""),
        epochs=params.get("train.epochs", ""),
        best_epoch=int(best) if best is not None else None,
        metrics={k: metrics[f"val/{k}"] for k in METRICS if f"val/{k}" in metrics},
        train_seconds=stage_seconds if stage_seconds is not None else metrics.get("train/train_seconds"),
        end_time_ms=run.info.end_time,
        test_ap50=metrics.get("test/ap50"),
        train_loops_only=stage_seconds is None and "train/train_seconds" in metrics,
        recipe=tags.get("recipe", ""),
        fold=tags.get("fold", ""),
        seed=params.get("seed", ""),
        params=dict(params),
        score_threshold=metrics.get("val/score_threshold"),
    )


def collect(experiment: str = tracking.EXPERIMENT) -> tuple[list[Row], list[Row]]:
    """(finished runs that have val/ap50, best val AP50 first (newer first on ties); finished all-data runs (fold 'all'))."""
    rows, finals = [], []
    for run in _search(experiment):
        if "val/ap50" in run.data.metrics:
            rows.append(_row(run))
        elif run.data.tags.get("fold") == "all" and run.data.tags.get("recipe"):
            finals.append(_row(run))
    rows.sort(key=lambda r: (-r.metrics["ap50"], -(r.end_time_ms or 0)))
    return rows, finals


def data_source(tags: dict, params: dict) -> str:
    """The run's data: its `data_source` tag, else a short label of its `data.source` param (older runs)."""
    return tags.get("data_source") or describe_source(params.get("data.source"))


def render_recipes(recipes: list[Recipe], baseline: Recipe | None = None) -> list[str]:
    """The cross-validation table (Markdown lines); none when no run carries a recipe tag."""
    if not recipes:
        return []
    columns = ["recipe", "data", "differs from the defaults", "folds", *CV_HEADERS, "score threshold", "all-data run"]
    if baseline is not None:
        columns.append(f"ap50_all gain over {baseline.recipe} (± 2 SE): adopt?")
    lines = [
        "## Cross-validated recipes",
        "",
        "Per recipe (the runs' `recipe` tag: every param except " + ", ".join(f"`{k}`" for k in tracking.RECIPE_EXCLUDED) + "), "
        "the mean ± sample standard deviation over its folds of the val metrics on each fold's held-out images "
        "(F1, PQ and AJI at each fold's own operating point; sd '-' for one fold). A fold that ran twice counts once, the newer run. "
        "Score threshold: the folds' mean operating point, what `evaluate.score_threshold` takes for the all-data model "
        "(`data.fold: all`). Decision rule: a default changes only when its mean gain over the same folds exceeds twice "
        "its standard error (`nucleiseg report --baseline <recipe>` adds that column).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (2 + len(CV_METRICS)) + ["---"] * (len(columns) - 5 - len(CV_METRICS))) + "|",
    ]
    for recipe in recipes:
        params = (recipe.folds or [recipe.final])[0].params
        thresholds = [r.score_threshold for r in recipe.folds if r.score_threshold is not None]
        cells = [f"`{recipe.recipe}`", recipe.data_source, differences(params), len(recipe.folds)]
        cells += [mean_sd(recipe.values(k)) for k in CV_METRICS]
        cells.append(f"{statistics.fmean(thresholds):.3f}" if thresholds else "")
        cells.append(recipe.final.run_name if recipe.final else "")
        if baseline is not None:
            cells.append(gain_cell(recipe, baseline))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + ["", "## Runs", ""]


def render(rows: list[Row], experiment: str = tracking.EXPERIMENT, recipes: list[Recipe] | None = None,
           baseline: Recipe | None = None) -> str:
    baselines = ", ".join(f"Mask R-CNN {name} **{ap:.3f}**" for name, ap in BASELINES.items())
    with_test = any(r.test_ap50 is not None for r in rows)
    metric_columns = (["test AP50"] if with_test else []) + METRIC_COLUMNS
    columns = LEAD_COLUMNS + metric_columns + TAIL_COLUMNS
    lines = [
        "# Table of Experiment Results",
        "",
        f"Homework baselines (leaderboard AP50 on the test images, top 100 detections per image): {baselines}.",
        "",
        *render_recipes(recipes or [], baseline),
        f"Below: finished runs of the MLflow experiment `{experiment}` (`{_store_label()}`), best val AP50 first. "
        "AP50 counts the 100 highest-scoring detections per image like the leaderboard; AP50 (all dets) counts all of them. "
        "Metrics are on the held-out val images unless marked test. "
        "Data `synthetic` marks the offline demo, not results on the homework data. "
        "The model of a run loads as `runs:/<run id>/model`. "
        f"Train stage time is the train stage's wall time; \"{LOOPS_ONLY.strip()}\" marks older runs that logged only the training loops' time.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] * len(LEAD_COLUMNS) + ["---:"] * len(metric_columns) + ["---"] * len(TAIL_COLUMNS)) + "|",
    ]
    for r in rows:
        cells = [r.run_name, f"`{r.run_id}`", r.data_source, r.backbone, r.weights, r.epochs, "" if r.best_epoch is None else r.best_epoch]
        if with_test:
            cells.append("" if r.test_ap50 is None else f"{r.test_ap50:.3f}")
        cells += [f"{r.metrics[k]:.3f}" if k in r.metrics else "" for k in METRICS]
        train_time = format_duration(r.train_seconds)
        cells += [train_time + (LOOPS_ONLY if train_time and r.train_loops_only else ""), format_time(r.end_time_ms)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path = Path("reports/results.md"), experiment: str = tracking.EXPERIMENT, baseline: str | None = None) -> str:
    """Write the tables to `out` atomically; returns its text. No evaluated run -> NucleisegError.
    `baseline`: a recipe (or a prefix of its hash) that every recipe is compared with, fold by fold."""
    rows, finals = collect(experiment)
    if not rows:
        raise NucleisegError(
            f"no finished run with val/ap50 in MLflow experiment '{experiment}' ({tracking.store_label()}); "
            "run the pipeline through the evaluate stage first (dvc repro)"
        )
    recipes = group_recipes(rows, finals)
    text = render(rows, experiment, recipes, find_recipe(recipes, baseline) if baseline else None)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return text
