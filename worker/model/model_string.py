"""The ``model`` string every result carries: written by :func:`model_string`, read back only here.

``TOWER+head:HEAD[+tower:WEIGHTS]+DTYPE+decode:MODE``: the tower's hub id or directory, the first
12 hex digits of the head's content hash, of the tower weights' hash when they came from the
checkpoint (a fine-tuned tower), then how the worker ran it (dtype, decode mode), since each
changes the score. Without the last two it names the weights alone, as ``convert`` and ``train``
print it. No torch here: the training side reads these strings without loading a model.
"""

from __future__ import annotations

import re

DTYPE_NAMES = ("fp32", "fp16", "bf16")
_HASH_DIGITS = 12
# model_string's parts, each optional but the tower; the tower is the shortest prefix after which
# the rest parses, so a directory name with a "+" in it stays whole.
_PARTS = re.compile(
    r"(?P<tower>.*?)(?:\+head:(?P<head>[0-9a-f]+))?(?:\+tower:(?P<weights>[0-9a-f]+))?"
    rf"(?:\+(?P<dtype>{'|'.join(DTYPE_NAMES)}))?(?:\+decode:(?P<decode>[a-z]+))?",
    re.DOTALL,
)


def model_string(
    tower: str,
    head_sha: str | None = None,
    tower_sha: str | None = None,
    dtype: str | None = None,
    decode: str | None = None,
) -> str:
    """The ``model`` string of these parts (see the module docstring); ``dtype`` is one of
    :data:`DTYPE_NAMES`, the parts left out are left out of the string."""
    text = tower
    if head_sha:
        text += f"+head:{head_sha[:_HASH_DIGITS]}"
    if tower_sha:
        text += f"+tower:{tower_sha[:_HASH_DIGITS]}"
    if dtype:
        text += f"+{dtype}"
    if decode:
        text += f"+decode:{decode}"
    return text


def tower_key(model: str) -> str:
    """``tower+head:abc[+tower:def][+fp16+decode:gpu]`` -> ``tower[+tower:def]``: what pooled
    features depend on (not the head, nor how the worker ran the tower). A bare tower name is its
    own key."""
    parts = _PARTS.fullmatch(model)
    assert parts is not None  # every part but the tower is optional, and the tower may be empty
    return model_string(parts["tower"], tower_sha=parts["weights"])
