"""The tower's forward as CUDA graphs, one per fixed batch size (``REALSCORE_COMPILE=cuda-graphs``).

Eager, each of the hundreds of torch ops in a forward releases the GIL and must take it back,
and the worker's task threads hold it in between: on a GPU host the batcher thread's launch rate,
not the GPU, was the limit (bench/RESULTS.md, "The forward against busy Python threads"). A
captured graph replays the whole forward in one call. Plain ``torch.cuda.graph`` capture, no
compiler: seconds at start, where ``torch.compile``'s ``reduce-overhead`` compiles first.

Each size has its own static input and output; a call copies the (padded) batch into the input,
replays, and returns the output, which the next replay of that size overwrites: the caller queues
what it needs of it (the head, the copies to the host) on the same stream before the next call,
as :meth:`worker.model.loader.LoadedModel.launch` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tower = Callable[[torch.Tensor], torch.Tensor]


class GraphedTower:
    """``tower`` captured for each of ``sizes``; called with a batch of exactly one of them."""

    def __init__(
        self,
        tower: Tower,
        sizes: Sequence[int],
        sample_shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at once
        for size in sorted(set(sizes), reverse=True):  # the largest first, as the pool grows
            static_in = torch.zeros((size, *sample_shape), device=device, dtype=dtype)
            warm = torch.cuda.Stream(device)
            warm.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(warm):  # library handles and kernels chosen outside the capture
                for _ in range(2):
                    tower(static_in)
            torch.cuda.current_stream(device).wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = tower(static_in)
            self._graphs[size] = (graph, static_in, static_out)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        graph, static_in, static_out = self._graphs[pixels.shape[0]]
        static_in.copy_(pixels, non_blocking=True)
        graph.replay()
        return static_out
