"""``realscore score URI...``: the embedded mode, no broker: load the model, score, print JSON lines.

It trusts every local path its own user names (``LOCAL_ROOTS`` is the worker's policy), and each
``uri`` field echoes the input as given, while relative paths are read from the working directory.
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.local_paths import absolute_uri
from shared.model_files import head_weights_path
from shared.settings import Settings, get_settings
from shared.usage import EXIT_OK, UsageError
from worker.model.loader import ModelLoadError, load_model
from worker.model.modes import DecodeModeError
from worker.serving.memory import limit_malloc_arenas
from worker.serving.service import ScoringService


def start_service(settings: Settings, batch_size: int | None = None) -> ScoringService:
    """The configured model in this process, trusting every path: what ``score`` and
    ``evaluate`` run. A model that cannot load is a usage error (exit 2)."""
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    limit_malloc_arenas()
    try:
        loaded = load_model(
            settings.model, head_weights_path(settings), device=settings.device, dtype=settings.dtype
        )
    except ModelLoadError as error:
        raise UsageError(str(error)) from None
    try:
        return ScoringService(loaded, settings, local_roots=None, max_batch_size=batch_size).start()
    except DecodeModeError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    service = start_service(get_settings(), args.batch_size)
    try:
        results = service.score_uris([absolute_uri(uri) for uri in args.uris])
    finally:
        service.stop()
    for given, result in zip(args.uris, results):
        result["uri"] = given
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return EXIT_OK
