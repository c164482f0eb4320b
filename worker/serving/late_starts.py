"""Work in hand against ``REALSCORE_VISIBILITY_TIMEOUT``, watched while the worker runs.

Redis redelivers a message ``VISIBILITY_TIMEOUT`` seconds after it handed it to this worker,
whether or not its task has started. ``realscore worker`` checks its settings at start, but how
long a task waits here (prefetched behind other tasks, for a bulk slot) depends on the load. So
each delivery's wait, from receipt to the moment its images start, is compared with the timeout:
past ``LATE_FRACTION`` of it the task is counted (``realscore_late_task_starts_total``) and a
warning saying what to tune is logged, at most once per ``WARN_INTERVAL_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.serving import metrics

log = logging.getLogger(__name__)
LATE_FRACTION = 0.5
WARN_INTERVAL_S = 60.0
# The request field (set when the worker receives the message) that carries the receipt time.
RECEIVED_FIELD = "realscore_received_monotonic"


class LateStartGuard:
    def __init__(self, interval_s: float = WARN_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_warning: float | None = None
        self._since_warning = 0

    def check(self, received: float | None, visibility_timeout: float, task_id: str | None = None) -> bool:
        """Whether the task received at ``received`` (this clock) starts late now; counts it and
        warns (rate-limited) if so."""
        if received is None or visibility_timeout <= 0:
            return False
        now = self._clock()
        waited = now - received
        if waited <= LATE_FRACTION * visibility_timeout:
            return False
        metrics.LATE_STARTS.inc()
        with self._lock:
            self._since_warning += 1
            due = self._last_warning is None or now - self._last_warning >= self.interval_s
            if due:
                self._last_warning, count, self._since_warning = now, self._since_warning, 0
        if due:
            log.warning(
                "task %s started %.0f s after this worker received it, %.0f %% of "
                "REALSCORE_VISIBILITY_TIMEOUT (%g s); %d such task(s) since the last warning. "
                "Past the timeout Redis hands the task to another worker while this one still "
                "holds it: give this worker fewer threads (--concurrency) or bulk slots "
                "(REALSCORE_BULK_TASK_SLOTS), or a longer REALSCORE_VISIBILITY_TIMEOUT",
                task_id, waited, 100 * waited / visibility_timeout, visibility_timeout, count,
            )
        return True


guard = LateStartGuard()
