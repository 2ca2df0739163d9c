"""The results table: one row per finished, evaluated MLflow run, best val AP50 first.

Reads the project's store (`tracking.configure()`: `<repo>/mlruns/mlflow.db`, or
MLFLOW_TRACKING_URI) and writes `reports/results.md`, the homework's
"Table of Experiment Results", with the homework's baselines above it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

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
COLUMNS = LEAD_COLUMNS + METRIC_COLUMNS + TAIL_COLUMNS
# Runs logged before the train stage recorded its wall time (train/stage_seconds) only have
# the training loops' time; their cells say so.
LOOPS_ONLY = " (loops only)"


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


def collect_runs(experiment: str = tracking.EXPERIMENT) -> list[Row]:
    """Finished runs of `experiment` that have val/ap50, best val AP50 first (newer first on ties)."""
    if not _store_exists():
        raise NucleisegError(f"{tracking.store_dir() / 'mlflow.db'}: no MLflow store yet; run the pipeline first (dvc repro)")
    import mlflow

    experiment_id = tracking.configure(experiment)
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string="attributes.status = 'FINISHED'", output_format="list"
    )
    rows = []
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        if "val/ap50" not in metrics:
            continue
        best = metrics.get("train/best_epoch")
        stage_seconds = metrics.get("train/stage_seconds")
        rows.append(
            Row(
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
            )
        )
    rows.sort(key=lambda r: (-r.metrics["ap50"], -(r.end_time_ms or 0)))
    return rows


def data_source(tags: dict, params: dict) -> str:
    """The run's data: its `data_source` tag, else a short label of its `data.source` param (older runs)."""
    return tags.get("data_source") or describe_source(params.get("data.source"))


def render(rows: list[Row], experiment: str = tracking.EXPERIMENT) -> str:
    baselines = ", ".join(f"Mask R-CNN {name} **{ap:.3f}**" for name, ap in BASELINES.items())
    with_test = any(r.test_ap50 is not None for r in rows)
    metric_columns = (["test AP50"] if with_test else []) + METRIC_COLUMNS
    columns = LEAD_COLUMNS + metric_columns + TAIL_COLUMNS
    lines = [
        "# Table of Experiment Results",
        "",
        f"Homework baselines (leaderboard AP50 on the test images, top 100 detections per image): {baselines}.",
        "",
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


def write_report(out: str | Path = Path("reports/results.md"), experiment: str = tracking.EXPERIMENT) -> str:
    """Write the table to `out` atomically; returns its text. No evaluated run -> NucleisegError."""
    rows = collect_runs(experiment)
    if not rows:
        raise NucleisegError(
            f"no finished run with val/ap50 in MLflow experiment '{experiment}' ({tracking.store_label()}); "
            "run the pipeline through the evaluate stage first (dvc repro)"
        )
    text = render(rows, experiment)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return text
