"""``realscore convert CHECKPOINT --out FILE``: the seed's pickle -> a small, safe safetensors head.

The checkpoint is read without full unpickling (:func:`worker.model.weights.read_checkpoint`). Its tower
is compared with the pretrained one named by ``--model``: identical (the seed froze it) -> the file
holds only the head, a few KB; different (a fine-tuned tower) -> the tower goes into the same file
as ``clip_encoder.*``, optionally in float16. The printed ``model`` string is the one the worker
reports for the converted file, and (without ``--fp16``) for the original checkpoint too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.cli import EXIT_OK, UsageError
from shared.settings import get_settings
from worker.model.headfile import head_metadata, tower_weights_sha256, utc_now, write_weights
from worker.model.loader import ModelLoadError, align_tower_keys, load_tower, tower_differs
from worker.model.model_string import model_string
from worker.model.preprocess import Preprocessing
from worker.serving.service import verdict_rule
from worker.model.weights import WeightsError, file_sha256, read_checkpoint, tensors_sha256


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    tower_name = args.model or settings.model
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(
            f"--out must end in .safetensors (the loader picks the format by it): {out}"
        )
    if out.exists() and out.resolve() == Path(args.checkpoint).resolve():
        raise UsageError("--out must not be the checkpoint itself")
    try:
        checkpoint = read_checkpoint(args.checkpoint)
        tower = load_tower(tower_name)
        if checkpoint.hidden_size != tower.config.hidden_size:
            raise UsageError(
                f"the checkpoint's head expects hidden size {checkpoint.hidden_size}, tower "
                f"{tower_name} has {tower.config.hidden_size}: pass the right --model"
            )
        fine_tuned = bool(checkpoint.tower) and tower_differs(tower, checkpoint.tower)
    except (WeightsError, ModelLoadError) as error:
        raise UsageError(str(error)) from None
    try:
        preprocessing = Preprocessing.from_pretrained(tower_name)
    except (OSError, ValueError) as error:  # the tower loaded, but its preprocessor config did not
        raise UsageError(f"cannot load the preprocessing of {tower_name!r}: {error}") from None

    tower_tensors = None
    if fine_tuned:
        tower_tensors = {
            key: value.half() if args.fp16 and value.is_floating_point() else value
            for key, value in checkpoint.tower.items()
        }
        # The head runs on the pretrained tower with these weights over it, as the loader builds it.
        tower.load_state_dict(align_tower_keys(tower, tower_tensors), strict=False)
    threshold, means = verdict_rule(settings, checkpoint.metadata)
    metadata = head_metadata(
        tower=tower_name,
        tower_config=tower.config,
        hidden_size=checkpoint.hidden_size,
        preprocessing=preprocessing,
        threshold=threshold,
        high_score_means=means,
        training_data={
            "source": "converted",
            "checkpoint": Path(args.checkpoint).name,
            "checkpoint_sha256": file_sha256(args.checkpoint),
            "fine_tuned_tower": fine_tuned,
            "date": utc_now(),
        },
        tower_weights=tower_weights_sha256(tower),
    )
    write_weights(out, checkpoint.head, metadata, tower=tower_tensors)

    tower_sha = tensors_sha256(tower_tensors) if tower_tensors else None
    converted_id = model_string(tower_name, checkpoint.head_sha, tower_sha)
    size_kb = out.stat().st_size / 1024
    if fine_tuned:
        kind = "float16" if args.fp16 else "float32"
        print(f"the checkpoint's tower differs from {tower_name}: fine-tuned, written ({kind})")
    else:
        print(f"the checkpoint's tower equals {tower_name}: head only")
        if args.fp16:
            print("--fp16 has no effect: there is no fine-tuned tower to store")
    print(f"wrote {out} ({size_kb:.1f} KiB)")
    print(f"sha256 {file_sha256(out)}")
    print(f"model {converted_id}")
    if fine_tuned and args.fp16:
        original = model_string(tower_name, checkpoint.head_sha, tensors_sha256(checkpoint.tower))
        print(f"(the float32 original reports model {original}; float16 scores differ slightly)")
    return EXIT_OK
