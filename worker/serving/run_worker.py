"""``realscore worker``: load the model, then run Celery's worker on it; or supervise several
worker processes (``--gpus``: one group per GPU; ``--procs-per-gpu N``: N processes per GPU, each
with its own model and batcher, which lifts the cap one process's GIL and Celery thread pool put on
single-image tasks).

The model is loaded here, before Celery's main loop even connects, so a worker that cannot load
it exits non-zero with the reason and never takes a task (an exception in a signal handler such
as ``worker_process_init`` would only be logged, and that signal never fires for the thread pool).
Celery's arguments and the model's files are checked before that, without torch, so a mistake
there is answered at once rather than after a minutes-long model load. ``shared.celery_app``,
which reads the settings, is imported only where the app is used, so ``--help`` prints even while
a setting is bad.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from shared.model_files import ModelFilesError, check_tower, head_weights_path
from shared.usage import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
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


def _celery_worker_context(argv: list[str]):
    """A click context of Celery's ``worker`` command on our app, with ``argv`` (without the
    ``worker`` word) parsed as Celery would parse it, running nothing; click's usage error for
    arguments Celery would refuse."""
    import click
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_command
    from celery.bin.worker import worker as worker_command

    from shared.celery_app import app  # some options' types read the app's configuration

    parent = click.Context(
        celery_command, info_name="realscore", obj=CLIContext(app=app, no_color=True, workdir=None)
    )
    # A copy: click consumes the list it parses, and callers go on to pass theirs to celery.
    return worker_command.make_context("worker", list(argv), parent=parent)


def celery_help() -> str:
    """Celery's own ``worker`` options, as ``realscore worker --help`` shows them. Formatting them
    needs no app, so no setting is read: help must print even while a setting is bad."""
    import click
    from celery.bin.celery import celery as celery_command
    from celery.bin.worker import worker as worker_command

    parent = click.Context(celery_command, info_name="realscore")
    return worker_command.get_help(click.Context(worker_command, info_name="worker", parent=parent))


def check_celery_argv(argv: list[str]) -> None:
    """Raise click's usage error for arguments ``celery worker`` would refuse."""
    _celery_worker_context(argv[1:])  # argv[0] is the "worker" sub-command itself


def check_delivery_settings(settings: Settings) -> None:
    """Refuse settings under which Redis would hand a task to a second worker while the first is
    still (legitimately) running it: the visibility timeout must cover a fetch and a forward pass
    with room to spare. (How much work a worker holds is on top: see the README.)"""
    one_image = settings.fetch_timeout + settings.forward_timeout
    if settings.visibility_timeout < 2 * one_image:
        raise UsageError(
            f"REALSCORE_VISIBILITY_TIMEOUT ({settings.visibility_timeout} s) must be at least twice "
            f"REALSCORE_FETCH_TIMEOUT + REALSCORE_FORWARD_TIMEOUT ({one_image:g} s): otherwise Redis "
            "hands tasks to another worker while this one is still scoring them"
        )


def run(args: argparse.Namespace) -> int:
    import click

    if getattr(args, "help", False):  # before any check: help is for fixing what they refuse
        print(args.own_help())
        print("Celery's worker options (passed through):\n")
        print(celery_help())
        return EXIT_OK
    settings = get_settings()
    check_delivery_settings(settings)
    try:
        check_celery_argv(celery_argv(settings, args.extra))
    except click.ClickException as error:
        error.show()
        return EXIT_USAGE
    gpu_ids = _gpu_ids(args.gpus) if args.gpus else None
    procs = getattr(args, "procs_per_gpu", 1) or 1
    if procs < 1:
        raise UsageError(f"--procs-per-gpu takes a number of at least 1; got {procs}")
    try:
        head_weights_path(settings)
        check_tower(settings.model)
    except ModelFilesError as error:  # a configuration error, as in `realscore score`
        print(f"realscore worker: cannot load the model: {error}", file=sys.stderr)
        return EXIT_USAGE
    if gpu_ids is not None:
        return supervise(plan_children(gpu_ids, procs, args.extra, settings), args.extra)
    if procs > 1:
        return supervise(plan_children([None], procs, args.extra, settings), args.extra)
    return serve(settings, args.extra)


def serve(settings: Settings, extra: list[str]) -> int:
    from celery import signals

    from shared.celery_app import app, configure_worker
    from worker.serving import bulk_gate, metrics, redis_transport, runtime
    from worker.serving.attempts import AttemptCounter
    from worker.model.loader import ModelLoadError, load_model
    from worker.model.modes import DecodeModeError
    from worker.serving.memory import limit_malloc_arenas, start_malloc_trimmer
    from worker.serving.service import ScoringService

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/realscore] %(message)s")
    from shared.redact import install_log_redaction

    install_log_redaction()
    configure_worker(app)
    redis_transport.install()  # a message popped from a full Redis goes back to its queue
    limit_malloc_arenas()
    start_malloc_trimmer(settings.malloc_trim_interval)
    try:
        loaded = load_model(
            settings.model, head_weights_path(settings), device=settings.device, dtype=settings.dtype
        )
    except (ModelLoadError, ModelFilesError) as error:
        print(f"realscore worker: cannot load the model: {error}", file=sys.stderr)
        return EXIT_USAGE
    log.info("model %s on %s (%s)", loaded.model_id, loaded.device, loaded.dtype)

    broken = threading.Event()

    def stop_consuming(error: BaseException) -> None:
        # The model is broken (a sticky CUDA error, a hung forward): taking more work would only
        # turn it into errors. Warm-shut down: the tasks in hand fail fast with ModelBroken and
        # go back to the queue (see worker.serving.delivery); then exit non-zero.
        broken.set()
        log.critical("the model is broken (%r): stopping this worker", error)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        service = ScoringService(
            loaded, settings, local_roots=settings.local_roots, on_broken=stop_consuming
        ).start()
    except (DecodeModeError, ModelLoadError) as error:  # e.g. cuda-graphs on a CPU
        print(f"realscore worker: {error}", file=sys.stderr)
        return EXIT_USAGE
    log.info("results are stamped %s", service.results.model)
    # Deliveries are counted in the broker's Redis, or the result backend's with RabbitMQ.
    bookkeeping = settings.broker_url if settings.broker_url.startswith("redis") else settings.result_backend
    attempts = AttemptCounter.from_url(
        bookkeeping, settings.max_attempts, settings.visibility_timeout * (settings.max_attempts + 1)
    )
    runtime.install(runtime.WorkerRuntime(service, attempts))
    bulk_gate.install(bulk_gate.BulkGate(settings.bulk_task_slots))
    app.steps["consumer"].add(bulk_gate.GateStep)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    import worker.serving.tasks  # noqa: F401 - registers the tasks

    def drain(**_: object) -> None:
        # Shutting down: tasks hand back the images they have not started, and the batches
        # waiting to fill run now; what is already in the model finishes.
        current.draining.set()
        service.batcher.flush()

    current = runtime.current()
    signals.worker_shutting_down.connect(drain, weak=False)
    # Celery replaces the root logger's handlers: redact on the ones it installs (and the task
    # logger's), so no password, key or signed URL reaches the log (shared/redact.py).
    signals.after_setup_logger.connect(_redact_logs, weak=False)
    signals.after_setup_task_logger.connect(_redact_logs, weak=False)
    try:
        code = run_celery(celery_argv(settings, extra))
    finally:
        signals.worker_shutting_down.disconnect(drain)
        ended = service.stop()  # Celery's warm shutdown waited for running tasks; drain the rest
        runtime.install(None)
        bulk_gate.install(None)
    if not ended:  # a hung forward holds the batcher thread: do not wait for it at exit
        log.critical("the batcher thread is still inside a forward pass: exiting without it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILURE)
    return EXIT_FAILURE if broken.is_set() else code


def _redact_logs(logger: logging.Logger, **_: object) -> None:
    from shared.redact import install_log_redaction

    install_log_redaction(logger)


def run_celery(argv: list[str]) -> int:
    """Celery's command line on our app; its exit code. Neither ``worker_main`` nor ``app.start``
    gives it back (click returns the worker's ``ctx.exit(code)`` in non-standalone mode, and
    ``app.start`` drops it): a worker that ended on Celery's "Unrecoverable error" would exit 0,
    and a supervisor would not restart it."""
    import click
    from celery.bin.celery import celery as celery_command

    from shared.celery_app import app

    celery_command.params[0].default = app  # what app.start does
    try:
        return int(celery_command.main(args=argv, standalone_mode=False) or 0)
    except click.exceptions.Exit as exit:
        return int(exit.exit_code or 0)
    except click.ClickException as error:  # a bad celery argument: a usage error, not a traceback
        error.show()
        return EXIT_USAGE
    finally:
        celery_command.params[0].default = None


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


@dataclass(frozen=True)
class Child:
    """One worker process of a supervised group: its node name, GPU (or none) and metrics port."""

    node: str
    gpu: int | None
    metrics_port: int | None


def user_node_name(extra: list[str]) -> str | None:
    """The ``-n``/``--hostname`` the caller gave celery, as Celery's own parser reads it (in any
    spelling; the last one wins; ``%h`` expanded; a bare ``NAME`` is node ``celery@NAME``), or
    ``None`` without one. ``extra`` must be arguments Celery accepts (see
    :func:`check_celery_argv`)."""
    from click.core import ParameterSource

    context = _celery_worker_context(extra)
    if context.get_parameter_source("hostname") is not ParameterSource.COMMANDLINE:
        return None  # Celery's default (celery@this host), not the caller's
    return context.params["hostname"]


def plan_children(
    gpus: list[int | None], procs_per_gpu: int, extra: list[str], settings: Settings
) -> list[Child]:
    """``procs_per_gpu`` processes for each GPU (``None``: the configured device), each with its
    own node name (the caller's ``-n NAME@HOST`` becomes ``NAME-gpu0-1@HOST``; without one,
    ``gpu0@%h`` as before, ``gpu0-1@%h`` or ``proc1@%h``) and, with metrics on, its own port."""
    given = user_node_name(extra)
    name, host = given.split("@", 1) if given else (None, "%h")  # Celery's names have an @
    children = []
    for gpu in gpus:
        for proc in range(procs_per_gpu):
            parts = [] if gpu is None else [f"gpu{gpu}"]
            if procs_per_gpu > 1:
                parts.append(str(proc) if parts or name else f"proc{proc}")
            suffix = "-".join(parts)
            node = "-".join(part for part in (name, suffix) if part) + f"@{host}"
            slot = (gpu or 0) * procs_per_gpu + proc
            port = settings.metrics_port + slot if settings.metrics_port else None
            if port is not None and port > 65535:
                raise UsageError(
                    f"REALSCORE_METRICS_PORT={settings.metrics_port} leaves no port for {node} "
                    f"(it would need {port})"
                )
            children.append(Child(node, gpu, port))
    return children


def supervise(plan: list[Child], extra: list[str]) -> int:
    """The planned worker processes, pinned to their GPUs; they start and stop together.

    Children get their own session, so a terminal's Ctrl-C reaches them once, through us: a
    second SIGINT would make Celery's shutdown cold. The first child to exit stops the others (a
    half-up worker group is worse than a restart); an unexpected exit is reported on stderr.
    """
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/realscore] %(message)s")
    children: list[tuple[Child, subprocess.Popen]] = []
    stopping: list[int] = []  # the signal already forwarded, if any

    def forward(signum: int, _frame: object) -> None:
        if stopping and signum == stopping[0]:
            return  # each child gets one warm-shutdown signal; a repeat would make it cold
        stopping[:] = [signum]
        for _, process in children:
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    for child in plan:
        env = dict(os.environ)
        if child.gpu is not None:
            env.update(CUDA_VISIBLE_DEVICES=str(child.gpu), REALSCORE_DEVICE="cuda:0")
        if child.metrics_port:
            env["REALSCORE_METRICS_PORT"] = str(child.metrics_port)
        # Our node name goes last so it wins over a user's -n: each child needs its own.
        command = [sys.executable, "-m", "shared.cli", "worker", *extra, "-n", child.node]
        children.append((child, subprocess.Popen(command, env=env, start_new_session=True)))
        if stopping:  # a signal came while we were starting them: do not start more
            forward(stopping[0], None)
            break
    log.info("supervising %d worker processes: %s", len(children), ", ".join(c.node for c in plan))
    pid, status = os.wait()
    for child, process in children:
        if process.pid == pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            if not stopping:
                print(
                    f"realscore worker: {child.node} (pid {pid}) exited with "
                    f"{_describe(process.returncode)}; stopping the other worker processes",
                    file=sys.stderr,
                    flush=True,
                )
    forward(signal.SIGTERM, None)
    codes = [process.wait() for _, process in children]
    if all(code == 0 for code in codes):
        return 0
    return max(max(codes), EXIT_FAILURE)  # killed by a signal (negative) is a failure too


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
