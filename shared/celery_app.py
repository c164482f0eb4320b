"""The configured Celery app, shared by clients and workers. No tasks are imported here.

Choices (docs/architecture.md says why): JSON only; late acks with a prefetch of one message per thread; a
deliberate Redis ``visibility_timeout`` (kombu's default is an hour, counted from delivery); a
redelivered task whose result is already SUCCESS is not run again (and Celery's key-value
backends never overwrite a SUCCESS); results without a second copy of the arguments; the
interactive queue consumed before the bulk one (``queue_order_strategy: priority``, never numeric
message priorities, which mean opposite things on Redis and RabbitMQ); events on for Flower.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Exchange, Queue

from shared.settings import Settings, get_settings
from shared.task_names import BULK_QUEUE, EMBED, INTERACTIVE_QUEUE, SCORE, SCORE_MANY


# Reconnecting to the result backend: about a second in all, so a client's call fails within its
# timeout when Redis is down (Celery's default is 20 retries a second apart). A worker, which has
# nobody waiting, retries storing a result far longer: see configure_worker.
CLIENT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
WORKER_RESULT_RETRIES = 40


def restore_interval(visibility_timeout: int) -> int:
    """Seconds between sweeps for unacknowledged messages to redeliver: a tenth of the
    visibility timeout, 1 to 10 s (one cheap Redis range query per worker per sweep)."""
    return max(1, min(10, visibility_timeout // 10))


def configure(app: Celery, settings: Settings) -> Celery:
    """Apply ``settings`` to ``app`` (also used by tests to point it at another Redis)."""
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
            # kombu sweeps for messages past their visibility timeout every interval x throttle
            # seconds (10 x 10 by default): a killed worker's work would wait up to 100 s more.
            "unacked_restore_interval": restore_interval(settings.visibility_timeout),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "retry_policy": CLIENT_RETRY_POLICY,
        },
        broker_connection_retry_on_startup=True,
        task_default_queue=INTERACTIVE_QUEUE,
        task_queues=tuple(
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (INTERACTIVE_QUEUE, BULK_QUEUE)
        ),
        task_default_exchange=INTERACTIVE_QUEUE,
        task_default_routing_key=INTERACTIVE_QUEUE,
        task_routes={
            SCORE: {"queue": INTERACTIVE_QUEUE},
            SCORE_MANY: {"queue": INTERACTIVE_QUEUE},
            EMBED: {"queue": BULK_QUEUE},
        },
        task_create_missing_queues=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        # No STARTED write before each task: under `noeviction` a full Redis would fail it before
        # our code runs, and Celery would acknowledge the message as failed (lost). Flower sees
        # task-started events anyway.
        task_track_started=False,
        result_expires=settings.result_expires,
        # Not extended: a 256-URI chunk's arguments would be stored a second time with its
        # result (Flower has them from the task events already).
        result_extended=False,
        # A message redelivered (visibility timeout, connection loss) after its task succeeded
        # is acknowledged without running again.
        worker_deduplicate_successful_tasks=True,
        # Threads cannot be cancelled: running tasks finish across a broker blip, and a copy
        # Redis redelivers meanwhile is made harmless by the deduplication above.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    return app


class CompactTaskSuccess(logging.Filter):
    """Celery logs every task's whole return value at INFO ("Task ... succeeded in 0.2s: [...]"):
    kilobytes of result dicts per task. Keep the line, drop the value (it is in the backend)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict) and "return_value" in record.args:
            record.msg = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
        return True


def configure_worker(app: Celery) -> Celery:
    """What only a worker process adds: storing a result outlives a Redis outage of a few minutes
    (exponential backoff, capped at 10 s), since nobody waits on the worker's side; compact task
    lines in its log."""
    app.conf.update(
        result_backend_always_retry=True,
        result_backend_max_retries=WORKER_RESULT_RETRIES,
        result_backend_max_sleep_between_retries_ms=10_000,
    )
    trace_log = logging.getLogger("celery.app.trace")
    if not any(isinstance(existing, CompactTaskSuccess) for existing in trace_log.filters):
        trace_log.addFilter(CompactTaskSuccess())
    return app


app = configure(Celery("realscore"), get_settings())
