"""Evaluation metrics over scores and true labels, and the seed's table: pure functions, no model.

Every number comes from scikit-learn. The model's score is high for the class ``high_score_means``
names (``real`` by default), while the metrics call one class *positive* (``ai`` by default,
whatever the polarity): ROC and precision curves are computed on the positive class's score, which
is ``-score`` when a high score means the other class. Verdicts follow the service's own rule
(:func:`shared.results.label_for`): above the threshold is ``high_score_means``, at or below it the
other class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

CLASSES = ("real", "ai")
FPR_TARGETS = (0.01, 0.05)


def other(label: str) -> str:
    """The class that is not ``label``."""
    _check_class(label)
    return "ai" if label == "real" else "real"


def _check_class(label: str) -> None:
    if label not in CLASSES:
        raise ValueError(f"class must be one of {CLASSES}, got {label!r}")


@dataclass(frozen=True)
class ClassCount:
    """How many images of one class got the right verdict."""

    name: str
    correct: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.correct / self.total if self.total else None

    def text(self) -> str:
        rate = self.rate
        return f"{self.correct}/{self.total}" + (
            f" ({100 * rate:.2f} %)" if rate is not None else ""
        )


@dataclass(frozen=True)
class Metrics:
    """Everything ``evaluate`` reports for one set of scores."""

    positive: str
    threshold: float
    high_score_means: str
    negatives: ClassCount
    positives: ClassCount
    accuracy: float
    balanced_accuracy: float
    f1: dict[str, float]  # F1 with each class taken as the positive one
    auc_roc: float | None  # None when only one class is present
    average_precision: float | None
    tpr_at_fpr: dict[float, float | None]
    best_threshold: float | None
    best_balanced_accuracy: float | None

    @property
    def negative(self) -> str:
        return other(self.positive)

    @property
    def polarity_inverted(self) -> bool:
        """An AUC below 0.5: the score ranks the classes the wrong way round."""
        return self.auc_roc is not None and self.auc_roc < 0.5

    def to_dict(self) -> dict:
        data = asdict(self)
        data["negative"] = self.negative
        for key in ("negatives", "positives"):
            data[key]["rate"] = getattr(self, key).rate
        data["tpr_at_fpr"] = {str(target): value for target, value in self.tpr_at_fpr.items()}
        data["polarity_inverted"] = self.polarity_inverted
        return data


def predict(scores: np.ndarray, threshold: float, high_score_means: str) -> np.ndarray:
    """Verdicts as class names: above ``threshold`` is ``high_score_means`` (the service's rule)."""
    return np.where(
        np.asarray(scores, float) > threshold, high_score_means, other(high_score_means)
    )


def positive_scores(scores: np.ndarray, high_score_means: str, positive: str = "ai") -> np.ndarray:
    """Scores that grow with the positive class: ``-score`` when a high score means the other."""
    scores = np.asarray(scores, float)
    return scores if high_score_means == positive else -scores


def tpr_at_fpr(labels: np.ndarray, pos_scores: np.ndarray, positive: str, target: float) -> float:
    """The highest true positive rate whose false positive rate is at most ``target``."""
    fpr, tpr, _ = roc_curve(labels == positive, pos_scores, drop_intermediate=False)
    return float(tpr[fpr <= target + 1e-12].max())


def best_threshold(
    scores: np.ndarray, labels: np.ndarray, high_score_means: str
) -> tuple[float, float]:
    """The threshold (in raw score, for the service's ``score > threshold`` rule) that maximises
    balanced accuracy, and that balanced accuracy. Ties go to the highest threshold; the value
    returned lies halfway between the two scores it separates."""
    scores = np.asarray(scores, float)
    fpr, tpr, cuts = roc_curve(labels == high_score_means, scores, drop_intermediate=False)
    balanced = (tpr + 1 - fpr) / 2  # mean per-class recall, the same whichever class is positive
    best = int(np.argmax(balanced))
    cut = cuts[best]  # roc_curve predicts the high class for score >= cut
    if not np.isfinite(cut):
        return float(scores.max()), float(balanced[best])
    below = scores[scores < cut]
    if below.size:
        threshold = (cut + below.max()) / 2
    else:
        threshold = -1.0 if cut > -1.0 else float(np.nextafter(cut, -np.inf))
    return float(threshold), float(balanced[best])


def compute_metrics(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    threshold: float = 0.0,
    high_score_means: str = "real",
    positive: str = "ai",
    fpr_targets: Sequence[float] = FPR_TARGETS,
) -> Metrics:
    """All metrics for ``scores`` (the model's raw [-1, 1] output) against true ``labels``."""
    _check_class(high_score_means)
    _check_class(positive)
    scores = np.asarray(scores, float)
    labels = np.asarray(labels, dtype=object)
    if scores.shape != labels.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError("scores and labels must be non-empty 1-d sequences of the same length")
    unknown = set(labels.tolist()) - set(CLASSES)
    if unknown:
        raise ValueError(f"labels must be {CLASSES}, got {sorted(map(str, unknown))}")
    labels = labels.astype(str)
    negative = other(positive)
    predicted = predict(scores, threshold, high_score_means)
    matrix = confusion_matrix(labels, predicted, labels=[negative, positive])
    f1 = f1_score(labels, predicted, labels=list(CLASSES), average=None, zero_division=0.0)

    both_classes = len(set(labels.tolist())) == 2
    auc = average_precision = best = best_balanced = None
    tprs: dict[float, float | None] = {target: None for target in fpr_targets}
    if both_classes:
        pos_scores = positive_scores(scores, high_score_means, positive)
        auc = float(roc_auc_score(labels == positive, pos_scores))
        average_precision = float(average_precision_score(labels == positive, pos_scores))
        tprs = {t: tpr_at_fpr(labels, pos_scores, positive, t) for t in fpr_targets}
        best, best_balanced = best_threshold(scores, labels, high_score_means)
    return Metrics(
        positive=positive,
        threshold=float(threshold),
        high_score_means=high_score_means,
        negatives=ClassCount(negative, int(matrix[0, 0]), int(matrix[0].sum())),
        positives=ClassCount(positive, int(matrix[1, 1]), int(matrix[1].sum())),
        accuracy=float(accuracy_score(labels, predicted)),
        balanced_accuracy=float(balanced_accuracy_score(labels, predicted))
        if both_classes
        else float(accuracy_score(labels, predicted)),
        f1={name: float(value) for name, value in zip(CLASSES, f1, strict=True)},
        auc_roc=auc,
        average_precision=average_precision,
        tpr_at_fpr=tprs,
        best_threshold=best,
        best_balanced_accuracy=best_balanced,
    )


@dataclass(frozen=True)
class Row:
    """One image of an evaluation: its true class and its score, or why it has none."""

    path: str
    label: str
    score: float | None
    error: str | None = None
    sha256: str | None = None


@dataclass
class Condition:
    """The rows and metrics of one evaluation pass (``clean`` or one perturbation)."""

    name: str
    rows: list[Row]
    metrics: Metrics | None = None
    errors: Counter = field(default_factory=Counter)

    @classmethod
    def evaluate(
        cls, name: str, rows: list[Row], *, threshold: float, high_score_means: str, positive: str
    ) -> Condition:
        scored = [row for row in rows if row.score is not None]
        errors = Counter(row.error or "unknown" for row in rows if row.score is None)
        metrics = None
        if scored:
            metrics = compute_metrics(
                [row.score for row in scored],
                [row.label for row in scored],
                threshold=threshold,
                high_score_means=high_score_means,
                positive=positive,
            )
        return cls(name, rows, metrics, errors)

    def verdicts(self) -> dict[str, str]:
        """path -> predicted class, for the scored rows."""
        assert self.metrics is not None
        rule = (self.metrics.threshold, self.metrics.high_score_means)
        return {
            row.path: str(predict(np.array([row.score]), *rule)[0])
            for row in self.rows
            if row.score is not None
        }


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a (one class only)" if value is None else f"{value:.{digits}f}"


def format_table(
    metrics: Metrics, *, title: str | None = None, extra: Sequence[tuple[str, str]] = ()
) -> str:
    """The seed's table (counts and rates per class, F1, AUC-ROC) and our additional metrics."""
    neg, pos = metrics.negative, metrics.positive
    higher = f"score above {metrics.threshold:g} means {metrics.high_score_means}"
    lines: list[tuple[str, str]] = [
        (f"true negative rate ({neg})", metrics.negatives.text()),
        (f"true positive rate ({pos})", metrics.positives.text()),
        (f"F1 ({pos} as positive)", f"{metrics.f1[pos]:.4f}"),
        (f"F1 ({neg} as positive)", f"{metrics.f1[neg]:.4f}"),
        ("AUC-ROC", _num(metrics.auc_roc)),
        (f"average precision ({pos})", _num(metrics.average_precision)),
        ("accuracy", f"{metrics.accuracy:.4f}"),
        ("balanced accuracy", f"{metrics.balanced_accuracy:.4f}"),
    ]
    for target, value in metrics.tpr_at_fpr.items():
        lines.append((f"TPR at {100 * target:g} % FPR", _num(value)))
    if metrics.best_threshold is not None:
        lines.append(
            (
                "best threshold (balanced accuracy)",
                f"{metrics.best_threshold:.4f} "
                f"(balanced accuracy {metrics.best_balanced_accuracy:.4f})",
            )
        )
    lines.extend(extra)
    width = max(len(name) for name, _ in lines)
    header = f"positive class: {pos} (negative: {neg}); threshold {metrics.threshold:g}, {higher}"
    body = [f"  {name.ljust(width)}  {value}" for name, value in lines]
    if metrics.polarity_inverted:
        body.append(polarity_warning(metrics))
    return "\n".join(([title] if title else []) + [header] + body)


def polarity_warning(metrics: Metrics) -> str:
    return (
        f"  WARNING: AUC-ROC {metrics.auc_roc:.4f} is below 0.5: the polarity is probably inverted "
        f"(try REALSCORE_HIGH_SCORE_MEANS={other(metrics.high_score_means)}, or check the folders)"
    )
