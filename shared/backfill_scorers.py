"""Where a backfill's chunks are scored: through Redis and the workers, or in this process.

Both hand out a :class:`ChunkHandle` per chunk that the driver polls without blocking. The
in-process scorer imports ``worker`` (torch, Pillow) only when it is built, so the queue path
works on a machine installed without the worker extra.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from shared import client
from shared.task_names import BULK_QUEUE


class ScorerBroken(Exception):
    """The in-process model stopped working (a sticky device error, a hung forward): no chunk
    can be scored any more, and none of its images is at fault, so nothing is written for it."""


class ChunkHandle(Protocol):
    def ready(self) -> bool: ...

    def get(self) -> list[dict[str, Any]]:
        """The chunk's rows, in order; raises if the chunk failed as a whole."""
        ...

    def abandon(self) -> None:
        """We stopped waiting: let whoever still works on it drop it if it can."""
        ...


class ChunkScorer(Protocol):
    def send(self, uris: list[str]) -> ChunkHandle: ...

    def close(self) -> None: ...


class _TaskHandle:
    """An unreachable Redis leaves :meth:`ready` and :meth:`abandon` as the client's
    :class:`~shared.client.BrokerUnavailable`, as it leaves sending a chunk: the command ends on
    that one error, however redis-py, kombu or Celery said it."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def ready(self) -> bool:
        with client.as_broker_unavailable():
            return bool(self._handle.ready())

    def get(self) -> list[dict[str, Any]]:
        # Not translated: the driver counts any failure here as the chunk's and sends it again,
        # and the row it writes once retries run out names the error as the backend raised it.
        try:
            return list(self._handle.get(timeout=30, propagate=True))
        finally:
            self._handle.forget()  # we have it; do not keep it in Redis until RESULT_EXPIRES

    def abandon(self) -> None:
        # A worker holding the message (or taking its redelivery) skips it instead of scoring it
        # a second time; its result would be ignored anyway.
        with client.as_broker_unavailable():
            self._handle.revoke()
            self._handle.forget()


class QueueScorer:
    """``realscore.score_many`` tasks on the bulk queue, sent through :mod:`shared.client`."""

    def send(self, uris: list[str]) -> ChunkHandle:
        (handle,) = client.submit_many(uris, queue=BULK_QUEUE)  # no expiry: a backfill waits
        return _TaskHandle(handle)

    def close(self) -> None:
        pass


class _FutureHandle:
    def __init__(self, future: Future, broken: type[BaseException]) -> None:
        self._future = future
        self._broken = broken

    def ready(self) -> bool:
        return self._future.done()

    def get(self) -> list[dict[str, Any]]:
        try:
            return list(self._future.result())
        except self._broken as error:
            raise ScorerBroken(str(error)) from error

    def abandon(self) -> None:
        self._future.cancel()


class InProcessScorer:
    """The model loaded here (``--in-process``): needs the worker extra, no Redis."""

    def __init__(self, max_in_flight: int) -> None:
        from shared.settings import get_settings
        from worker.serving.batcher import Lane, ModelBroken
        from worker.serving.embedded import start_service

        self._lane = Lane.BULK
        self._broken = ModelBroken
        self._service = start_service(get_settings())
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="realscore-backfill")

    def send(self, uris: list[str]) -> ChunkHandle:
        return _FutureHandle(self._pool.submit(self._service.score_uris, uris, self._lane), self._broken)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._service.stop()
