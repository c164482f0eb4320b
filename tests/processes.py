"""Real processes for integration tests: a ``realscore worker`` subprocess and free ports.

Readiness is a condition we poll with bounded timeouts (a Celery ping answered by this worker's
node name), never a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from celery import Celery

# A dedicated database; REALSCORE_TEST_REDIS_DB lets parallel test sessions stay apart.
TEST_REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('REALSCORE_TEST_REDIS_DB', '15')}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)  # polling interval of a bounded wait, not synchronisation by sleep
    raise TimeoutError(f"{what}: not within {timeout} s")


class WorkerProcess:
    """``realscore worker`` in a subprocess, with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, extra_args: list[str] | None = None):
        self.node = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.args = [sys.executable, "-m", "shared.cli", "worker", "-n", self.node, *(extra_args or [])]
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, app: Celery, timeout: float = 90.0) -> None:
        def answered() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            return bool(app.control.ping(destination=[self.node], timeout=0.5))

        wait_until(answered, timeout, f"worker {self.node} ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        return self.process.returncode
