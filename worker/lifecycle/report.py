"""``evaluate --report DIR``: ROC curves and score histograms (PNG), per-file CSV, metrics JSON.

Plots use matplotlib's Agg backend (no display needed) and scikit-learn's ROC; one curve per
condition (``clean`` and each perturbation), the histogram for the clean scores.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, never to a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from worker.lifecycle.evaluation import Condition, positive_scores, predict  # noqa: E402

FILES = ("roc.png", "histogram.png", "scores.csv", "metrics.json")


def write_report(
    directory: str | Path, conditions: Sequence[Condition], summary: Mapping[str, object]
) -> list[Path]:
    """Write the report files into ``directory`` (created); returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scored = [c for c in conditions if c.metrics is not None]
    paths = [
        _roc(directory / "roc.png", scored),
        _histogram(directory / "histogram.png", conditions[0]),
        _csv(directory / "scores.csv", conditions),
        _json(directory / "metrics.json", conditions, summary),
    ]
    return paths


def _scored_arrays(condition: Condition) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in condition.rows if row.score is not None]
    return np.array([row.score for row in rows], float), np.array([row.label for row in rows])


def _roc(path: Path, conditions: Sequence[Condition]) -> Path:
    figure, axes = plt.subplots(figsize=(6, 6), dpi=100)
    positive = conditions[0].metrics.positive if conditions else "ai"
    for condition in conditions:
        metrics = condition.metrics
        scores, labels = _scored_arrays(condition)
        if metrics is None or metrics.auc_roc is None:
            continue
        pos = positive_scores(scores, metrics.high_score_means, metrics.positive)
        fpr, tpr, _ = roc_curve(labels == metrics.positive, pos)
        axes.plot(fpr, tpr, label=f"{condition.name} (AUC {metrics.auc_roc:.4f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC, positive class: {positive}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _histogram(path: Path, condition: Condition) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    scores, labels = _scored_arrays(condition)
    bins = np.linspace(-1, 1, 41)
    for name, colour in (("real", "tab:blue"), ("ai", "tab:red")):
        axes.hist(
            scores[labels == name],
            bins=bins,
            alpha=0.55,
            color=colour,
            label=f"{name} ({(labels == name).sum()})",
        )
    if condition.metrics is not None:
        axes.axvline(condition.metrics.threshold, color="black", linewidth=1, label="threshold")
        means = condition.metrics.high_score_means
        axes.set_xlabel(f"score (above the threshold means {means})")
    axes.set(ylabel="images", title=f"scores per class ({condition.name})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _csv(path: Path, conditions: Sequence[Condition]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["condition", "path", "class", "score", "predicted", "correct", "error", "sha256"]
        )
        for condition in conditions:
            metrics = condition.metrics
            for row in condition.rows:
                predicted = ""
                if row.score is not None and metrics is not None:
                    predicted = str(
                        predict(np.array([row.score]), metrics.threshold, metrics.high_score_means)[
                            0
                        ]
                    )
                writer.writerow(
                    [
                        condition.name,
                        row.path,
                        row.label,
                        "" if row.score is None else repr(row.score),
                        predicted,
                        "" if not predicted else int(predicted == row.label),
                        row.error or "",
                        row.sha256 or "",
                    ]
                )
    return path


def _json(path: Path, conditions: Sequence[Condition], summary: Mapping[str, object]) -> Path:
    document = {
        **summary,
        "conditions": {
            condition.name: {
                "metrics": condition.metrics.to_dict() if condition.metrics else None,
                "images": len(condition.rows),
                "errors": dict(condition.errors),
            }
            for condition in conditions
        },
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path
