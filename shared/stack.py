"""The command lines the deployed stack runs, in one place.

``docker-compose.yml``, the README and the tests use these same commands (``tests/test_compose.py``
checks that compose's text matches them), so what the tests start is what gets deployed.
"""

from __future__ import annotations

CELERY_APP = "shared.celery_app:app"
FLOWER_PORT = 5555
# Flower reads every option from FLOWER_<NAME>; basic auth as "user:password" (comma-separated
# for several users). Its API can shut workers down, so it never runs without it outside tests.
FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"
# The node name a containerised worker takes: Celery expands %h to the host name, which is the
# container's $HOSTNAME, so the healthcheck can ping exactly this worker.
WORKER_NODE = "celery@%h"


def worker_command(*extra: str) -> list[str]:
    """``realscore worker`` (it picks the pool, concurrency, queues and events itself)."""
    return ["realscore", "worker", *extra]


def flower_command(port: int = FLOWER_PORT, address: str = "0.0.0.0") -> list[str]:
    """Flower on the configured app: broker and backend come from ``REALSCORE_*``."""
    return ["celery", "-A", CELERY_APP, "flower", f"--port={port}", f"--address={address}"]


def worker_ping_command(node: str, timeout: float = 10.0) -> list[str]:
    """Exits 0 only if ``node`` itself answers a ping (not just any worker on the broker)."""
    return ["celery", "-A", CELERY_APP, "inspect", "ping", "-d", node, "--timeout", f"{timeout:g}"]
