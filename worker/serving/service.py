"""One image's whole path, shared by the Celery tasks, the embedded CLI and ``evaluate``:

    URI -> bytes (sources) -> header check -> mode.stage -> batcher -> mode.collate -> model -> result

Fetch, the header check and the preprocessing mode's CPU work run on the calling thread (I/O and
Pillow release the GIL); the batcher thread runs the mode's device work and the model
(worker/model/modes.py). Every failure becomes an error result for that image.
With a result cache (``REALSCORE_CACHE_URL``) a score is looked up by the bytes' sha256 right
after the fetch: a hit returns ``cached: true`` without decoding or touching the batcher.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from shared.errors import ErrorCode, ScoringError
from shared.results import ResultFactory, Result
from shared.settings import Settings
from worker.serving import deadlines, metrics
from worker.serving.batcher import DynamicBatcher, ItemFailed, Lane, ModelBroken
from worker.serving.budget import FetchHold, Held, SharedBudget
from worker.serving.cache import ScoreCache
from worker.serving.lanepool import LanePool
from worker.lifecycle.features import encode_features
from worker.model.loader import Launched, LoadedModel
from worker.model.modes import Collated, Staged, make_mode
from worker.serving.sources import Sources

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP_SLICE_S = 0.1  # how often stop() looks whether the batcher broke meanwhile


@dataclass(frozen=True)
class Prepared:
    """An image ready for the batcher (what its preprocessing mode staged), and the pixel budget
    it holds until :meth:`ScoringService.infer` has scored it (a caller that drops it unscored
    calls ``held.release()``)."""

    staged: Staged
    sha256: str
    held: Held


@dataclass(frozen=True)
class _Item:
    payload: object
    with_features: bool


@dataclass(frozen=True)
class _InFlight:
    errors: list[BaseException | None]
    with_features: list[bool]
    launched: Launched | None


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
        cache: ScoreCache | None = None,
    ) -> None:
        self.loaded = loaded
        self.settings = settings
        threshold, means = verdict_rule(settings, loaded.head_metadata)
        # DecodeModeError (e.g. gpu without torchvision) stops start-up with its one line.
        self.mode = make_mode(settings.decode, loaded.preprocessing, loaded.device, loaded.dtype)
        self.results = ResultFactory(
            loaded.result_model(self.mode.name),
            threshold,
            means,  # type: ignore[arg-type]
            include_sha256=settings.result_sha256,
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
        # Bulk images may hold half the pixel budget: the other half stays for interactive ones.
        self.budget = SharedBudget(settings.pending_bytes)
        # Fetched bytes not yet counted there (read, or waiting for pixel budget): the same split.
        self.fetch_budget = SharedBudget(settings.fetch_bytes)
        on_gpu = loaded.device.type == "cuda"
        self.batcher: DynamicBatcher[_Item, tuple[float, torch.Tensor | None]] = DynamicBatcher(
            self._stage,
            finish=self._finish,
            # On a GPU, stage batch N+1 while batch N runs; on a CPU staging *is* the work.
            pipeline_depth=2 if on_gpu else 1,
            split_on=(torch.cuda.OutOfMemoryError,),
            max_batch_size=max_batch_size or settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            on_broken=on_broken,
            forward_timeout_s=settings.forward_timeout,
        )
        # One fetch pool per lane: a backfill's prefetched chunks must not queue ahead of an
        # interactive score_many before its images even reach the (two-lane) batcher.
        self._pools = {lane: LanePool(threads, f"realscore-{lane.name.lower()}") for lane in Lane}
        self.cache = cache if cache is not None else self._cache_from_settings()
        # Our own header check is the pixel limit; Pillow's global one must not refuse first.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, settings.max_image_pixels)

    @property
    def decode_mode(self) -> str:
        """The preprocessing that produced this service's scores (part of the cache key)."""
        return self.mode.name

    @property
    def dtype_name(self) -> str:
        return str(self.loaded.dtype).removeprefix("torch.")

    def _cache_from_settings(self) -> ScoreCache | None:
        if not self.settings.cache_url:
            return None
        return ScoreCache.from_url(
            self.settings.cache_url,
            model=self.results.model,
            dtype=self.dtype_name,
            decode_mode=self.decode_mode,
            ttl_s=self.settings.cache_ttl,
        )

    @property
    def healthy(self) -> bool:
        """False once forward passes keep failing (e.g. a poisoned CUDA context)."""
        return not self.batcher.broken

    def start(self) -> ScoringService:
        """Compile and warm up (``REALSCORE_COMPILE``) before taking work, then start batching.

        Also sets this process's GIL switch interval (``REALSCORE_SWITCH_INTERVAL_MS``): every
        eager op of the forward gives the GIL up and takes it back, and a thread running Python
        hands it over only when asked, one interval after the batcher began to wait."""
        sys.setswitchinterval(self.settings.switch_interval_ms / 1000)
        warm_up = None
        if self.settings.compile != "off" and not self.loaded.compiled_sizes:
            sizes = compile_sizes(self.batcher.max_batch_size)
            warm_up = lambda: self.loaded.compile(self.settings.compile, sizes)  # noqa: E731
        self.batcher.start(warm_up)  # on the batcher thread, where every forward runs
        return self

    def stop(self, broken_timeout: float = 10.0) -> bool:
        """Finish the queued work (fetches first, then the batches they feed), then stop. A
        broken batcher (its forward may hang for ever) is waited for ``broken_timeout`` at most,
        counted from when it is seen broken: also when the watchdog declares it so only while
        we wait. Returns whether the batcher thread has ended."""
        for pool in self._pools.values():
            pool.shutdown()
        # Joined in slices: the watchdog may find the forward hung (and the batcher broken)
        # only after shutdown began; from then on the wait is bounded by ``broken_timeout``.
        give_up_at: float | None = None
        while not (ended := self.batcher.stop(_STOP_SLICE_S)):
            if self.batcher.broken:
                now = time.monotonic()
                give_up_at = give_up_at if give_up_at is not None else now + broken_timeout
                if now >= give_up_at:
                    break
        if self.cache is not None:
            self.cache.close()
        return ended

    @torch.inference_mode()
    def _stage(self, items: list[_Item]) -> _InFlight:
        """Forward step, first half: the mode's device work, then the model, queued on the device."""
        collated: Collated = self.mode.collate([item.payload for item in items])
        flags = [item.with_features for item, error in zip(items, collated.errors) if error is None]
        launched = None
        if flags:
            launched = self.loaded.launch(collated.pixels, with_features=any(flags))
        return _InFlight(collated.errors, flags, launched)

    def _finish(self, in_flight: _InFlight) -> list[tuple[float, torch.Tensor | None] | ItemFailed]:
        """Forward step, second half: wait for the device; one output or failure per item."""
        scores: list[float] = []
        features = None
        if in_flight.launched is not None:
            scores, features = self.loaded.collect(in_flight.launched)
        outputs: list[tuple[float, torch.Tensor | None] | ItemFailed] = []
        row = 0
        for error in in_flight.errors:
            if error is not None:
                outputs.append(ItemFailed(error))
                continue
            wanted = in_flight.with_features[row]
            outputs.append((scores[row], features[row] if wanted and features is not None else None))
            row += 1
        return outputs

    def prepare(self, uri: object, lane: Lane = Lane.INTERACTIVE) -> Prepared:
        """Fetch, check the header and stage one image (on the calling thread). The fetched
        bytes are counted in the fetch budget from before their read until the pixel budget
        counts their decode."""
        fetched = self._fetch_hold(lane)
        try:
            data = self.sources.fetch(uri, fetched.reserve)
            return self.prepare_bytes(data, lane=lane)
        finally:
            fetched.release()

    def _fetch_hold(self, lane: Lane) -> FetchHold:
        """A fetch's share of the fetch budget, given back by :meth:`FetchHold.release` or, when
        the fetch is stuck in the kernel on a lane thread, as soon as that thread is given up on."""
        fetched = FetchHold(self.fetch_budget, bulk=lane is Lane.BULK)
        deadlines.on_abandon(fetched.release)
        return fetched

    def prepare_bytes(
        self, data: bytes, sha256: str | None = None, lane: Lane = Lane.INTERACTIVE
    ) -> Prepared:
        """Check the header and run the mode's CPU work, within the process's pixel budget (the
        compressed bytes count too). The budget the decode took stays held, shrunk to the staged
        bytes, until :meth:`infer` has scored the image: a decoded frame waiting for the batcher
        is counted like one being decoded."""
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        held = Held(self.budget, bulk=lane is Lane.BULK)
        try:
            staged = self.mode.stage_bytes(
                data, self.settings.max_image_pixels, lambda nbytes: held.hold(nbytes + len(data))
            )
            held.keep(staged.nbytes)
        except BaseException as error:
            held.release()
            if isinstance(error, ScoringError):
                error.sha256 = sha256  # type: ignore[attr-defined]
            raise
        return Prepared(staged, sha256, held)

    def infer(
        self, prepared: Prepared, lane: Lane = Lane.INTERACTIVE, *, with_features: bool = False
    ) -> tuple[float, torch.Tensor | None]:
        """Score (and features if asked) of a prepared image, through the batcher (blocks); the
        image's pixel budget is given back once its batch has ended."""
        held = prepared.held
        if not held.taken:  # scored again: its first infer gave the budget back
            held.take(prepared.staged.nbytes)
        item = _Item(prepared.staged.payload, with_features)
        # Released here, not by the batcher's on_done: the budget's lock is contended by every
        # task thread, and the one batcher thread must not wait for it (and then for the GIL)
        # once per image.
        try:
            return self.batcher.submit(item, lane).result()
        finally:
            held.release()

    def score_uri(self, uri: object, lane: Lane = Lane.INTERACTIVE) -> Result:
        """One result, never an exception."""
        if self.cache is not None:
            fetched = self._fetch_hold(lane)
            try:
                return self._score_cached(
                    self.cache, uri, lambda: self.sources.fetch(uri, fetched.reserve), lane, fetched.release
                )
            finally:
                fetched.release()
        return self.score_prepared(uri, lambda: self.prepare(uri, lane), lane)

    def score_bytes(self, uri: str, data: bytes, lane: Lane = Lane.INTERACTIVE) -> Result:
        """A result for image bytes already in memory (``uri`` only labels it)."""
        if self.cache is not None:
            return self._score_cached(self.cache, uri, lambda: data, lane)
        return self.score_prepared(uri, lambda: self.prepare_bytes(data, lane=lane), lane)

    def _score_cached(
        self,
        cache: ScoreCache,
        uri: object,
        fetch: Callable[[], bytes],
        lane: Lane,
        counted: Callable[[], None] = lambda: None,
    ) -> Result:
        """Fetch, then the cached raw score of those bytes, else score them and remember it.
        ``counted`` runs once their decode is counted in the pixel budget (the fetch budget's
        part ends there, as on the uncached path)."""
        started = time.monotonic()
        try:
            data = fetch()
        except Exception as error:  # noqa: BLE001 - every failure is a per-image result
            return self.error_result(uri, error, getattr(error, "sha256", None), started)
        sha256 = hashlib.sha256(data).hexdigest()
        leader = False
        score = cache.get(sha256)
        if score is None:  # the same bytes may be in flight here already: wait for their score
            leader, flight = cache.flights.join(sha256)
            score = None if leader else flight.result()
        if score is not None:
            return self.results.ok(uri, score, sha256=sha256, elapsed_ms=_ms_since(started), cached=True)  # type: ignore[arg-type]
        result = None
        held = [data]  # handed over to the decode, not kept alive here while the batch runs
        del data

        def prepare() -> Prepared:
            try:
                return self.prepare_bytes(held.pop(), sha256, lane)
            finally:
                counted()

        try:
            result = self.score_prepared(uri, prepare, lane, started)
            if result["ok"]:
                cache.put(sha256, result["score"])  # type: ignore[arg-type]
        finally:
            if leader:
                cache.flights.finish(sha256, result["score"] if result and result["ok"] else None)
        return result

    def score_prepared(
        self, uri: object, prepare: Callable[[], Prepared], lane: Lane, started: float | None = None
    ) -> Result:
        outcome = self._run(uri, prepare, lane, started)
        if isinstance(outcome, _Failure):
            return outcome.result
        metrics.IMAGES_SCORED.inc()
        return self.results.ok(uri, outcome.score, sha256=outcome.sha256, elapsed_ms=outcome.elapsed_ms)  # type: ignore[arg-type]

    def embed_uri(self, uri: object, lane: Lane = Lane.BULK) -> dict:
        """Pooled features of one image for training, encoded compactly (base64 float16)."""
        outcome = self._run(uri, lambda: self.prepare(uri, lane), lane, with_features=True)
        if isinstance(outcome, _Failure):
            return embed_row(outcome.result)
        return embed_row(
            {"uri": uri, "sha256": outcome.sha256, "model": self.results.model, "error": None},
            outcome.features,
        )

    def _run(
        self,
        uri: object,
        prepare: Callable[[], Prepared],
        lane: Lane,
        started: float | None = None,
        *,
        with_features: bool = False,
    ) -> _Done | _Failure:
        """Prepare and infer one image; any failure becomes its error result."""
        started = time.monotonic() if started is None else started
        sha256 = None
        try:
            prepared = prepare()
            sha256 = prepared.sha256
            score, features = self.infer(prepared, lane, with_features=with_features)
        except ModelBroken:
            raise  # not this image's fault: the task hands its work back to the queue
        except (MemoryError, torch.cuda.OutOfMemoryError) as error:
            # A batch of one that still does not fit, or a host allocation that failed.
            message = f"{type(error).__name__}: {error}"
            failure = ScoringError(ErrorCode.OUT_OF_MEMORY, message)
            return _Failure(self.error_result(uri, failure, sha256, started))
        except Exception as error:  # noqa: BLE001 - every failure is a per-image result
            sha256 = sha256 or getattr(error, "sha256", None)
            return _Failure(self.error_result(uri, error, sha256, started))
        return _Done(score, features, sha256, _ms_since(started))

    def error_result(
        self, uri: object, error: BaseException, sha256: str | None, started: float
    ) -> Result:
        """The error result for ``error``, counted and (if unexpected) logged. The answer for an
        image whose stuck fetch was given up on (always an error: its fetch fails at once) counts
        from when its lane thread began it, not from ``started``, the answer's own start."""
        started = deadlines.work_started(started)
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
        return list(self.imap(function, items, lane))

    def imap(
        self, function: Callable[[object], T], items: Sequence[object], lane: Lane = Lane.INTERACTIVE
    ) -> Iterator[T]:
        """:meth:`map`, each result yielded as soon as it and those before it are done; the first
        exception is raised in its place (the items not yet started are then cancelled)."""
        return self._pools[lane].imap(function, items)


def compile_sizes(max_batch_size: int) -> list[int]:
    """The fixed batch sizes a compiled tower serves: max, max/2, max/4, max/8 (at least 1)."""
    return sorted({max(1, max_batch_size >> shift) for shift in range(4)})


@dataclass(frozen=True)
class _Done:
    score: float
    features: torch.Tensor | None
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
