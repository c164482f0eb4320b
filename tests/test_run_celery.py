"""``realscore worker`` exits with Celery's exit code: a worker that ends on Celery's
"Unrecoverable error" (a Redis that refuses kombu's bookkeeping, say) must not report success,
or its supervisor will not restart it."""

from __future__ import annotations

import pytest

from shared.celery_app import app
from worker.serving import run_worker


class EndsBadly:
    """Stands in for Celery's worker: it stops as after an unrecoverable error."""

    def __init__(self, **_: object) -> None:
        self.exitcode: int | None = None

    def start(self) -> None:
        self.exitcode = 1  # what WorkController.start sets on "Unrecoverable error"


class EndsWell(EndsBadly):
    def start(self) -> None:
        self.exitcode = 0


@pytest.mark.parametrize(("worker", "code"), [(EndsBadly, 1), (EndsWell, 0)])
def test_celerys_exit_code_is_the_commands(worker: type, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app.__dict__, "Worker", worker)
    assert run_worker.run_celery(["worker", "--pool", "solo", "--loglevel", "INFO"]) == code
