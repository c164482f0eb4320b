"""``realscore train --real DIR --ai DIR --out FILE``: a new head on cached CLIP tower features.

1. Hash every file; features of files already in the cache (same content, same tower) are reused,
   the rest are extracted in-process (through :class:`worker.serving.service.ScoringService`, the worker's
   own preprocessing and batching) or, with ``--via-queue``, by the workers' ``realscore.embed``.
2. Split per class into train / validation (early stopping) / test (the printed table), by seed.
3. Train dropout + linear with BCE and AdamW on the CPU, single-threaded with a seeded generator,
   so the same seed and data give the same head, bit for bit. Features are standardised with the
   training split's mean and std while training (so the step size does not depend on each
   dimension's scale), then the standardisation is folded into the weights: the head file takes
   raw pooled features, like the seed's.
4. Write a self-describing safetensors head the worker loads as ``REALSCORE_HEAD_WEIGHTS``.

The new head scores high for ``--high-score-means`` (default: ``REALSCORE_HIGH_SCORE_MEANS``),
with threshold 0, like the seed's.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.cli import EXIT_FAILURE, EXIT_OK, UsageError
from shared.usage import model_stopped
from shared.settings import Settings, get_settings
from worker.lifecycle.evaluation import compute_metrics, format_table, other
from worker.lifecycle.features import FeatureCache, decode_features, default_cache_dir
from worker.lifecycle.folders import LabelledFile, labelled_files
from worker.model.headfile import head_metadata, utc_now, write_weights
from worker.model.model_string import model_string, tower_key
from worker.model.weights import file_sha256, tensors_sha256
from worker.serving.batcher import ModelBroken

TRAIN_BATCH = 256


@dataclass
class Split:
    features: np.ndarray  # (n, hidden) float32
    labels: np.ndarray  # class names


@dataclass
class Trained:
    weight: torch.Tensor  # (1, hidden)
    bias: torch.Tensor  # (1,)
    epochs_run: int
    best_epoch: int
    best_val_loss: float


@contextmanager
def _deterministic(seed: int):
    """Seeded global RNG (dropout) and one CPU thread (fixed reduction order), restored after."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def train_head(
    train: Split,
    val: Split,
    *,
    high_score_means: str,
    seed: int = 0,
    epochs: int = 300,
    patience: int = 20,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    dropout: float = 0.35,
) -> Trained:
    """Dropout + ``Linear(hidden, 1)`` with BCE on logits (target 1 = ``high_score_means``),
    AdamW, early stopping on the validation loss; returns the best epoch's weights, for raw
    (unstandardised) features."""
    mean = train.features.mean(axis=0, dtype=np.float64)
    std = train.features.std(axis=0, dtype=np.float64)
    std = np.maximum(std, 1e-3 * float(np.median(std)) + 1e-12)  # nearly constant dimensions
    x_train = torch.from_numpy(((train.features - mean) / std).astype(np.float32))
    y_train = torch.from_numpy((train.labels == high_score_means).astype(np.float32))
    x_val = torch.from_numpy(((val.features - mean) / std).astype(np.float32))
    y_val = torch.from_numpy((val.labels == high_score_means).astype(np.float32))
    with _deterministic(seed):
        generator = torch.Generator().manual_seed(seed)
        linear = nn.Linear(x_train.shape[1], 1)
        nn.init.xavier_uniform_(linear.weight, generator=generator)  # the seed's initialisation
        nn.init.zeros_(linear.bias)
        drop = nn.Dropout(dropout)
        optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        best_loss, best_epoch, best_state, waited, epoch = math.inf, 0, None, 0, 0
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(order), TRAIN_BATCH):
                batch = order[start : start + TRAIN_BATCH]
                optimizer.zero_grad()
                loss = loss_fn(linear(drop(x_train[batch])).squeeze(-1), y_train[batch])
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                val_loss = float(loss_fn(linear(x_val).squeeze(-1), y_val))
            if val_loss < best_loss - 1e-7:
                best_loss, best_epoch, waited = val_loss, epoch, 0
                best_state = (linear.weight.detach().clone(), linear.bias.detach().clone())
            else:
                waited += 1
                if waited >= patience:
                    break
    assert best_state is not None
    # w.z + b with z = (x - mean) / std  ==  (w / std).x + (b - sum(w * mean / std))
    weight = best_state[0].double().numpy() / std
    bias = best_state[1].double().numpy() - (weight * mean).sum(axis=1)
    return Trained(
        torch.from_numpy(weight.astype(np.float32)),
        torch.from_numpy(bias.astype(np.float32)),
        epoch,
        best_epoch,
        best_loss,
    )


def head_scores(trained: Trained, features: np.ndarray) -> np.ndarray:
    """The served model's score, ``2 * sigmoid(linear(x)) - 1`` (dropout is off at inference)."""
    with torch.no_grad():
        logits = torch.from_numpy(features) @ trained.weight.T + trained.bias
        return (2 * torch.sigmoid(logits.squeeze(-1)) - 1).numpy()


def split_indices(labels: np.ndarray, val_share: float, test_share: float, seed: int) -> tuple:
    """Per-class shuffled split into train / val / test index arrays (each class in each part)."""
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for name in ("real", "ai"):
        members = np.flatnonzero(labels == name)
        if len(members) < 3:
            raise UsageError(f"need at least 3 usable {name} images to train, have {len(members)}")
        members = rng.permutation(members)
        n_test = min(max(1, round(len(members) * test_share)), len(members) - 2)
        n_val = min(max(1, round(len(members) * val_share)), len(members) - n_test - 1)
        parts[2].extend(members[:n_test])
        parts[1].extend(members[n_test : n_test + n_val])
        parts[0].extend(members[n_test + n_val :])
    return tuple(np.sort(np.array(part, dtype=int)) for part in parts)


def _hash_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class _LocalExtractor:
    """The pretrained tower in this process, behind the worker's own ScoringService."""

    def __init__(self, settings: Settings, tower_name: str, batch_size: int | None) -> None:
        from transformers import CLIPVisionConfig

        from worker.model.loader import LoadedModel, ModelLoadError, build_model
        from worker.model.weights import Checkpoint
        from worker.serving.embedded import start_service

        def load() -> LoadedModel:
            try:
                hidden = CLIPVisionConfig.from_pretrained(tower_name).hidden_size
                # Features do not depend on the head; a zero head lets the scoring path run as is.
                blank = Checkpoint(
                    path=Path("(feature extraction)"),
                    head={"linear.weight": torch.zeros(1, hidden), "linear.bias": torch.zeros(1)},
                )
                return build_model(tower_name, blank, device=settings.device, dtype=settings.dtype)
            except (OSError, ValueError, ModelLoadError) as error:
                raise UsageError(f"cannot load CLIP tower {tower_name!r}: {error}") from None

        # The same start as score and evaluate: malloc trimming, a decode mode that cannot run
        # as a usage error.
        self.service = start_service(settings, batch_size, load=load)

    def __call__(self, paths: list[Path]) -> list[dict]:
        try:
            return self.service.map(lambda path: self.service.embed_uri(str(path)), paths)
        finally:
            self.service.stop()


def _queue_extract(paths: list[Path], timeout: float) -> list[dict]:
    from shared import client

    return client.embed_many([str(path) for path in paths], timeout=timeout)


def gather_features(
    files: list[LabelledFile], tower: str, cache: FeatureCache, extract
) -> tuple[list[tuple[LabelledFile, str]], dict[str, np.ndarray], Counter]:
    """(file, sha256) of every usable file, features by sha256, and error counts by code."""
    with ThreadPoolExecutor(8) as pool:
        hashes = list(pool.map(lambda item: _hash_file(item.path), files))
    errors: Counter = Counter(unreadable=sum(sha is None for sha in hashes))
    known = cache.get_many(sha for sha in hashes if sha)
    missing = [index for index, sha in enumerate(hashes) if sha and sha not in known]
    extracted: dict[str, np.ndarray] = {}
    if missing:
        print(
            f"extracting features of {len(missing)} files ({len(known)} already cached)", flush=True
        )
        rows = extract([files[index].path for index in missing])
        for index, row in zip(missing, rows, strict=True):
            if not row.get("ok"):
                errors[(row.get("error") or {}).get("code", "internal")] += 1
                continue
            if tower_key(row["model"]) != tower:
                raise UsageError(
                    f"features came from {tower_key(row['model'])}, not {tower}: train with "
                    "--model set to the tower the workers serve (a head trained on a fine-tuned "
                    "tower's features needs that tower, which a head file does not carry)"
                )
            extracted[row["sha256"]] = decode_features(row["features"], int(row["dim"]))
            hashes[index] = row["sha256"]  # differs if the file changed since it was hashed
        cache.put_many(extracted)
    else:
        print(f"all {len(known)} files' features are cached", flush=True)
    features = {**known, **extracted}
    usable = [(item, sha) for item, sha in zip(files, hashes, strict=True) if sha in features]
    return usable, features, +errors


def _deduplicated(
    usable: list[tuple[LabelledFile, str]],
) -> tuple[list[tuple[LabelledFile, str]], int, int]:
    """One entry per content; content filed under both classes is dropped (its label is unknown)."""
    labels_of: dict[str, set[str]] = {}
    for item, sha in usable:
        labels_of.setdefault(sha, set()).add(item.label)
    seen: set[str] = set()
    kept, conflicting = [], 0
    for item, sha in usable:
        if len(labels_of[sha]) > 1:
            conflicting += 1
        elif sha not in seen:
            seen.add(sha)
            kept.append((item, sha))
    return kept, len(usable) - len(kept) - conflicting, conflicting


def _validate(args: argparse.Namespace) -> None:
    from shared.preflight import train_arguments

    train_arguments(args)


def _tower_description(tower_name: str, hidden_size: int) -> tuple[object, object]:
    """The tower's config and preprocessing, for the head's metadata; they must fit the features."""
    from transformers import CLIPVisionConfig

    from worker.model.preprocess import Preprocessing

    try:
        config = CLIPVisionConfig.from_pretrained(tower_name)
        preprocessing = Preprocessing.from_pretrained(tower_name)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the config of CLIP tower {tower_name!r}: {error}") from None
    if config.hidden_size != hidden_size:
        raise UsageError(
            f"the features have {hidden_size} dimensions but tower {tower_name} has hidden size "
            f"{config.hidden_size}: were they embedded by workers with another REALSCORE_MODEL?"
        )
    return config, preprocessing


def _local_tower_weights(tower_name: str) -> str | None:
    """The weights hash of a local tower, so the head is refused on any other tower of its shape.
    A hub id is told apart by its name already; its weights may not even be on this machine."""
    from shared.model_files import is_hub_id
    from worker.model.headfile import tower_weights_sha256
    from worker.model.loader import ModelLoadError, load_tower

    if is_hub_id(tower_name, here=True):
        return None
    try:
        return tower_weights_sha256(load_tower(tower_name))
    except ModelLoadError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    _validate(args)
    settings = get_settings()
    tower_name = args.model or settings.model
    means = args.high_score_means or settings.high_score_means
    files = labelled_files(args.real, args.ai)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    with FeatureCache(cache_dir, tower_name) as cache:  # a tower name is its own tower key
        if args.via_queue:
            extract = lambda paths: _queue_extract(paths, args.timeout)  # noqa: E731
        else:
            extract = lambda paths: _LocalExtractor(settings, tower_name, args.batch_size)(paths)  # noqa: E731
        try:
            usable, features, errors = gather_features(files, tower_name, cache, extract)
        except ModelBroken as error:  # a sticky device error mid-extraction: one line, not a traceback
            print(model_stopped("train", error, "no head was written"), file=sys.stderr)
            return EXIT_FAILURE
    if errors:
        detail = ", ".join(f"{code} {count}" for code, count in sorted(errors.items()))
        print(f"left out, could not be read or embedded: {sum(errors.values())} ({detail})")
    usable, duplicates, conflicting = _deduplicated(usable)
    if duplicates or conflicting:
        print(
            f"left out: {duplicates} duplicate files, "
            f"{conflicting} files whose content is in both folders"
        )

    x = np.stack([features[sha] for _, sha in usable]).astype(np.float32)
    y = np.array([item.label for item, _ in usable])
    train_idx, val_idx, test_idx = split_indices(y, args.val_split, args.test_split, args.seed)
    trained = train_head(
        Split(x[train_idx], y[train_idx]),
        Split(x[val_idx], y[val_idx]),
        high_score_means=means,
        seed=args.seed,
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
    )
    print(
        f"trained on {len(train_idx)}, early stopping on {len(val_idx)}, held out {len(test_idx)}: "
        f"{trained.epochs_run} epochs, best validation loss {trained.best_val_loss:.4f} "
        f"at epoch {trained.best_epoch}"
    )
    metrics = compute_metrics(
        head_scores(trained, x[test_idx]), y[test_idx], threshold=0.0, high_score_means=means
    )
    print(format_table(metrics, title=f"\n== held-out test split: {len(test_idx)} images =="))

    tower_config, preprocessing = _tower_description(tower_name, x.shape[1])
    tower_weights = _local_tower_weights(tower_name)
    counts = Counter(y.tolist())
    head = {
        "linear.weight": trained.weight.float().contiguous(),
        "linear.bias": trained.bias.float().contiguous(),
    }
    metadata = head_metadata(
        tower=tower_name,
        tower_config=tower_config,
        hidden_size=x.shape[1],
        preprocessing=preprocessing,
        threshold=0.0,
        high_score_means=means,
        training_data={
            "source": "realscore train",
            "real": {"folder": str(Path(args.real).absolute()), "images": counts["real"]},
            "ai": {"folder": str(Path(args.ai).absolute()), "images": counts["ai"]},
            "split": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            "seed": args.seed,
            "epochs_run": trained.epochs_run,
            "best_epoch": trained.best_epoch,
            "hyperparameters": {
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "dropout": args.dropout,
            },
            "test_auc_roc": metrics.auc_roc,
            "date": utc_now(),
        },
        tower_weights=tower_weights,
    )
    out = write_weights(args.out, head, metadata)
    print(f"\nwrote {out} (score above 0 means {means}; {other(means)} at or below)")
    print(f"sha256 {file_sha256(out)}")
    print(f"model {model_string(tower_name, tensors_sha256(head))}")
    return EXIT_OK
