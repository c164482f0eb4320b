"""Where the model's files are, answered without torch so a wrong path is reported at once.

The head weights' default (``weights/modelo_final.pth``) is looked for in the working directory,
then in the ``weights/`` folder of the checkout this code runs from, so a command run from another
folder still finds it; when it is in neither, the error lists every path tried. A tower name is a
hub id or a local directory: a name that can only be a path must exist.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from shared.settings import Settings
from shared.usage import UsageError

# "name" or "namespace/name", as the hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_CHECKOUT = Path(__file__).resolve().parent.parent
_TRUE = {"1", "true", "yes", "on"}


class ModelFilesError(UsageError):
    """A configured model file or directory is not there; the message says where we looked."""


def is_hub_id(name: str, *, here: bool = False) -> bool:
    """Whether ``name`` names a hub repository rather than a local directory.

    ``here``: ``name`` is loaded by this process, so an existing directory of that name (which
    transformers would load instead of the hub) makes it local. A name recorded in a head on
    another machine is judged by its spelling alone: heads record local towers as absolute paths.
    """
    if not _HUB_ID.fullmatch(name) or ".." in name:
        return False
    return not (here and os.path.isdir(name))


def head_weights_candidates(settings: Settings) -> list[Path]:
    """The paths the head weights are looked for at, in order."""
    configured = settings.head_weights
    here = Path.cwd() / configured  # unchanged when it is absolute
    if configured.is_absolute() or "head_weights" in settings.model_fields_set:
        return [here]  # a path the user gave means what it says, relative to the cwd
    in_checkout = _CHECKOUT / configured
    return [here] if in_checkout == here else [here, in_checkout]


def head_weights_path(settings: Settings) -> Path:
    """The head weights file to load; :class:`ModelFilesError` lists the paths tried if none is."""
    return first_head_weights(head_weights_candidates(settings))


def first_head_weights(candidates: Sequence[str | Path]) -> Path:
    """The first of ``candidates`` that is a file. The one place that decides head weights are
    missing and says so: :class:`ModelFilesError`, listing every path tried and what to do."""
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    tried = ", ".join(str(path) for path in candidates)
    raise ModelFilesError(
        f"head weights not found (looked at {tried}): put modelo_final.pth (or a converted "
        "head.safetensors) there, point REALSCORE_HEAD_WEIGHTS at it, or try the product with "
        "random weights: realscore demo-model --out DIR"
    )


def _offline() -> bool:
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").lower() in _TRUE for name in names)


def check_tower(name: str, variable: str = "REALSCORE_MODEL") -> None:
    """Refuse a tower that cannot load: a path that does not exist, or (offline) an uncached hub id."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelFilesError(
                f"{variable}={name}: the directory has no config.json (not a saved tower)"
            )
        return
    if not is_hub_id(name):
        raise ModelFilesError(f"{variable}={name}: no such directory (and not a hub id)")
    if _offline():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # no worker extra: the command itself says which extra it needs
            return
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelFilesError(
                f"{variable}={name}: not in the local hub cache, and HF_HUB_OFFLINE is set; "
                "download it once online or point REALSCORE_MODEL at a local directory"
            )
