"""Arguments of the model-lifecycle commands: ``convert``, ``evaluate``, ``train``.

Declared here, on the torch-free side, so ``realscore --help`` works without the worker extra; the
handlers live in :mod:`worker.lifecycle.convert`, :mod:`worker.lifecycle.evaluate_command` and :mod:`worker.lifecycle.train`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from shared import preflight

Handler = Callable[[argparse.Namespace], int]


def _folders(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", required=True, metavar="DIR", help="folder of real photos")
    parser.add_argument("--ai", required=True, metavar="DIR", help="folder of AI-generated images")
    parser.add_argument(
        "--via-queue", action="store_true", help="use the running workers instead of a local model"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="with --via-queue: seconds to wait for the workers' results",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per forward pass"
    )


def add_commands(commands: argparse._SubParsersAction, delegate: Callable[[str], Handler]) -> None:
    convert = commands.add_parser(
        "convert", help="seed checkpoint -> safetensors head (+ tower if fine-tuned)"
    )
    convert.add_argument("checkpoint", help="the seed's modelo_final.pth (or a safetensors head)")
    convert.add_argument("--out", required=True, help="the .safetensors file to write")
    convert.add_argument(
        "--model", default=None, help="CLIP tower, hub id or local dir (default: REALSCORE_MODEL)"
    )
    convert.add_argument(
        "--fp16", action="store_true", help="store a fine-tuned tower in float16 (half the size)"
    )
    convert.set_defaults(handler=delegate("worker.lifecycle.convert"), preflight=preflight.convert)

    evaluate = commands.add_parser(
        "evaluate", help="the seed's metrics table on two labelled folders, plots, robustness"
    )
    _folders(evaluate)
    evaluate.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold (default: REALSCORE_THRESHOLD, else the head's metadata, else 0)",
    )
    evaluate.add_argument(
        "--positive", choices=("ai", "real"), default="ai", help="the class called positive"
    )
    evaluate.add_argument(
        "--report", metavar="DIR", help="write ROC/histogram PNGs, CSV, JSON here"
    )
    evaluate.add_argument(
        "--perturb",
        metavar="SPEC",
        help="re-score degraded copies, e.g. jpeg:75,resize:0.5,blur:1.0",
    )
    evaluate.add_argument(
        "--work-dir",
        metavar="DIR",
        help="where degraded copies are written for --via-queue (a folder the workers can read)",
    )
    evaluate.set_defaults(
        handler=delegate("worker.lifecycle.evaluate_command"), preflight=preflight.evaluate
    )

    train = commands.add_parser("train", help="train a head on cached CLIP features")
    _folders(train)
    train.add_argument("--out", required=True, help="the .safetensors head to write")
    train.add_argument("--seed", type=int, default=0, help="same seed and data -> identical head")
    train.add_argument(
        "--epochs", type=int, default=300, help="most passes over the training set"
    )
    train.add_argument(
        "--patience", type=int, default=20, help="epochs without improvement to stop"
    )
    train.add_argument("--val-split", type=float, default=0.15, help="share for early stopping")
    train.add_argument(
        "--test-split", type=float, default=0.15, help="held-out share for the table"
    )
    train.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    train.add_argument(
        "--dropout", type=float, default=0.35, help="dropout before the linear layer"
    )
    train.add_argument(
        "--high-score-means",
        choices=("real", "ai"),
        default=None,
        help="which class the new head scores high (default: REALSCORE_HIGH_SCORE_MEANS)",
    )
    train.add_argument(
        "--model", default=None, help="CLIP tower, hub id or local dir (default: REALSCORE_MODEL)"
    )
    train.add_argument(
        "--cache-dir", default=None, help="feature cache (default: ~/.cache/realscore/features)"
    )
    train.set_defaults(handler=delegate("worker.lifecycle.train"), preflight=preflight.train)
