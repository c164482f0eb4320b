"""Per-call cost of the hot path's fetch hand-off, local fetch and pixel budget, before and after:
loads ``worker/serving/sources.py`` and ``budget.py`` from another checkout (``--before``, e.g. the
parent commit in a temporary ``git worktree``) beside this one, and times both in one process,
interleaved, best of several runs. Prints a markdown table, asserts nothing.

    git worktree add --detach /tmp/before HEAD~1
    python bench/hot_path.py --before /tmp/before --file some.jpg
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _best_us(function, calls: int, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--file", type=Path, required=True, help="a local image to fetch")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT}
    sources = {tag: _load(f"{tag}_sources", tree / "worker/serving/sources.py") for tag, tree in trees.items()}
    budgets = {tag: _load(f"{tag}_budget", tree / "worker/serving/budget.py") for tag, tree in trees.items()}
    path = str(args.file.resolve())
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, tag: str, function) -> None:
        rows.setdefault(name, {}).setdefault(tag, []).append(_best_us(function, args.calls))

    for _ in range(args.repeats):
        for tag in trees:
            module = sources[tag]
            record("hand-off of an empty job to a fetch helper", tag,
                   lambda: module._within_deadline(time.monotonic() + 10, "x", lambda: None))
            fetcher = module.Sources(local_roots=[Path(path).parent], max_bytes=1 << 26, timeout=10)
            record(f"Sources.fetch of {args.file.name} ({args.file.stat().st_size} bytes)", tag,
                   lambda: fetcher.fetch(path))
            budget = budgets[tag].SharedBudget(1 << 30)

            def cycle() -> None:
                with budget.hold(1000):
                    pass
                budget.release(budget.acquire(1000))

            record("pixel budget: hold + acquire/release, nobody waiting", tag, cycle)
    print("| operation | before µs | after µs | after/before |\n| --- | ---: | ---: | ---: |")
    for name, by_tag in rows.items():
        before, after = min(by_tag["before"]), min(by_tag["after"])
        print(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.2f} |")


if __name__ == "__main__":
    main()
