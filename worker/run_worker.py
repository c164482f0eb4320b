"""``realscore worker``: load the model, then run Celery's worker on it; or one process per GPU.

The model is loaded here, before Celery's main loop, so a worker that cannot load it exits
non-zero with the reason and never takes a task (a bootstep or ``worker_process_init`` failure
would only be logged, and the latter never fires for the thread pool).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from shared.celery_app import app
from shared.cli import EXIT_FAILURE, UsageError
from shared.settings import Settings, get_settings
from shared.task_names import BULK_QUEUE, INTERACTIVE_QUEUE

log = logging.getLogger("realscore.worker")


def celery_argv(settings: Settings, extra: list[str]) -> list[str]:
    """The ``celery worker`` arguments ``realscore worker`` runs with; ``extra`` comes last, so it
    overrides (e.g. ``--concurrency``)."""
    return [
        "worker",
        "--pool", "threads",
        "--concurrency", str(settings.task_concurrency),
        "--queues", f"{INTERACTIVE_QUEUE},{BULK_QUEUE}",
        "--task-events",
        "--loglevel", "INFO",
        *extra,
    ]


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.gpus:
        return supervise(_gpu_ids(args.gpus), args.extra, settings)
    return serve(settings, args.extra)


def serve(settings: Settings, extra: list[str]) -> int:
    from worker import metrics, runtime
    from worker.attempts import AttemptCounter
    from worker.loader import ModelLoadError, load_model
    from worker.service import ScoringService

    from worker.memory import limit_malloc_arenas

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/realscore] %(message)s")
    limit_malloc_arenas()
    try:
        loaded = load_model(
            settings.model, settings.head_weights, device=settings.device, dtype=settings.dtype
        )
    except ModelLoadError as error:
        print(f"realscore worker: cannot load the model: {error}", file=sys.stderr)
        return EXIT_FAILURE
    log.info("model %s on %s (%s)", loaded.model_id, loaded.device, loaded.dtype)
    service = ScoringService(loaded, settings, local_roots=settings.local_roots).start()
    attempts = AttemptCounter.from_url(
        settings.broker_url, settings.max_attempts, settings.visibility_timeout * (settings.max_attempts + 1)
    )
    runtime.install(runtime.WorkerRuntime(service, attempts))
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    import worker.tasks  # noqa: F401 - registers the tasks

    try:
        app.worker_main(celery_argv(settings, extra))
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        service.stop()  # Celery's warm shutdown waited for running tasks; drain what is left
        runtime.install(None)
    return 0


def _gpu_ids(spec: str) -> list[int]:
    if spec == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError("--gpus all: no CUDA GPU is visible")
        return list(range(count))
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus takes 'all' or a list like 0,1; got {spec!r}") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UsageError(f"--gpus takes distinct GPU indices; got {spec!r}")
    return ids


def supervise(gpu_ids: list[int], extra: list[str], settings: Settings) -> int:
    """One worker process per GPU, each pinned to its device; they start and stop together."""
    children: list[subprocess.Popen] = []
    for gpu in gpu_ids:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), REALSCORE_DEVICE="cuda:0")
        if settings.metrics_port:
            env["REALSCORE_METRICS_PORT"] = str(settings.metrics_port + gpu)
        # Our node name goes last so it wins over a user's -n: each child needs its own.
        command = [sys.executable, "-m", "shared.cli", "worker", *extra, "-n", f"gpu{gpu}@%h"]
        children.append(subprocess.Popen(command, env=env))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    # The first child to exit ends them all: a half-up multi-GPU worker is worse than a restart.
    exit_code = _wait_first(children)
    forward(signal.SIGTERM, None)
    for child in children:
        child.wait()
    return exit_code


def _wait_first(children: list[subprocess.Popen]) -> int:
    while True:
        pid, status = os.wait()
        for child in children:
            if child.pid == pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                return child.returncode if child.returncode > 0 else (0 if child.returncode == 0 else EXIT_FAILURE)
