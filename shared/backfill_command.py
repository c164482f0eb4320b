"""``realscore backfill SOURCE --out FILE``: score every image under an S3 prefix or a folder.

Wires the parts together (listing, state, output, scorer, progress) and owns the command's
checks, messages and exit codes: 0 done (error rows included), 1 runtime failure (broker or
listing unreachable), 2 usage, 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from shared.backfill import Backfill, Interrupt, Plan, SourceUnavailable, dry_run
from shared.backfill_output import OutputFile
from shared.backfill_progress import Progress
from shared.backfill_scorers import ChunkScorer, InProcessScorer, QueueScorer, ScorerBroken
from shared.backfill_state import BackfillState, StateMismatch, state_path
from shared.cli import EXIT_FAILURE, EXIT_OK, UsageError
from shared.usage import model_stopped
from shared.listing import ListingError, iter_source, parse_source
from shared.settings import Settings, get_settings
from shared.task_names import MAX_URIS_PER_TASK

EXIT_INTERRUPTED = 130


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.chunk_size <= MAX_URIS_PER_TASK:
        raise UsageError(f"--chunk-size must be 1..{MAX_URIS_PER_TASK}")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise UsageError("--max-in-flight must be at least 1")
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")


def default_max_in_flight(settings: Settings) -> int:
    """Two chunks per bulk slot of every worker that answers: one being scored, one waiting in
    Redis to take its place, so no worker idles between chunks and Redis holds no backlog."""
    from shared.celery_app import app

    workers = len(app.control.ping(timeout=1.0) or [])
    return 2 * settings.bulk_task_slots * max(workers, 1)


def _chunk_timeout(args: argparse.Namespace, settings: Settings, progress: Progress) -> float:
    timeout = args.chunk_timeout if args.chunk_timeout is not None else 2.0 * settings.visibility_timeout
    if timeout <= settings.visibility_timeout:
        raise UsageError(
            f"--chunk-timeout {timeout:g} s must be longer than the workers' visibility timeout "
            f"({settings.visibility_timeout} s, REALSCORE_VISIBILITY_TIMEOUT): a chunk a killed "
            "worker held comes back only after it"
        )
    progress.line(
        f"chunk timeout {timeout:g} s > visibility timeout {settings.visibility_timeout} s: a chunk "
        "lost with a killed worker is redelivered by Redis before this command sends it again"
    )
    return timeout


def _open_state(args: argparse.Namespace, source_text: str) -> BackfillState:
    path = state_path(args.out)
    if not os.path.exists(path) and os.path.exists(args.out) and os.path.getsize(args.out) > 0:
        raise UsageError(
            f"{args.out} exists but its state file {path} does not: choose a new --out "
            "(without the state, a resume could not tell which rows are there)"
        )
    state = BackfillState(path, create=not args.dry_run)
    try:
        state.bind(source=source_text, format=args.format)
    except StateMismatch as error:
        state.close()
        raise UsageError(f"{error}: use another --out") from None
    written = os.path.getsize(args.out) if os.path.exists(args.out) else 0
    if written < state.committed_bytes:
        state.close()
        raise UsageError(
            f"{args.out} is shorter ({written} bytes) than its state says ({state.committed_bytes}): "
            "rows the state counts as done are missing; choose a new --out"
        )
    return state


def _scorer(args: argparse.Namespace) -> ChunkScorer:
    if not args.in_process:
        return QueueScorer()
    try:
        return InProcessScorer(args.max_in_flight)
    except ImportError as error:
        raise UsageError(
            f"--in-process needs the worker extra: pip install 'realscore[worker]' ({error.name} is missing)"
        ) from None


def run(args: argparse.Namespace) -> int:
    _check(args)
    settings = get_settings()
    try:
        source = parse_source(args.source)
    except ListingError as error:
        raise UsageError(str(error)) from None
    identity = f"s3://{source.bucket}/{source.prefix}" if source.is_s3 else source.path
    listing = iter_source(source, args.glob, settings.s3_endpoint_url)
    progress = Progress()
    state = _open_state(args, f"{identity} glob={args.glob}")
    try:
        if args.dry_run:
            dry_run(listing, state, progress)
            progress.line(
                f"dry run: {progress.listed} listed, {progress.skipped} already done, "
                f"{progress.listed - progress.skipped} to score"
            )
            return EXIT_OK
        return _score(args, settings, listing, state, progress)
    except ListingError as error:
        progress.close()
        print(f"realscore backfill: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        state.close()


def _score(args: argparse.Namespace, settings: Settings, listing, state: BackfillState, progress: Progress) -> int:
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    from shared.client import BrokerUnavailable

    resume = shlex.join(["realscore", *sys.argv[1:]]) if sys.argv[1:2] == ["backfill"] else "the same command"
    try:
        if args.in_process:
            args.max_in_flight = args.max_in_flight or 2
            timeout = float("inf")  # a chunk scored here always comes back
        else:
            timeout = _chunk_timeout(args, settings, progress)
            args.max_in_flight = args.max_in_flight or default_max_in_flight(settings)
        scorer = _scorer(args)
    except (OperationalError, RedisError) as error:
        print(f"realscore backfill: cannot reach the broker: {error}", file=sys.stderr)
        return EXIT_FAILURE
    output = OutputFile(args.out, args.format, state.committed_bytes)
    progress.restart_clock()  # images/s from the first chunk sent, not from the model's load
    plan = Plan(args.chunk_size, args.max_in_flight, timeout, args.retries, args.drain_timeout)
    backfill = Backfill(listing, scorer, state, output, plan, progress)
    progress.line(
        f"backfill {args.source} -> {args.out}: chunks of {plan.chunk_size}, "
        f"{plan.max_in_flight} in flight, {state.done_count()} rows already written"
    )
    finished = False
    try:
        with Interrupt() as interrupt:
            backfill.run(interrupt)
        finished = not backfill.interrupted
    except SourceUnavailable as error:
        progress.close()
        print(f"realscore backfill: the workers cannot read the source: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except ScorerBroken as error:  # --in-process only: workers hand such chunks back themselves
        progress.close()
        print(model_stopped("backfill", error), file=sys.stderr)
        return EXIT_FAILURE
    # BrokerUnavailable: what shared.client makes of an unreachable Redis, Celery's given-up
    # result consumer included, when a chunk is sent, polled or abandoned (QueueScorer). Any
    # other RedisError is Redis answering with an error (out of memory, read-only replica).
    except (BrokerUnavailable, RedisError) as error:
        progress.close()
        print(f"realscore backfill: lost the broker or result backend: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        output.close()
        scorer.close()
        progress.close()
        print(f"realscore backfill: {progress.summary()}", file=sys.stderr)
        if not finished:
            print(f"realscore backfill: stopped before the end; resume with: {resume}", file=sys.stderr)
    return EXIT_OK if finished else EXIT_INTERRUPTED

