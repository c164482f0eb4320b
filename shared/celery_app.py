"""The configured Celery app, shared by clients and workers. No tasks are imported here.

Choices (DESIGN.md says why): JSON only; late acks with a prefetch of one message per thread; a
deliberate Redis ``visibility_timeout`` (kombu's default is an hour, counted from delivery); the
interactive queue consumed before the bulk one (``queue_order_strategy: priority``, never numeric
message priorities, which mean opposite things on Redis and RabbitMQ); events on for Flower.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from shared.settings import Settings, get_settings
from shared.task_names import BULK_QUEUE, EMBED, INTERACTIVE_QUEUE, SCORE, SCORE_MANY


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
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
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
        task_track_started=True,
        result_expires=settings.result_expires,
        result_extended=True,  # Flower and `result()` see the task name and args
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    return app


app = configure(Celery("realscore"), get_settings())
