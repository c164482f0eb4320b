"""The ``realscore`` command line: one entry point, a subcommand per job.

Commands that need the model import ``worker`` lazily, so ``realscore submit`` works on a
machine installed without the ``worker`` extra. Settings, argument types and each command's files
are checked first (:mod:`shared.preflight`), before a command's module and torch are imported:
every usage error is answered at once.
Exit codes: 0 done (even when some images are error results), 1 runtime failure, 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from shared import preflight
from shared.lifecycle_cli import add_commands
from shared.settings import SettingsError, get_settings
from shared.usage import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]

# Top-level modules of the optional extras, and the extra that brings each.
_EXTRA_OF = {
    "torch": "worker", "transformers": "worker", "PIL": "worker", "safetensors": "worker",
    "numpy": "worker", "prometheus_client": "worker",
    "sklearn": "eval", "matplotlib": "eval",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("realscore")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    """Handler living in ``module.run(args)``, imported only when its command runs."""

    def handler(args: argparse.Namespace) -> int:
        try:
            target = importlib.import_module(module)
        except ImportError as error:
            extra = _EXTRA_OF.get((error.name or "").split(".")[0])
            if extra is None:
                raise  # a real bug, not a missing optional dependency
            raise UsageError(
                f"this command needs the {extra} extra: pip install 'realscore[{extra}]' "
                f"({error.name} is not installed)"
            ) from None
        return int(target.run(args))

    return handler


def _add_backfill(commands: argparse._SubParsersAction) -> None:
    backfill = commands.add_parser(
        "backfill", help="score every image under s3://bucket/prefix or a folder, resumably"
    )
    backfill.add_argument("source", metavar="SOURCE", help="s3://bucket/prefix or a local folder")
    backfill.add_argument("--out", required=True, metavar="FILE", help="rows are appended here")
    backfill.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    backfill.add_argument("--glob", default=None, help="only paths/keys matching this pattern")
    backfill.add_argument("--chunk-size", type=int, default=64, help="URIs per task (at most 256)")
    backfill.add_argument(
        "--max-in-flight", type=int, default=None,
        help="chunks outstanding at once (default: 2 x BULK_TASK_SLOTS x workers answering a ping)",
    )
    backfill.add_argument(
        "--chunk-timeout", type=float, default=None,
        help="seconds before a chunk is sent again (default: 2 x VISIBILITY_TIMEOUT)",
    )
    backfill.add_argument("--retries", type=int, default=2, help="tries again for transient errors")
    backfill.add_argument("--drain-timeout", type=float, default=10.0, help="wait after Ctrl-C")
    backfill.add_argument("--dry-run", action="store_true", help="list and count, send nothing")
    backfill.add_argument("--in-process", action="store_true", help="score here, no Redis")
    backfill.set_defaults(handler=_delegate("shared.backfill_command"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realscore", description="Real photo or AI-generated? Score images with realscore."
    )
    parser.add_argument("--version", action="version", version=f"realscore {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="score images in-process (no broker), JSON lines out")
    score.add_argument(
        "uris", nargs="+", metavar="URI", help="path (relative to here), file:// or s3:// URI"
    )
    score.add_argument(
        "--batch-size", type=int, default=None, help="images per forward pass"
    )
    score.set_defaults(handler=_delegate("worker.serving.embedded"), preflight=preflight.score)

    worker = commands.add_parser(
        "worker",
        help="run a Celery worker (extra arguments go to celery)",
        description="Load the model, then run Celery's worker on it. Arguments other than the "
        "ones below go to `celery worker` (listed after them).",
        add_help=False,  # our own --help also prints Celery's worker options
    )
    worker.add_argument("-h", "--help", action="store_true", help="show this help and Celery's")
    worker.add_argument(
        "--gpus", default=None, help="one worker process per GPU: '0,1' or 'all'"
    )
    worker.add_argument(
        "--procs-per-gpu", type=int, default=1, metavar="N",
        help="N worker processes per GPU (or on the configured device without --gpus), "
        "each with its own model and batcher",
    )
    worker.set_defaults(
        handler=_delegate("worker.serving.run_worker"), passthrough=True, own_help=worker.format_help
    )

    submit = commands.add_parser("submit", help="score through the queue, JSON lines out")
    submit.add_argument(
        "uris", nargs="+", metavar="URI",
        help="path (relative to here; the workers must be able to read it), file:// or s3:// URI",
    )
    submit.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait in all"
    )
    submit.set_defaults(handler=_delegate("shared.submit_command"), preflight=preflight.submit)

    demo = commands.add_parser(
        "demo-model",
        help="write a tiny random-weight tower and head to try realscore (meaningless scores)",
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="folder to write them to")
    demo.set_defaults(handler=_delegate("worker.lifecycle.demo_model"))
    _add_backfill(commands)
    add_commands(commands, _delegate)  # convert, evaluate, train
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        if getattr(args, "help", False):
            # `worker --help`, the one help argparse does not print while parsing: it reads no
            # setting, since help is what one reads to fix a bad one.
            return args.handler(args)
        settings = get_settings()
        check = getattr(args, "preflight", None)
        if check is not None:
            check(args, settings)
        return args.handler(args)
    except (UsageError, SettingsError) as error:
        print(f"realscore {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy, so UsageError raised by command
    # modules (which import shared.cli) is the class caught here.
    from shared.cli import main as _main

    sys.exit(_main())
