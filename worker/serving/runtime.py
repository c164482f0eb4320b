"""The one scoring service of this worker process, installed before Celery consumes anything."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from worker.serving.attempts import AttemptCounter
from worker.serving.service import ScoringService


@dataclass
class WorkerRuntime:
    service: ScoringService
    attempts: AttemptCounter | None
    # Set when a warm shutdown begins: tasks hand back the images they have not started.
    draining: threading.Event = field(default_factory=threading.Event)


_current: WorkerRuntime | None = None


def install(runtime: WorkerRuntime | None) -> None:
    global _current
    _current = runtime


def current() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError(
            "no model loaded in this process: start workers with `realscore worker`, "
            "which loads the model before consuming"
        )
    return _current
