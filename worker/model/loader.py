"""Builds the ready-to-serve model: tower from the hub id or a local dir, head from a weights file.

Tower weights inside the checkpoint override the pretrained ones when they differ (a fine-tuned
tower). The ``model`` string every result carries (:mod:`worker.model.model_string`) names the
tower, a short hash of the head, and a hash of the tower when it came from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPVisionModel
from transformers.utils import logging as transformers_logging

from shared.model_files import is_hub_id
from worker.model.graphs import GraphedTower
from worker.model.headfile import tower_fingerprint, tower_weights_sha256
from worker.model.model import RealScoreModel
from worker.model.model_string import DTYPE_NAMES, model_string
from worker.model.preprocess import Preprocessing
from worker.model.weights import Checkpoint, WeightsError, read_checkpoint, tensors_sha256

log = logging.getLogger(__name__)
# transformers draws a "Loading weights" bar for every load: noise in every command and worker log.
transformers_logging.disable_progress_bar()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = dict(zip((torch.float32, torch.float16, torch.bfloat16), DTYPE_NAMES, strict=True))


class ModelLoadError(RuntimeError):
    """The model cannot be served as configured; the message says why."""


@dataclass
class Launched:
    """A forward pass queued on the device; :meth:`LoadedModel.collect` waits for it."""

    count: int
    scores: torch.Tensor
    features: torch.Tensor | None
    ready: torch.cuda.Event | None


@dataclass
class LoadedModel:
    model: RealScoreModel
    preprocessing: Preprocessing
    device: torch.device
    dtype: torch.dtype
    tower_name: str
    head_sha: str
    tower_sha: str | None = None  # the checkpoint's tower weights, when they replaced the tower's
    head_metadata: dict[str, str] = field(default_factory=dict)
    compiled_sizes: tuple[int, ...] = ()
    _features: Callable[[torch.Tensor], torch.Tensor] | None = None

    @torch.inference_mode()
    def score(self, pixel_values: torch.Tensor) -> list[float]:
        """Scores for a CPU batch (N, 3, H, W) of preprocessed pixels."""
        return self.score_and_features(pixel_values)[0]

    @torch.inference_mode()
    def score_and_features(self, pixel_values: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """Scores and pooled features (N, hidden, float32 on the CPU) from one forward pass."""
        pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
        scores, features = self.collect(self.launch(pixels, with_features=True))
        assert features is not None
        return scores, features

    @torch.inference_mode()
    def launch(self, pixels: torch.Tensor, *, with_features: bool = False) -> Launched:
        """Queue the forward of device-resident ``pixels`` and the copies of its results to
        the host, without waiting: the caller may stage the next batch meanwhile. Pooled features
        come back only ``with_features`` (``embed``)."""
        count = pixels.shape[0]
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        padded = self._padded_size(count)
        if padded != count:  # a compiled shape: pad, never recompile on traffic
            filler = pixels.new_zeros((padded - count, *pixels.shape[1:]))
            pixels = torch.cat([pixels, filler])
        features = (self._features or self.model.features)(pixels)[:count]
        scores = self.model.head(features)
        if self.device.type != "cuda":
            return Launched(count, scores, features.float() if with_features else None, None)
        scores_host = _to_pinned_host(scores)
        features_host = _to_pinned_host(features.float()) if with_features else None
        ready = torch.cuda.Event()
        ready.record()
        return Launched(count, scores_host, features_host, ready)

    def collect(self, launched: Launched) -> tuple[list[float], torch.Tensor | None]:
        """Wait for a launched forward; scores (and features if asked) on the host."""
        if launched.ready is not None:
            launched.ready.synchronize()
        return launched.scores.tolist(), launched.features

    def _padded_size(self, count: int) -> int:
        for size in self.compiled_sizes:
            if size >= count:
                return size
        return count

    def compile(self, mode: str, batch_sizes: Sequence[int], *, backend: str = "inductor") -> None:
        """``torch.compile`` the tower for these fixed batch sizes and run each once now, so
        traffic never triggers a compile (batches are padded up to the next size); or, for
        ``cuda-graphs``, capture it as one CUDA graph per size (:mod:`worker.model.graphs`)."""
        shape = self.preprocessing.output_shape
        if mode == "cuda-graphs":
            if self.device.type != "cuda":
                raise ModelLoadError(f"REALSCORE_COMPILE=cuda-graphs needs a CUDA device, not {self.device}")
            started = time.monotonic()
            try:
                with torch.inference_mode():
                    graphed = GraphedTower(self.model.features, batch_sizes, shape, self.device, self.dtype)
            except RuntimeError as error:  # out of memory, an op that cannot be captured
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ModelLoadError(f"REALSCORE_COMPILE=cuda-graphs: capturing the tower failed: {first}") from error
            self.compiled_sizes, self._features = graphed.sizes, graphed
            log.info("captured the tower as CUDA graphs for batches %s in %.1f s",
                     list(graphed.sizes), time.monotonic() - started)
            return
        compiled = torch.compile(self.model.features, mode=mode, dynamic=False, backend=backend)
        self.compiled_sizes = tuple(sorted(set(batch_sizes)))
        self._features = compiled
        for size in self.compiled_sizes:
            started = time.monotonic()
            with torch.inference_mode():
                self.collect(self.launch(torch.zeros((size, *shape), device=self.device)))
            log.info("compiled the tower for batch %d in %.1f s", size, time.monotonic() - started)

    @property
    def model_id(self) -> str:
        """The weights' part of the ``model`` string: tower and head (convert and train print it)."""
        return model_string(self.tower_name, self.head_sha, self.tower_sha)

    def result_model(self, decode_mode: str) -> str:
        """The ``model`` string results carry: weights, dtype and preprocessing mode, since each
        changes the score (fp32 CPU and fp16 GPU results must not pass for one another)."""
        return model_string(
            self.tower_name, self.head_sha, self.tower_sha, _DTYPE_NAMES[self.dtype], decode_mode
        )


def _to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    """An asynchronous device->host copy into page-locked memory (valid once the event fires)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"REALSCORE_DEVICE={name} but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"REALSCORE_DEVICE={name} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tower(name_or_dir: str) -> CLIPVisionModel:
    """The pretrained CLIP vision tower, float32 on the CPU, with SDPA attention."""
    try:
        return CLIPVisionModel.from_pretrained(
            name_or_dir, attn_implementation="sdpa", dtype=torch.float32
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load CLIP tower {name_or_dir!r}: {error}") from None


def _apply_head(model: RealScoreModel, checkpoint: Checkpoint, tower_name: str) -> None:
    weight = checkpoint.head["linear.weight"]
    if weight.shape[-1] != model.hidden_size:
        raise WeightsError(
            f"{checkpoint.path}: head linear.weight has shape {list(weight.shape)} but tower "
            f"{tower_name} has hidden size {model.hidden_size} (expects [1, {model.hidden_size}])"
        )
    model.linear.load_state_dict(
        {"weight": checkpoint.head["linear.weight"], "bias": checkpoint.head["linear.bias"]}
    )


def align_tower_keys(tower: CLIPVisionModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` keyed like ``tower``: transformers 4 saved ``vision_model.*``, 5 drops the prefix."""
    prefix = "vision_model."
    expects_prefix = any(key.startswith(prefix) for key in tower.state_dict())
    aligned = {}
    for key, tensor in state.items():
        bare = key.removeprefix(prefix)
        aligned[prefix + bare if expects_prefix else bare] = tensor
    return aligned


def tower_differs(tower: CLIPVisionModel, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds any tower weight unlike the pretrained one (a fine-tuned tower)."""
    current = tower.state_dict()
    for key, tensor in align_tower_keys(tower, state).items():
        if key not in current:
            raise WeightsError(f"checkpoint tower key {key!r} does not exist in the CLIP tower")
        if current[key].shape != tensor.shape:
            raise WeightsError(
                f"checkpoint tower weight {key} has shape {list(tensor.shape)} but the tower "
                f"expects {list(current[key].shape)}"
            )
        if not torch.equal(current[key], tensor.to(current[key].dtype)):
            return True
    return False


def _config_differences(recorded: object, tower: CLIPVisionModel) -> tuple[str, str]:
    """``("key=made-for ...", "key=actual ...")`` for the keys where the two configs disagree."""
    if not isinstance(recorded, dict):
        raise WeightsError(f"head metadata tower_config is not a JSON object: {recorded!r}")
    actual = tower_fingerprint(tower.config)
    differing = [
        key for key in sorted(recorded) if key in actual and recorded[key] != actual[key]
    ]
    return (
        ", ".join(f"{key}={recorded[key]!r}" for key in differing),
        ", ".join(f"{key}={actual[key]!r}" for key in differing),
    )


def check_metadata(metadata: dict[str, str], tower: CLIPVisionModel, tower_name: str) -> None:
    """Refuse a self-describing head made for another tower; malformed values are WeightsError."""
    try:
        hidden = metadata.get("hidden_size")
        if hidden is not None and int(hidden) != int(tower.config.hidden_size):
            raise WeightsError(
                f"head was made for hidden size {hidden}, tower {tower_name} has "
                f"{tower.config.hidden_size}"
            )
        if "threshold" in metadata and not -1.0 <= float(metadata["threshold"]) <= 1.0:
            raise ValueError(f"threshold {metadata['threshold']} is outside the score's [-1, 1]")
        recorded = metadata.get("tower_config")
        if recorded is not None:
            made_for, actual = _config_differences(json.loads(recorded), tower)
            if made_for:
                raise WeightsError(
                    f"head was made for a tower ({metadata.get('tower', 'unnamed')}) with "
                    f"{made_for}, but REALSCORE_MODEL={tower_name} has {actual}"
                )
    except (ValueError, TypeError) as error:
        raise WeightsError(f"head metadata is malformed: {error}") from None
    made_for_name = metadata.get("tower")
    if (
        made_for_name
        and made_for_name != tower_name
        and is_hub_id(made_for_name)
        and is_hub_id(tower_name, here=True)
    ):
        raise WeightsError(
            f"head was made for tower {made_for_name}, but REALSCORE_MODEL={tower_name}"
        )


def check_tower_weights(checkpoint: Checkpoint, tower: CLIPVisionModel, tower_name: str) -> None:
    """Refuse a head recorded for a tower whose weights differ from the one it would run on (after
    any fine-tuned weights from the checkpoint): two towers of one shape are not interchangeable."""
    recorded = checkpoint.metadata.get("tower_weights")
    if not recorded:
        return
    actual = tower_weights_sha256(tower)
    if actual != recorded:
        raise WeightsError(
            f"head was made for another tower ({checkpoint.metadata.get('tower', 'unnamed')}, "
            f"weights {recorded[:12]}) of the same shape, but REALSCORE_MODEL={tower_name} has "
            f"weights {actual[:12]}: use the tower it was made for, or train a head for this one"
        )


def build_model(
    tower_name: str,
    checkpoint: Checkpoint,
    *,
    device: str = "auto",
    dtype: str = "auto",
    dropout: float = 0.35,
) -> LoadedModel:
    """Tower + checkpoint -> an eval-mode model on ``device`` in ``dtype`` (head kept float32)."""
    target = resolve_device(device)
    precision = resolve_dtype(dtype, target)
    tower = load_tower(tower_name)
    check_metadata(checkpoint.metadata, tower, tower_name)
    if checkpoint.metadata.get("demo"):
        log.warning("%s is a demo head (%s)", checkpoint.path, checkpoint.metadata["demo"])
    try:
        preprocessing = Preprocessing.from_pretrained(tower_name)
    except (OSError, ValueError) as error:  # e.g. no preprocessor_config.json beside the tower
        raise ModelLoadError(f"cannot load the preprocessing of {tower_name!r}: {error}") from None
    tower_sha = None
    if checkpoint.tower and tower_differs(tower, checkpoint.tower):
        tower.load_state_dict(align_tower_keys(tower, checkpoint.tower), strict=False)
        tower_sha = tensors_sha256(checkpoint.tower)
        log.info("using the fine-tuned tower weights from %s", checkpoint.path)
    check_tower_weights(checkpoint, tower, tower_name)
    model = RealScoreModel(tower, dropout=dropout)
    _apply_head(model, checkpoint, tower_name)
    model.eval()
    model.clip_encoder.to(target, precision)
    model.linear.to(target)
    return LoadedModel(
        model=model,
        preprocessing=preprocessing,
        device=target,
        dtype=precision,
        tower_name=tower_name,
        head_sha=checkpoint.head_sha,
        tower_sha=tower_sha,
        head_metadata=dict(checkpoint.metadata),
    )


def load_model(
    tower_name: str,
    head_weights: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Read ``head_weights`` and build the model; every failure (a missing file included: see
    :func:`read_checkpoint`) is a :class:`ModelLoadError`."""
    try:
        return build_model(tower_name, read_checkpoint(head_weights), device=device, dtype=dtype)
    except WeightsError as error:
        raise ModelLoadError(str(error)) from None
