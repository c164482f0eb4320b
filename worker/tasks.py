"""The Celery tasks. Importing this module registers them on ``shared.celery_app.app``.

Tasks never raise for bad input: a malformed payload gives ``bad_request`` results and a bad image
its own error result. Each task counts its deliveries (see ``worker.attempts``) and gives up with
``internal`` results once a message has been delivered more than ``MAX_ATTEMPTS`` times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task

from shared.celery_app import app
from shared.errors import ErrorCode
from shared.results import Result
from shared.task_names import BULK_QUEUE, EMBED, MAX_URIS_PER_TASK, SCORE, SCORE_MANY
from worker import metrics, runtime
from worker.batcher import Lane


def _lane(task: Task) -> Lane:
    delivery = task.request.delivery_info or {}
    return Lane.BULK if delivery.get("routing_key") == BULK_QUEUE else Lane.INTERACTIVE


def _uri_list(uris: Any, extra: tuple, kwargs: dict) -> str | None:
    """Why ``uris`` is not a valid ``score_many``/``embed`` payload, or ``None`` if it is."""
    if extra or kwargs:
        return "expected exactly one argument: a list of URIs"
    if not isinstance(uris, list):
        return f"expected a list of URIs, got {type(uris).__name__}"
    if len(uris) > MAX_URIS_PER_TASK:
        return f"{len(uris)} URIs in one task, at most {MAX_URIS_PER_TASK}"
    return None


def _bad_request(uris: list[Any], reason: str) -> list[Result]:
    factory = runtime.current().service.results
    metrics.ERRORS.labels(ErrorCode.BAD_REQUEST.value).inc(len(uris))
    return [factory.error(uri, ErrorCode.BAD_REQUEST, reason) for uri in uris]


def _counted(task: Task, uris: list[Any], work: Callable[[], Any]) -> Any:
    """Run ``work`` unless this message already had its ``MAX_ATTEMPTS`` deliveries."""
    counter = runtime.current().attempts
    task_id = task.request.id
    if counter is None or not task_id:
        return work()
    attempt = counter.record(task_id)
    if counter.exhausted(attempt):
        factory = runtime.current().service.results
        reason = (
            f"given up after {attempt - 1} deliveries that never finished "
            "(did this message crash its worker?)"
        )
        given_up = [factory.error(uri, ErrorCode.INTERNAL, reason) for uri in uris]
        counter.done(task_id)
        return given_up
    outcome = work()
    counter.done(task_id)
    return outcome


@app.task(name=SCORE, bind=True)
def score(self: Task, uri: Any = None, *extra: Any, **kwargs: Any) -> Result:
    """One image -> one result dict."""
    if extra or kwargs or not isinstance(uri, str):
        return _bad_request([uri], "expected exactly one argument: a URI string")[0]
    service = runtime.current().service
    lane = _lane(self)
    return _counted(self, [uri], lambda: [service.score_uri(uri, lane)])[0]


@app.task(name=SCORE_MANY, bind=True)
def score_many(self: Task, uris: Any = None, *extra: Any, **kwargs: Any) -> list[Result]:
    """Up to 256 images -> their results, same order, batched together."""
    problem = _uri_list(uris, extra, kwargs)
    if problem:
        return _bad_request(uris if isinstance(uris, list) else [uris], problem)
    service = runtime.current().service
    lane = _lane(self)

    def one(uri: Any) -> Result:
        if not isinstance(uri, str):  # a wrong type in the payload, not a malformed URI
            return _bad_request([uri], f"expected a URI string, got {type(uri).__name__}")[0]
        return service.score_uri(uri, lane)

    return _counted(self, uris, lambda: service.map(one, uris))


@app.task(name=EMBED, bind=True)
def embed(self: Task, uris: Any = None, *extra: Any, **kwargs: Any) -> list[dict]:
    """Pooled tower features for training: base64 little-endian float16, one row per URI."""
    problem = _uri_list(uris, extra, kwargs)
    if problem:
        return _bad_request(uris if isinstance(uris, list) else [uris], problem)  # type: ignore[return-value]
    service = runtime.current().service
    lane = _lane(self)
    return _counted(self, uris, lambda: service.map(lambda uri: service.embed_uri(uri, lane), uris))
