"""What busy Python threads cost the model's forward, eager and as one captured graph.

The batcher runs the forward on one thread while the task threads (fetch, header check, results)
run Python. Eager, every torch op the forward dispatches releases the GIL and must take it back:
with Python-busy threads around, each take-back waits for one of them to let go. A captured
graph (a CUDA graph on a GPU, what ``REALSCORE_COMPILE=reduce-overhead`` replays; a frozen
TorchScript trace on a CPU) is one call, one take-back.

For K threads busy in Python (holding the GIL between switches) and, as the control, K threads
busy in C with the GIL released (sha256 of 1 MiB: the same cores taken, no GIL), prints the
median forward time, eager and graph; the ratio python/C is what the GIL alone costs.

``--switch-ms`` repeats the busy rows at other ``sys.setswitchinterval`` values (what
``REALSCORE_SWITCH_INTERVAL_MS`` sets in a worker): a thread waiting for the GIL asks its holder
to let go only after one interval, so the eager forward's take-backs wait that long each.
``--cost-threads`` adds what a shorter interval costs the other side: the Python work N busy
threads get done with no forward running (more forced hand-overs), in million loop steps per s.

    python bench/gil_contention.py --tower tiny --device cpu --busy 1,4 --switch-ms 5,0.5,0.1
    python bench/gil_contention.py --tower large14 --device cuda --batch 32 --busy 1,4,16

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOWERS, build, machine_line  # noqa: E402

_BLOB = b"x" * (1 << 20)


def _python_busy(stop: threading.Event) -> None:
    count = 0
    while not stop.is_set():
        count += 1


def _c_busy(stop: threading.Event) -> None:
    while not stop.is_set():
        hashlib.sha256(_BLOB).digest()  # hashlib releases the GIL while it hashes


def _python_rate(threads: int, switch_ms: float, steps: int = 3_000_000) -> float:
    """Million loop steps per second that ``threads`` threads, all in Python, get through."""
    share = steps // threads

    def count() -> None:
        done = 0
        while done < share:
            done += 1

    default_switch = sys.getswitchinterval()
    sys.setswitchinterval(switch_ms / 1000)
    try:
        workers = [threading.Thread(target=count) for _ in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return share * threads / (time.perf_counter() - started) / 1e6
    finally:
        sys.setswitchinterval(default_switch)


def _graph(tower: Callable, pixels, device: str) -> Callable[[], object]:
    """The whole forward as one call: a CUDA graph replay, or a frozen TorchScript trace."""
    import torch

    if device.startswith("cuda"):
        static = pixels.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture, as torch.cuda.graphs asks
                tower(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tower(static)
        return graph.replay

    class Tower(torch.nn.Module):
        def forward(self, batch):  # noqa: ANN001, ANN202
            return tower(batch)

    traced = torch.jit.freeze(torch.jit.trace(Tower().eval(), pixels, check_trace=False))
    return lambda: traced(pixels)


def _median_ms(step: Callable[[], object], device: str, repeats: int) -> float:
    import torch

    def run() -> None:
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--busy", default="1,4", help="comma-separated busy thread counts")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--switch-ms", default="5",
                        help="comma-separated GIL switch intervals (ms) to repeat the busy rows at")
    parser.add_argument("--cost-threads", default="",
                        help="comma-separated thread counts for the Python-work-per-interval table")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder holding clip/ and head.pth of this tower (pipeline.py --data)")
    args = parser.parse_args()

    import torch

    from worker.model.loader import load_model

    if args.device == "cpu":
        torch.set_num_threads(1)  # the forward on its own thread, as the batcher's
    if args.data is not None and (args.data / "head.pth").exists():
        loaded = load_model(str(args.data / "clip"), args.data / "head.pth", device=args.device, dtype="auto")
    else:
        with tempfile.TemporaryDirectory() as scratch:
            tower_dir, head = build(Path(scratch), args.tower)
            loaded = load_model(str(tower_dir), head, device=args.device, dtype="auto")
    shape = loaded.preprocessing.output_shape
    pixels = torch.randn((args.batch, *shape), device=loaded.device).to(loaded.dtype)
    with torch.inference_mode() if args.device.startswith("cuda") else torch.no_grad():
        eager = lambda: loaded.model.features(pixels)  # noqa: E731
        try:
            graph: Callable[[], object] | None = _graph(loaded.model.features, pixels, args.device)
        except Exception as error:  # noqa: BLE001 - the eager column still says something
            print(f"graph capture failed: {type(error).__name__}: {error}", flush=True)
            graph = None
        lines = [
            f"\n### Forward against busy threads (`bench/gil_contention.py`)\n",
            f"- machine: {machine_line(args.device)}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `python bench/gil_contention.py {' '.join(sys.argv[1:])}`",
            f"- tower {args.tower} ({str(loaded.dtype).removeprefix('torch.')}), batch {args.batch}; "
            f"median of {args.repeats} forwards, ms\n",
            "| busy threads | switch ms | eager ms | graph ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        print("\n".join(lines), flush=True)
        out = args.out.open("a") if args.out is not None else None
        if out is not None:  # each row as it is measured: a time cap keeps what was done
            out.write("\n".join(lines) + "\n")
            out.flush()
        switches = [float(ms) for ms in args.switch_ms.split(",")]
        counts = [int(k) for k in args.busy.split(",")]
        cases = [("none", None, 0, switches[0])] + [
            (label, busy, count, switch)
            for switch in switches
            for label, busy in (("in C, GIL released", _c_busy), ("in Python, GIL held", _python_busy))
            for count in counts
            if busy is _python_busy or switch == switches[0]  # threads in C hold no GIL to hand over
        ]
        default_switch = sys.getswitchinterval()
        for label, busy, count, switch in cases:
            sys.setswitchinterval(switch / 1000)
            stop = threading.Event()
            threads = [threading.Thread(target=busy, args=(stop,), daemon=True) for _ in range(count)]
            for thread in threads:
                thread.start()
            try:
                graph_ms = "-" if graph is None else f"{_median_ms(graph, args.device, args.repeats):.1f}"
                row = f"| {count} {label} | {switch:g} | {_median_ms(eager, args.device, args.repeats):.1f} | {graph_ms} |"
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
                sys.setswitchinterval(default_switch)
            print(row, flush=True)
            if out is not None:
                out.write(row + "\n")
                out.flush()
        if args.cost_threads:
            switch_list = " | ".join(f"{ms:g} ms" for ms in switches)
            table = ["", "Python work of N busy threads, no forward (million loop steps/s; best of 3)\n",
                     f"| threads | {switch_list} |", "| --- |" + " ---: |" * len(switches)]
            for threads in (int(n) for n in args.cost_threads.split(",")):
                rates = [max(_python_rate(threads, ms) for _ in range(3)) for ms in switches]
                table.append(f"| {threads} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |")
            print("\n".join(table), flush=True)
            if out is not None:
                out.write("\n".join(table) + "\n")
    if out is not None:
        out.close()


if __name__ == "__main__":
    main()
