"""``realscore worker --procs-per-gpu N``: N real worker processes, each with its own node name,
model and batcher, that serve, fail and stop together — and share the result cache (the cache's
integration test lives here: one worker group start serves both)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import redis
from celery.utils.nodenames import host_format

from shared.cli import UsageError
from shared.settings import load_settings
from shared.task_names import SCORE, SCORE_MANY
from tests.processes import WorkerProcess, wait_until
from tests.tiny_clip import noise_image
from tests.worker_helpers import app_for, private_redis
from worker.serving.cache import KEY_PREFIX
from worker.serving.run_worker import plan_children, user_node_name

START_TIMEOUT = 120
CACHE_TTL = 3600


def _env(worker_env: dict, url: str, **extra: str) -> dict:
    env = {**worker_env, "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url, **extra}
    env.pop("REALSCORE_METRICS_PORT", None)
    return env


def test_each_child_gets_its_own_node_name_and_metrics_port() -> None:
    settings = load_settings(metrics_port=9100)
    plan = plan_children([0, 1], 2, ["-n", "api@box"], settings)
    assert [c.node for c in plan] == ["api-gpu0-0@box", "api-gpu0-1@box", "api-gpu1-0@box", "api-gpu1-1@box"]
    assert [c.metrics_port for c in plan] == [9100, 9101, 9102, 9103]
    assert [c.gpu for c in plan] == [0, 0, 1, 1]
    # One process per GPU keeps the names it always had.
    assert [c.node for c in plan_children([0, 1], 1, [], settings)] == ["gpu0@%h", "gpu1@%h"]
    assert [c.metrics_port for c in plan_children([0, 1], 1, [], settings)] == [9100, 9101]
    # Without --gpus: N processes on the configured device.
    unpinned = plan_children([None], 3, [], load_settings())
    assert [c.node for c in unpinned] == ["proc0@%h", "proc1@%h", "proc2@%h"]
    assert {c.gpu for c in unpinned} == {None} and {c.metrics_port for c in unpinned} == {None}
    with pytest.raises(UsageError, match="REALSCORE_METRICS_PORT"):
        plan_children([None], 2, [], load_settings(metrics_port=65535))


def test_the_callers_node_name_is_found_in_every_spelling() -> None:
    assert user_node_name(["--concurrency", "4"]) is None
    assert user_node_name(["-n", "a@b", "--hostname", "c@d"]) == "c@d"
    assert user_node_name(["--hostname=e@f"]) == "e@f"
    assert user_node_name(["-ng@h"]) == "g@h"
    # What Celery's own parser reads, which a hand parser got wrong: a flag clustered with -n, a
    # -n after "--" (no option any more), a bare name (Celery: host NAME, node celery@NAME).
    assert user_node_name(["-En", "x@y"]) == "x@y"
    assert user_node_name(["--", "-n", "z@z"]) is None
    assert user_node_name(["-n", "api"]) == "celery@api"
    extra = ["--concurrency", "4", "-n", "a@b"]
    user_node_name(extra)
    assert extra == ["--concurrency", "4", "-n", "a@b"]  # click consumes what it parses: a copy


def test_children_are_named_as_celery_names_the_callers_node() -> None:
    settings = load_settings()
    here = host_format("%h")
    assert [c.node for c in plan_children([None], 2, ["-n", "api@%h"], settings)] == [
        f"api-0@{here}", f"api-1@{here}"
    ]
    # As `realscore worker -n api` is node celery@api, its processes are celery-0@api, ...
    assert [c.node for c in plan_children([0], 2, ["-n", "api"], settings)] == [
        "celery-gpu0-0@api", "celery-gpu0-1@api"
    ]


@pytest.mark.integration
def test_two_processes_answer_ping_score_share_the_cache_and_stop_together_on_sigterm(
    worker_env: dict, served_dir: Path, tmp_path: Path
) -> None:
    images = []
    for i in range(6):
        path = served_dir / f"procs-{i}.png"
        noise_image(500 + i, (80, 60)).save(path)
        images.append(str(path))
    renamed = served_dir / "procs-0-the-same-bytes-under-another-name.png"
    shutil.copyfile(images[0], renamed)
    with private_redis() as url:
        cache_url = url.rsplit("/", 1)[0] + "/1"  # its own database, never the queues'
        app = app_for(url)
        env = _env(worker_env, url, REALSCORE_CACHE_URL=cache_url, REALSCORE_CACHE_TTL=str(CACHE_TTL))
        group = WorkerProcess(env, tmp_path / "group.log", ["--procs-per-gpu", "2"])
        name, host = group.node.split("@")
        nodes = [f"{name}-0@{host}", f"{name}-1@{host}"]
        group.start()
        try:
            def both_answer() -> bool:
                if group.process.poll() is not None:
                    raise RuntimeError(f"exited with {group.process.returncode}:\n{group.log()}")
                replies = app.control.ping(destination=nodes, timeout=0.5)
                return {node for reply in replies for node in reply} == set(nodes)

            wait_until(both_answer, START_TIMEOUT, "both worker processes answer ping")
            stats = app.control.inspect(destination=nodes, timeout=5).stats()
            pids = {node: stats[node]["pid"] for node in nodes}
            assert len(set(pids.values())) == 2, pids
            assert group.process.pid not in pids.values()

            singles = [app.send_task(SCORE, args=[uri]) for uri in images]
            results = [handle.get(timeout=60) for handle in singles]
            many = app.send_task(SCORE_MANY, args=[images]).get(timeout=60)
            again = app.send_task(SCORE, args=[str(renamed)]).get(timeout=60)
            totals = app.control.inspect(destination=nodes, timeout=5).stats()

            group.process.send_signal(signal.SIGTERM)
            code = group.process.wait(60)
        finally:
            group.stop()
        cache, queues = redis.Redis.from_url(cache_url), redis.Redis.from_url(url)
        ttls = [cache.ttl(key) for key in cache.keys(f"{KEY_PREFIX}*")]
        assert queues.keys(f"{KEY_PREFIX}*") == []
        cache.close()
        queues.close()

    assert code == 0, group.log()
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by the supervisor: neither child outlives it
    served = sum(sum(totals[node].get("total", {}).values()) for node in nodes)
    assert served == len(images) + 2
    assert all(r["ok"] and not r["cached"] for r in results), results
    # Scored once: the same bytes again (under another URI too) come from the cache.
    assert all(r["ok"] and r["cached"] for r in many + [again]), many + [again]
    assert [r["score"] for r in many] == [r["score"] for r in results]
    assert again["uri"] == str(renamed) and again["score"] == results[0]["score"]
    assert again["label"] == results[0]["label"]
    assert len(ttls) == len(images) and all(0 < ttl <= CACHE_TTL for ttl in ttls), ttls


@pytest.mark.integration
def test_a_child_that_fails_is_reported_and_stops_the_group(worker_env: dict, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # The supervisor checks the model files, not the device: each child fails as it loads.
    with private_redis() as url:
        group = WorkerProcess(
            _env(worker_env, url, REALSCORE_DEVICE="cuda"),
            tmp_path / "failing.log",
            ["--procs-per-gpu", "2"],
        ).start()
        try:
            code = group.process.wait(START_TIMEOUT)
        finally:
            group.stop()
    log = group.log()
    assert code != 0, log
    name = group.node.split("@")[0]
    # A model that cannot load (here: no CUDA) is a configuration error: exit 2 (README).
    assert f"realscore worker: {name}-" in log and "exited with code 2" in log, log
    assert "CUDA is not available" in log, log
