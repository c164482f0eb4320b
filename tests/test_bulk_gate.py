"""The bulk gate's count on its own: a chunk is counted in once when received and out once when
its message is done with, however many ways that is reported."""

from __future__ import annotations

from types import SimpleNamespace

from shared.task_names import BULK_QUEUE, INTERACTIVE_QUEUE
from worker.serving.bulk_gate import BulkGate


def _request(queue: str) -> SimpleNamespace:
    return SimpleNamespace(delivery_info={"routing_key": queue})


def test_each_bulk_message_is_counted_in_and_out_once() -> None:
    gate = BulkGate(2)
    first, second, interactive = _request(BULK_QUEUE), _request(BULK_QUEUE), _request(INTERACTIVE_QUEUE)
    for request in (first, first, second, interactive):
        gate.received(request)
    assert gate.in_hand == 2  # the interactive message is not counted, a repeat neither
    gate.finished(first)
    gate.finished(first)  # rejected after a failed acknowledge, say: still one message
    gate.finished(interactive)
    assert gate.in_hand == 1
    gate.finished(second)
    assert gate.in_hand == 0
