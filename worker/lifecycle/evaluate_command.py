"""``realscore evaluate --real DIR --ai DIR``: the seed's table on your own labelled folders.

Scores every image in-process through :class:`worker.serving.service.ScoringService` (the embedded mode's
path: same fetch, decode, preprocessing and batching as the worker) or, with ``--via-queue``,
through running workers. ``--perturb`` re-scores degraded copies and prints a table for each;
``--report DIR`` writes plots, a per-file CSV and a JSON of all metrics. Images that cannot be
scored are counted by error code and left out of the metrics.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from shared.cli import EXIT_FAILURE, EXIT_OK, UsageError
from shared.usage import model_stopped
from shared import preflight
from shared.results import Result, ResultFactory
from shared.settings import Settings, get_settings
from worker.lifecycle.folders import LabelledFile, labelled_files
from worker.lifecycle.perturb import Perturbation, degrade, parse

if TYPE_CHECKING:
    from worker.lifecycle.evaluation import Condition, Row


class Scorer(Protocol):
    model: str

    def score(self, paths: list[Path]) -> list[Result]: ...

    def score_degraded(self, paths: list[Path], perturbation: Perturbation) -> list[Result]: ...

    def rule(self, results: list[Result]) -> tuple[float, str]: ...

    def close(self) -> None: ...


class LocalScorer:
    """The model in this process, as ``realscore score`` runs it."""

    def __init__(self, settings: Settings, batch_size: int | None) -> None:
        from worker.serving.embedded import start_service

        self.settings = settings
        self.service = start_service(settings, batch_size)
        self.model = self.service.results.model

    def score(self, paths: list[Path]) -> list[Result]:
        from worker.serving.progress import progress

        with progress(len(paths), "clean") as tick:
            return self.service.map(lambda path: tick(self.service.score_uri(str(path))), paths)

    def score_degraded(self, paths: list[Path], perturbation: Perturbation) -> list[Result]:
        from worker.serving.progress import progress

        def one(path: object) -> Result:
            try:
                data = self.service.sources.fetch(str(path))
                degraded = degrade(data, perturbation, max_pixels=self.settings.max_image_pixels)
            except Exception as error:  # noqa: BLE001 - a per-image result, like the original's
                return self.service.results.from_exception(str(path), error)
            return self.service.score_bytes(str(path), degraded)

        with progress(len(paths), perturbation.name) as tick:
            return self.service.map(lambda path: tick(one(path)), paths)

    def rule(self, results: list[Result]) -> tuple[float, str]:
        return self.service.results.threshold, self.service.results.high_score_means

    def close(self) -> None:
        self.service.stop()


class QueueScorer:
    """Running workers, through :func:`shared.client.score_many` on the bulk queue."""

    def __init__(self, settings: Settings, timeout: float, work_dir: str | None) -> None:
        from shared import client

        self.client = client
        self.settings = settings
        self.timeout = timeout
        self.work_dir = Path(work_dir).absolute() if work_dir else None
        self.model = "(workers)"

    def score(self, paths: list[Path]) -> list[Result]:
        results = self.client.score_many(
            [str(path) for path in paths], timeout=self.timeout, bulk=True
        )
        models = {result["model"] for result in results if result.get("model")}
        self.model = ", ".join(sorted(models)) or self.model
        return results

    def score_degraded(self, paths: list[Path], perturbation: Perturbation) -> list[Result]:
        """Degraded copies go to ``--work-dir`` (which the workers must be able to read)."""
        assert self.work_dir is not None
        folder = self.work_dir / re.sub(r"[^A-Za-z0-9.]+", "-", perturbation.name)
        folder.mkdir(parents=True, exist_ok=True)
        local_errors = ResultFactory(self.model)
        results: list[Result | None] = []
        written: list[tuple[int, Path]] = []
        for index, path in enumerate(paths):
            try:
                data = degrade(
                    path.read_bytes(), perturbation, max_pixels=self.settings.max_image_pixels
                )
            except Exception as error:  # noqa: BLE001
                results.append(local_errors.from_exception(str(path), error))
                continue
            copy = folder / f"{index:07d}{perturbation.suffix}"
            copy.write_bytes(data)
            written.append((index, copy))
            results.append(None)
        scored = self.client.score_many(
            [str(copy) for _, copy in written], timeout=self.timeout, bulk=True
        )
        for (index, _), result in zip(written, scored, strict=True):
            result["uri"] = str(paths[index])
            results[index] = result
        return results  # type: ignore[return-value]

    def rule(self, results: list[Result]) -> tuple[float, str]:
        """The workers' own threshold and polarity, read back from their verdicts."""
        from worker.lifecycle.evaluation import other

        for result in results:
            if result.get("ok") and result.get("label") in ("real", "ai"):
                threshold = float(result["threshold"])
                above = result["score"] > threshold
                return threshold, result["label"] if above else other(result["label"])
        return self.settings.threshold, self.settings.high_score_means

    def close(self) -> None:
        pass


def _rows(files: list[LabelledFile], results: list[Result]) -> list[Row]:
    from worker.lifecycle.evaluation import Row

    rows = []
    for item, result in zip(files, results, strict=True):
        error = None if result["ok"] else (result.get("error") or {}).get("code", "internal")
        score = result["score"] if result["ok"] else None
        rows.append(Row(str(item.path), item.label, score, error, result.get("sha256")))
    return rows


def _changed(clean: Condition, degraded: Condition) -> tuple[str, str]:
    before, after = clean.verdicts(), degraded.verdicts()
    common = [path for path in before if path in after]
    flipped = sum(before[path] != after[path] for path in common)
    share = f" ({100 * flipped / len(common):.2f} %)" if common else ""
    return "verdicts changed vs clean", f"{flipped}/{len(common)}{share}"


def _print_condition(condition: Condition, clean: Condition | None) -> None:
    print(f"\n== {condition.name}: {len(condition.rows)} images ==")
    if condition.errors:
        detail = ", ".join(f"{code} {count}" for code, count in sorted(condition.errors.items()))
        print(f"  not scored, left out of the metrics: {sum(condition.errors.values())} ({detail})")
    if condition.metrics is None:
        print("  no image could be scored")
        return
    extra = [_changed(clean, condition)] if clean is not None and clean.metrics else []
    from worker.lifecycle.evaluation import format_table

    print(format_table(condition.metrics, extra=extra))


def _validate(args: argparse.Namespace) -> list[Perturbation]:
    preflight.evaluate_arguments(args)  # the same checks as before the model is imported
    try:
        return parse(args.perturb) if args.perturb else []
    except ValueError as error:
        raise UsageError(f"--perturb: {error}") from None


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    perturbations = _validate(args)
    # scikit-learn takes seconds to import: only once the arguments are known to be good.
    from worker.lifecycle.evaluation import Condition
    from worker.serving.batcher import ModelBroken

    files = labelled_files(args.real, args.ai)
    paths = [item.path for item in files]
    scorer: Scorer = (
        QueueScorer(settings, args.timeout, args.work_dir)
        if args.via_queue
        else LocalScorer(settings, args.batch_size)
    )
    conditions: list[Condition] = []
    broken: str | None = None
    try:
        results = scorer.score(paths)
        threshold, means = scorer.rule(results)
        if args.threshold is not None:
            threshold = args.threshold
        rule = dict(threshold=threshold, high_score_means=means, positive=args.positive)
        real_count = sum(item.label == "real" for item in files)
        print(f"model {scorer.model}")
        print(f"real: {Path(args.real).absolute()} ({real_count} files)")
        print(f"ai:   {Path(args.ai).absolute()} ({len(files) - real_count} files)")
        clean = Condition.evaluate("clean", _rows(files, results), **rule)
        conditions.append(clean)
        _print_condition(clean, None)
        for perturbation in perturbations:
            results = scorer.score_degraded(paths, perturbation)
            condition = Condition.evaluate(perturbation.name, _rows(files, results), **rule)
            conditions.append(condition)
            _print_condition(condition, clean)
    except ModelBroken as error:  # in-process only: a sticky device error, a hung forward
        kept = ", ".join(c.name for c in conditions) or "none"
        broken = model_stopped("evaluate", error, f"conditions finished: {kept}")
    finally:
        scorer.close()
    sys.stdout.flush()

    if args.report and conditions:
        from worker.lifecycle.report import write_report

        summary = {
            "model": scorer.model,
            "real_dir": str(Path(args.real).absolute()),
            "ai_dir": str(Path(args.ai).absolute()),
            "threshold": threshold,
            "high_score_means": means,
            "positive": args.positive,
            "via_queue": bool(args.via_queue),
        }
        written = write_report(args.report, conditions, summary)
        print(f"\nreport: {', '.join(str(path) for path in written)}")
    if broken is not None:
        print(broken, file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if conditions[0].metrics is not None else EXIT_FAILURE
