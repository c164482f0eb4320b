"""Checks a command's arguments and files before its module (and torch) is imported.

Every usage error is answered at once: each command's pre-flight check refuses bad numbers,
missing files and folders before the command's module (and torch) is imported, and so before the
model loads. The command modules keep their own checks for callers that do not come through the CLI.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from shared.model_files import check_tower, head_weights_path
from shared.settings import Settings
from shared.usage import UsageError

Preflight = Callable[[argparse.Namespace, Settings], None]


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{name} must be positive, got {value}")


def _batch_size(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")


def _folders(args: argparse.Namespace) -> None:
    for option, folder in (("--real", args.real), ("--ai", args.ai)):
        if not os.path.isdir(folder):
            raise UsageError(f"{option} {folder}: not a directory")


def local_model(settings: Settings) -> None:
    """The configured tower and head weights exist."""
    check_tower(settings.model)
    head_weights_path(settings)


def score(args: argparse.Namespace, settings: Settings) -> None:
    _batch_size(args)
    local_model(settings)


def submit(args: argparse.Namespace, settings: Settings) -> None:
    _positive("--timeout", args.timeout)


def evaluate_arguments(args: argparse.Namespace) -> None:
    """The options ``evaluate`` takes, checked together (``--perturb``'s grammar is its own)."""
    _batch_size(args)
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        raise UsageError("--threshold must be in [-1, 1] (the score's range)")
    _positive("--timeout", args.timeout)
    if args.perturb and args.via_queue and not args.work_dir:
        raise UsageError(
            "--perturb with --via-queue needs --work-dir: a folder the workers can read "
            "(inside their REALSCORE_LOCAL_ROOTS) for the degraded copies"
        )


def evaluate(args: argparse.Namespace, settings: Settings) -> None:
    evaluate_arguments(args)
    _folders(args)
    if not args.via_queue:
        local_model(settings)


def train_arguments(args: argparse.Namespace) -> None:
    """The numbers ``train`` takes, checked together (some depend on each other)."""
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.patience >= 1, "--patience must be at least 1"),
        (
            0 < args.val_split < 1 and 0 < args.test_split < 1,
            "--val-split and --test-split must be in (0, 1)",
        ),
        (args.val_split + args.test_split < 1, "--val-split + --test-split must be below 1"),
        (
            args.lr > 0 and args.weight_decay >= 0,
            "--lr must be positive, --weight-decay not negative",
        ),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.timeout > 0, "--timeout must be positive"),
        (args.out.endswith(".safetensors"), "--out must end in .safetensors"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def train(args: argparse.Namespace, settings: Settings) -> None:
    train_arguments(args)
    _folders(args)
    if args.model:
        check_tower(args.model, "--model")
    else:
        check_tower(settings.model)


def convert(args: argparse.Namespace, settings: Settings) -> None:
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if not args.out.endswith(".safetensors"):
        raise UsageError(
            f"--out must end in .safetensors (the loader picks the format by it): {args.out}"
        )
    if args.model:
        check_tower(args.model, "--model")
    else:
        check_tower(settings.model)
