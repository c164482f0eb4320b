"""One image's whole path, shared by the Celery tasks, the embedded CLI and ``evaluate``:

    URI -> bytes (sources) -> RGB (decode) -> pixels (preprocess) -> batcher -> score -> result

Fetch, decode and preprocessing run on the calling thread (I/O and Pillow release the GIL), so the
batcher thread only ever runs the model. Every failure becomes an error result for that image.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from shared.errors import ErrorCode, ScoringError
from shared.results import ResultFactory, Result
from shared.settings import Settings
from worker.model import decode
from worker.serving import metrics
from worker.serving.batcher import DynamicBatcher, Lane
from worker.serving.budget import ByteBudget
from worker.lifecycle.features import encode_features
from worker.model.loader import LoadedModel
from worker.serving.sources import Sources

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """An image ready for the model."""

    pixels: torch.Tensor
    sha256: str


def verdict_rule(settings: Settings, head_metadata: dict[str, str]) -> tuple[float, str]:
    """Threshold and polarity: the environment wins, then the head's own metadata, then defaults."""
    explicit = settings.model_fields_set
    threshold = settings.threshold
    if "threshold" not in explicit and "threshold" in head_metadata:
        threshold = float(head_metadata["threshold"])
    means = settings.high_score_means
    if "high_score_means" not in explicit and head_metadata.get("high_score_means") in ("real", "ai"):
        means = head_metadata["high_score_means"]  # type: ignore[assignment]
    return threshold, means


class ScoringService:
    """Owns the batcher, the sources and the pixel budget of one process."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: Settings,
        *,
        local_roots: Sequence[Path] | None = (),
        max_batch_size: int | None = None,
        threads: int | None = None,
        on_broken: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.settings = settings
        threshold, means = verdict_rule(settings, loaded.head_metadata)
        self.results = ResultFactory(
            loaded.model_id, threshold, means, include_sha256=settings.result_sha256  # type: ignore[arg-type]
        )
        threads = threads or settings.task_concurrency
        self.sources = Sources(
            local_roots=local_roots,
            max_bytes=settings.max_image_bytes,
            timeout=settings.fetch_timeout,
            s3_endpoint_url=settings.s3_endpoint_url,
            # The embedded mode (local_roots=None) trusts its caller with every bucket too.
            s3_buckets=None if local_roots is None else settings.s3_buckets,
            # Celery's task threads fetch for `score` while this process's fetch pools (one per
            # lane, as many threads each) fetch for `score_many`: all can hold a connection.
            max_pool_connections=max(settings.task_concurrency + threads * len(Lane), 10),
        )
        self.budget = ByteBudget(settings.max_pending_bytes)
        self.batcher: DynamicBatcher[torch.Tensor, tuple[float, torch.Tensor]] = DynamicBatcher(
            self._forward,
            max_batch_size=max_batch_size or settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            on_broken=on_broken,
        )
        # One fetch pool per lane: a backfill's prefetched chunks must not queue ahead of an
        # interactive score_many before its images even reach the (two-lane) batcher.
        self._pools = {
            lane: ThreadPoolExecutor(threads, thread_name_prefix=f"realscore-{lane.name.lower()}")
            for lane in Lane
        }
        # Our own header check is the pixel limit; Pillow's global one must not refuse first.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, settings.max_image_pixels)

    @property
    def healthy(self) -> bool:
        """False once forward passes keep failing (e.g. a poisoned CUDA context)."""
        return not self.batcher.broken

    def start(self) -> ScoringService:
        self.batcher.start()
        return self

    def stop(self) -> None:
        """Finish the queued work (fetches first, then the batches they feed), then stop."""
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self.batcher.stop()

    def _forward(self, items: list[torch.Tensor]) -> list[tuple[float, torch.Tensor]]:
        scores, features = self.loaded.score_and_features(torch.stack(items))
        return list(zip(scores, features))

    def prepare(self, uri: object) -> Prepared:
        """Fetch, decode and preprocess one image (on the calling thread)."""
        data = self.sources.fetch(uri)
        return self.prepare_bytes(data)

    def prepare_bytes(self, data: bytes) -> Prepared:
        """Decode and preprocess image bytes, within the process's pixel budget."""
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            image = decode.open_image(data, max_pixels=self.settings.max_image_pixels)
            with self.budget.hold(decode.decoded_bytes_estimate(image)):
                pixels = self.loaded.preprocessing(decode.to_rgb(image))
        except ScoringError as error:
            error.sha256 = sha256  # type: ignore[attr-defined]
            raise
        return Prepared(pixels, sha256)

    def infer(self, prepared: Prepared, lane: Lane = Lane.INTERACTIVE) -> tuple[float, torch.Tensor]:
        """Score and features of a prepared image, through the batcher (blocks until done)."""
        pixels = prepared.pixels
        taken = self.budget.acquire(pixels.numel() * pixels.element_size())
        try:
            future = self.batcher.submit(pixels, lane, on_done=lambda: self.budget.release(taken))
        except BaseException:
            self.budget.release(taken)
            raise
        return future.result()

    def score_uri(self, uri: object, lane: Lane = Lane.INTERACTIVE) -> Result:
        """One result, never an exception."""
        return self.score_prepared(uri, lambda: self.prepare(uri), lane)

    def score_bytes(self, uri: str, data: bytes, lane: Lane = Lane.INTERACTIVE) -> Result:
        """A result for image bytes already in memory (``uri`` only labels it)."""
        return self.score_prepared(uri, lambda: self.prepare_bytes(data), lane)

    def score_prepared(self, uri: object, prepare: Callable[[], Prepared], lane: Lane) -> Result:
        outcome = self._run(uri, prepare, lane)
        if isinstance(outcome, _Failure):
            return outcome.result
        metrics.IMAGES_SCORED.inc()
        return self.results.ok(uri, outcome.score, sha256=outcome.sha256, elapsed_ms=outcome.elapsed_ms)  # type: ignore[arg-type]

    def embed_uri(self, uri: object, lane: Lane = Lane.BULK) -> dict:
        """Pooled features of one image for training, encoded compactly (base64 float16)."""
        outcome = self._run(uri, lambda: self.prepare(uri), lane)
        if isinstance(outcome, _Failure):
            return embed_row(outcome.result)
        return embed_row(
            {"uri": uri, "sha256": outcome.sha256, "model": self.results.model, "error": None},
            outcome.features,
        )

    def _run(self, uri: object, prepare: Callable[[], Prepared], lane: Lane) -> _Done | _Failure:
        """Prepare and infer one image; any failure becomes its error result."""
        started = time.monotonic()
        sha256 = None
        try:
            prepared = prepare()
            sha256 = prepared.sha256
            score, features = self.infer(prepared, lane)
        except Exception as error:  # noqa: BLE001 - every failure is a per-image result
            sha256 = sha256 or getattr(error, "sha256", None)
            return _Failure(self.error_result(uri, error, sha256, started))
        return _Done(score, features, sha256, _ms_since(started))

    def error_result(
        self, uri: object, error: BaseException, sha256: str | None, started: float
    ) -> Result:
        """The error result for ``error``, counted and (if unexpected) logged."""
        result = self.results.from_exception(uri, error, sha256=sha256, elapsed_ms=_ms_since(started))
        code = result["error"]["code"] if result["error"] else ErrorCode.INTERNAL.value
        metrics.ERRORS.labels(code).inc()
        if code == ErrorCode.INTERNAL.value:
            log.error("internal error on %r: %s", result["uri"], result["error"])
        return result

    def score_uris(self, uris: Sequence[object], lane: Lane = Lane.INTERACTIVE) -> list[Result]:
        """Results in input order; the images are fetched in parallel and batched together."""
        return self.map(lambda uri: self.score_uri(uri, lane), uris, lane)

    def map(
        self, function: Callable[[object], T], items: Sequence[object], lane: Lane = Lane.INTERACTIVE
    ) -> list[T]:
        """``function`` over ``items`` on the lane's fetch threads, results in order."""
        return list(self._pools[lane].map(function, items))


@dataclass(frozen=True)
class _Done:
    score: float
    features: torch.Tensor
    sha256: str
    elapsed_ms: float


@dataclass(frozen=True)
class _Failure:
    result: Result


def embed_row(result: Mapping[str, Any], features: torch.Tensor | None = None) -> dict:
    """A ``realscore.embed`` row: features as base64 little-endian float16, or the error."""
    ok = features is not None
    return {
        "uri": result["uri"],
        "ok": ok,
        "sha256": result.get("sha256"),
        "dim": int(features.shape[-1]) if ok else 0,
        "features": encode_features(features.numpy()) if ok else None,
        "model": result["model"],
        "error": None if ok else result["error"],
    }


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000
