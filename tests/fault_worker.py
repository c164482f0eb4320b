"""``python -m tests.fault_worker worker ...``: the real ``realscore worker`` with faults injected,
for the fault tests only. Production code has no hook for this: this module wraps the loaded
model's forward step (``launch``) and the sources' fetch, then runs the unchanged command line.

Faults are chosen by environment variables that only this module reads:

* ``FAULT_FORWARD``: ``fail`` (every forward raises a CUDA-style ``RuntimeError``), ``hang`` (every
  forward blocks), or ``oom-above:N`` (a batch larger than N raises CUDA out-of-memory);
* ``FAULT_TRIGGER``: a file; ``fail``/``hang`` act only while it exists (so the model works first);
* ``FAULT_EXIT_URI``: fetching a URI that contains this text hard-exits the process (``os._exit``),
  the way a segfaulting decoder or a driver abort ends a worker;
* ``FAULT_HOLD_URI``: fetching a URI that contains this text waits while ``FAULT_TRIGGER`` exists
  (two minutes at most), so a test can change the world while the task is in the worker's hands.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def _armed() -> bool:
    trigger = os.environ.get("FAULT_TRIGGER")
    return trigger is None or os.path.exists(trigger)


def _wrap_forward(loaded) -> None:
    fault = os.environ.get("FAULT_FORWARD", "")
    real = loaded.launch  # the batcher's forward step: stage a batch on the device
    never = threading.Event()

    def forward(pixels, **kwargs):
        if fault == "fail" and _armed():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if fault == "hang" and _armed():
            never.wait()
        if fault.startswith("oom-above:") and len(pixels) > int(fault.split(":")[1]):
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(pixels, **kwargs)

    loaded.launch = forward


def install() -> None:
    from worker.model import loader
    from worker.serving import sources

    real_load = loader.load_model

    def load_model(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        _wrap_forward(loaded)
        return loaded

    loader.load_model = load_model
    held = os.environ.get("FAULT_HOLD_URI")
    if held:
        held_fetch = sources.Sources.fetch

        def fetch_when_released(self, uri, *args, **kwargs):
            if isinstance(uri, str) and held in uri:
                deadline = time.monotonic() + 120
                while _armed() and time.monotonic() < deadline:
                    time.sleep(0.05)  # polling the test's release file
            return held_fetch(self, uri, *args, **kwargs)

        sources.Sources.fetch = fetch_when_released
    marker = os.environ.get("FAULT_EXIT_URI")
    if marker:
        real_fetch = sources.Sources.fetch

        def fetch(self, uri, *args, **kwargs):
            if isinstance(uri, str) and marker in uri:
                os._exit(70)
            return real_fetch(self, uri, *args, **kwargs)

        sources.Sources.fetch = fetch


if __name__ == "__main__":
    install()
    from shared.cli import main

    sys.exit(main())
