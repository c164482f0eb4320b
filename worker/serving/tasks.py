"""The Celery tasks. Importing this module registers them on ``shared.celery_app.app``.

Tasks never raise for bad input: a malformed payload gives ``bad_request`` results and a bad image
its own error result. What every delivery needs besides (requeue on a broken or stopping worker,
delivery counting, the last attempts image by image, giving up, the result write) is the base
class :class:`worker.serving.delivery.DeliveredTask`; the bodies here follow its :class:`Plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task

from shared.celery_app import app
from shared.errors import ErrorCode
from shared.results import Result
from shared.task_names import BULK_QUEUE, EMBED, MAX_URIS_PER_TASK, SCORE, SCORE_MANY
from worker.serving import deadlines, metrics, runtime
from worker.serving.batcher import Lane
from worker.serving.bulk_gate import bulk_slot
from worker.serving.delivery import DeliveredTask, Plan, check_not_draining, current_plan, note_images_start
from worker.serving.service import ScoringService, embed_row

Row = TypeVar("Row")
CRASHED = "this image was being scored when its worker died on the task's last attempts"


def _lane(task: Task) -> Lane:
    delivery = task.request.delivery_info or {}
    return Lane.BULK if delivery.get("routing_key") == BULK_QUEUE else Lane.INTERACTIVE


def _errors(uris: list[Any], code: ErrorCode, reason: str) -> list[Result]:
    factory = runtime.current().service.results
    metrics.ERRORS.labels(code.value).inc(len(uris))
    return [factory.error(uri, code, reason) for uri in uris]


def _planned(
    plan: Plan,
    uris: list[Any],
    one: Callable[[Any], Row],
    batched: Callable[[Callable[[Any], Row], list[Any]], list[Row]],
    as_row: Callable[[Result], Row],
) -> list[Row]:
    """``one`` over ``uris`` as the delivery's plan says: batched, image by image, or given up."""
    note_images_start()
    if plan.give_up is not None:
        return [as_row(result) for result in _errors(uris, ErrorCode.INTERNAL, plan.give_up)]
    if not plan.careful:
        def started(uri: Any) -> Row:
            # A stopping worker hands back what it has not started; an image whose stuck fetch
            # was given up on had started, and is answered (fetch_timeout) even while draining.
            if not deadlines.answering_for_abandoned():
                check_not_draining()
            return one(uri)

        return batched(started, uris)
    rows: list[Row] = []
    for index, uri in enumerate(uris):
        if index in plan.poisoned:
            rows.append(as_row(_errors([uri], ErrorCode.INTERNAL, CRASHED)[0]))
            continue
        check_not_draining()
        plan.mark(index)
        rows.append(one(uri))
    return rows


def _many(
    task: Task,
    uris: Any,
    extra: tuple,
    kwargs: dict,
    one: Callable[[ScoringService, str, Lane], Row],
    as_row: Callable[[Result], Row],
) -> list[Row]:
    """The shared body of ``score_many`` and ``embed``: validate, then map ``one`` in order."""
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
    service = runtime.current().service
    lane = _lane(task)

    def each(uri: Any) -> Row:
        if not isinstance(uri, str):  # a wrong type in the payload, not a malformed URI
            reason = f"expected a URI string, got {type(uri).__name__}"
            return as_row(_errors([uri], ErrorCode.BAD_REQUEST, reason)[0])
        return one(service, uri, lane)

    with bulk_slot(lane is Lane.BULK):  # at most BULK_TASK_SLOTS bulk chunks scoring at once
        return _planned(
            current_plan(), uris, each, lambda function, items: service.map(function, items, lane), as_row
        )


def _as_result(result: Result) -> Result:
    return result


@app.task(name=SCORE, bind=True, base=DeliveredTask)
def score(self: Task, uri: Any = None, *extra: Any, **kwargs: Any) -> Result:
    """One image -> one result dict."""
    if extra or kwargs or not isinstance(uri, str):
        return _errors([uri], ErrorCode.BAD_REQUEST, "expected exactly one argument: a URI string")[0]
    service = runtime.current().service
    lane = _lane(self)
    one = lambda item: service.score_uri(item, lane)  # noqa: E731
    return _planned(current_plan(), [uri], one, lambda f, items: [f(i) for i in items], _as_result)[0]


@app.task(name=SCORE_MANY, bind=True, base=DeliveredTask)
def score_many(self: Task, uris: Any = None, *extra: Any, **kwargs: Any) -> list[Result]:
    """Up to 256 images -> their results, same order, batched together."""
    return _many(self, uris, extra, kwargs, lambda s, uri, lane: s.score_uri(uri, lane), _as_result)


@app.task(name=EMBED, bind=True, base=DeliveredTask)
def embed(self: Task, uris: Any = None, *extra: Any, **kwargs: Any) -> list[dict]:
    """Pooled tower features for training: base64 little-endian float16, one row per URI."""
    return _many(self, uris, extra, kwargs, lambda s, uri, lane: s.embed_uri(uri, lane), embed_row)
