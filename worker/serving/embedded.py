"""``realscore score URI...``: the embedded mode, no broker: load the model, score, print JSON lines.

It trusts every local path its own user names (``LOCAL_ROOTS`` is the worker's policy), and each
``uri`` field echoes the input as given, while relative paths are read from the working directory.
A local folder stands for the image files under it (recursively, sorted, as ``evaluate`` finds
them); a progress bar is drawn on stderr when it is a terminal. Each result is printed as soon as
it and those before it are done; a model that breaks mid-run (a sticky CUDA error, a hung forward)
ends the command with one line on stderr and exit code 1, the lines already printed kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from shared.local_paths import absolute_uri
from shared.model_files import head_weights_path
from shared.settings import Settings, get_settings
from shared.usage import EXIT_FAILURE, EXIT_OK, UsageError, model_stopped
from worker.model.loader import LoadedModel, ModelLoadError, load_model
from worker.lifecycle.folders import list_images
from worker.serving.batcher import ModelBroken
from worker.model.modes import DecodeModeError
from worker.serving.memory import limit_malloc_arenas, start_malloc_trimmer
from worker.serving.progress import progress
from worker.serving.service import ScoringService


def start_service(
    settings: Settings,
    batch_size: int | None = None,
    *,
    load: Callable[[], LoadedModel] | None = None,
) -> ScoringService:
    """The configured model (or what ``load`` builds: ``train``'s blank head) in this process,
    trusting every path: what ``score``, ``evaluate`` and ``train`` run. A model that cannot
    load is a usage error (exit 2)."""
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    limit_malloc_arenas()
    start_malloc_trimmer(settings.malloc_trim_interval)
    try:
        if load is not None:
            loaded = load()
        else:
            loaded = load_model(
                settings.model, head_weights_path(settings), device=settings.device, dtype=settings.dtype
            )
    except ModelLoadError as error:
        raise UsageError(str(error)) from None
    try:
        return ScoringService(loaded, settings, local_roots=None, max_batch_size=batch_size).start()
    except (DecodeModeError, ModelLoadError) as error:  # e.g. cuda-graphs on a CPU
        raise UsageError(str(error)) from None


def _inputs(given: list[str]) -> list[tuple[str, str]]:
    """``(shown, readable)`` pairs: relative paths made absolute, local folders expanded."""
    pairs = []
    for uri in given:
        readable = absolute_uri(uri)
        if uri.strip() and "://" not in uri and os.path.isdir(readable):
            for path in list_images(readable, "score"):
                pairs.append((os.path.join(uri, os.path.relpath(path, readable)), str(path)))
        else:
            pairs.append((uri, readable))
    return pairs


def run(args: argparse.Namespace) -> int:
    inputs = _inputs(args.uris)
    service = start_service(get_settings(), args.batch_size)
    written = 0
    try:
        with progress(len(inputs), "scoring") as tick:
            # Each line as soon as it is in order: what was scored before a failure stays written.
            results = service.imap(lambda uri: tick(service.score_uri(uri)), [r for _, r in inputs])
            for (shown, _), result in zip(inputs, results):
                result["uri"] = shown
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()  # into a pipe too: a crash later must not lose written lines
                written += 1
    except ModelBroken as error:
        sys.stdout.flush()
        print(model_stopped("score", error, f"{written} of {len(inputs)} results were written"), file=sys.stderr)
        return EXIT_FAILURE
    finally:
        try:
            sys.stdout.flush()
        finally:
            service.stop()  # also when the reader has gone (BrokenPipeError)
    return EXIT_OK
