"""The Celery tasks. Importing this module registers them on ``shared.celery_app.app``.

Tasks never raise for bad input: a malformed payload gives ``bad_request`` results and a bad image
its own error result. Each task counts its deliveries (see ``worker.serving.attempts``) and gives up with
``internal`` results once a message has been delivered more than ``MAX_ATTEMPTS`` times. A worker
whose model has stopped working hands new tasks back to the queue instead of failing them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Reject

from shared.celery_app import app
from shared.errors import ErrorCode
from shared.results import Result
from shared.task_names import BULK_QUEUE, EMBED, MAX_URIS_PER_TASK, SCORE, SCORE_MANY
from worker.serving import metrics, runtime
from worker.serving.batcher import Lane
from worker.serving.bulk_gate import bulk_slot
from worker.serving.service import ScoringService, embed_row

Row = TypeVar("Row")


def _lane(task: Task) -> Lane:
    delivery = task.request.delivery_info or {}
    return Lane.BULK if delivery.get("routing_key") == BULK_QUEUE else Lane.INTERACTIVE


def _service() -> ScoringService:
    service = runtime.current().service
    if not service.healthy:
        raise Reject("this worker's model is failing; another worker takes the task", requeue=True)
    return service


def _errors(uris: list[Any], code: ErrorCode, reason: str) -> list[Result]:
    factory = runtime.current().service.results
    metrics.ERRORS.labels(code.value).inc(len(uris))
    return [factory.error(uri, code, reason) for uri in uris]


def _counted(task: Task, uris: list[Any], work: Callable[[], list[Row]], as_row: Callable[[Result], Row]) -> list[Row]:
    """Run ``work`` unless this message already had its ``MAX_ATTEMPTS`` deliveries."""
    counter = runtime.current().attempts
    task_id = task.request.id
    if counter is None or not task_id:
        return work()
    attempt = counter.record(task_id)
    if counter.exhausted(attempt):
        counter.done(task_id)
        reason = (
            f"given up after {attempt - 1} deliveries that never finished "
            "(did this message crash its worker?)"
        )
        return [as_row(result) for result in _errors(uris, ErrorCode.INTERNAL, reason)]
    outcome = work()
    counter.done(task_id)
    return outcome


def _many(
    task: Task,
    uris: Any,
    extra: tuple,
    kwargs: dict,
    one: Callable[[ScoringService, str, Lane], Row],
    as_row: Callable[[Result], Row],
) -> list[Row]:
    """The shared body of ``score_many`` and ``embed``: validate, count, map ``one`` in order."""
    problem = None
    if extra or kwargs:
        problem = "expected exactly one argument: a list of URIs"
    elif not isinstance(uris, list):
        problem = f"expected a list of URIs, got {type(uris).__name__}"
    elif len(uris) > MAX_URIS_PER_TASK:
        problem = f"{len(uris)} URIs in one task, at most {MAX_URIS_PER_TASK}"
    if problem:
        listed = uris if isinstance(uris, list) else [uris]
        return [as_row(result) for result in _errors(listed, ErrorCode.BAD_REQUEST, problem)]
    service = _service()
    lane = _lane(task)

    def each(uri: Any) -> Row:
        if not isinstance(uri, str):  # a wrong type in the payload, not a malformed URI
            reason = f"expected a URI string, got {type(uri).__name__}"
            return as_row(_errors([uri], ErrorCode.BAD_REQUEST, reason)[0])
        return one(service, uri, lane)

    with bulk_slot(lane is Lane.BULK):  # waiting for a slot counts no delivery attempt
        return _counted(task, uris, lambda: service.map(each, uris, lane), as_row)


def _as_result(result: Result) -> Result:
    return result


@app.task(name=SCORE, bind=True)
def score(self: Task, uri: Any = None, *extra: Any, **kwargs: Any) -> Result:
    """One image -> one result dict."""
    if extra or kwargs or not isinstance(uri, str):
        return _errors([uri], ErrorCode.BAD_REQUEST, "expected exactly one argument: a URI string")[0]
    service = _service()
    lane = _lane(self)
    return _counted(self, [uri], lambda: [service.score_uri(uri, lane)], _as_result)[0]


@app.task(name=SCORE_MANY, bind=True)
def score_many(self: Task, uris: Any = None, *extra: Any, **kwargs: Any) -> list[Result]:
    """Up to 256 images -> their results, same order, batched together."""
    return _many(self, uris, extra, kwargs, lambda s, uri, lane: s.score_uri(uri, lane), _as_result)


@app.task(name=EMBED, bind=True)
def embed(self: Task, uris: Any = None, *extra: Any, **kwargs: Any) -> list[dict]:
    """Pooled tower features for training: base64 little-endian float16, one row per URI."""
    return _many(self, uris, extra, kwargs, lambda s, uri, lane: s.embed_uri(uri, lane), embed_row)
