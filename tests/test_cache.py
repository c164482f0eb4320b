"""The result cache: identical bytes are scored once, the key carries everything that changes the
score, threshold and label are applied on the way out, and a failing cache never fails a score.
The integration test with real worker processes is in test_procs_per_gpu.py."""

from __future__ import annotations

import io

import fakeredis
import pytest
import redis
from prometheus_client import REGISTRY

from shared.settings import load_settings
from tests.processes import free_port
from tests.tiny_clip import noise_image
from worker.serving.cache import KEY_PREFIX, ScoreCache, cache_namespace
from worker.serving.service import ScoringService

TTL = 3600


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, (96, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


def _cache(client: redis.Redis, model: str, dtype: str = "float32", decode: str = "exact") -> ScoreCache:
    return ScoreCache(client, model=model, dtype=dtype, decode_mode=decode, ttl_s=TTL)


@pytest.fixture()
def make_service(loaded_model):
    made: list[ScoringService] = []

    def make(cache: ScoreCache, **settings: object) -> ScoringService:
        service = ScoringService(
            loaded_model, load_settings(max_batch_size=4, max_wait_ms=1, **settings),
            local_roots=None, cache=cache,
        ).start()
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_key_changes_with_model_dtype_and_decode_mode_only() -> None:
    base = cache_namespace("tiny head=abc", "float16", "gpu")
    assert base == cache_namespace("tiny head=abc", "float16", "gpu")
    assert base.startswith(KEY_PREFIX)
    others = {
        cache_namespace("tiny head=abd", "float16", "gpu"),
        cache_namespace("tiny head=abc", "float32", "gpu"),
        cache_namespace("tiny head=abc", "float16", "exact"),
    }
    assert base not in others and len(others) == 3


def test_identical_bytes_are_scored_once_and_come_back_cached(make_service, loaded_model) -> None:
    client = fakeredis.FakeRedis()
    service = make_service(_cache(client, loaded_model.model_id))
    data = _png(1)

    first = service.score_bytes("s3://a/one.png", data)
    batches = service.batcher.batches_run
    second = service.score_bytes("s3://b/other-name.png", data)

    assert first["ok"] and not first["cached"], first
    assert second["ok"] and second["cached"], second
    assert service.batcher.batches_run == batches, "a cache hit ran a forward pass"
    assert second["score"] == first["score"]
    assert second["uri"] == "s3://b/other-name.png"
    assert second["sha256"] == first["sha256"]
    (key,) = client.keys(f"{KEY_PREFIX}*")
    assert key.decode().endswith(first["sha256"])
    assert 0 < client.ttl(key) <= TTL, "every cache key carries a TTL"
    assert float(client.get(key)) == first["score"]  # the raw score, nothing else


def test_threshold_and_label_are_applied_on_the_way_out(make_service, loaded_model) -> None:
    client = fakeredis.FakeRedis()
    data = _png(2)
    scored = make_service(_cache(client, loaded_model.model_id)).score_bytes("x", data)
    assert scored["ok"], scored
    score = scored["score"]
    # A threshold on the other side of the score: the same raw score must flip its label.
    flipped = score + 0.01 if scored["label"] == "real" else score - 0.01
    strict = make_service(_cache(client, loaded_model.model_id), threshold=flipped)

    again = strict.score_bytes("y", data)

    assert again["cached"] and again["score"] == score
    assert again["threshold"] == flipped
    assert again["label"] != scored["label"]


def test_another_dtype_or_decode_mode_is_a_miss(make_service, loaded_model) -> None:
    client = fakeredis.FakeRedis()
    data = _png(3)
    make_service(_cache(client, loaded_model.model_id)).score_bytes("x", data)
    for other in (
        _cache(client, loaded_model.model_id, dtype="float16"),
        _cache(client, loaded_model.model_id, decode="tensor"),
    ):
        result = make_service(other).score_bytes("x", data)
        assert result["ok"] and not result["cached"], result
    assert len(client.keys(f"{KEY_PREFIX}*")) == 3


def test_errors_are_not_cached(make_service, loaded_model) -> None:
    client = fakeredis.FakeRedis()
    service = make_service(_cache(client, loaded_model.model_id))
    for _ in range(2):
        result = service.score_bytes("x", b"not an image at all")
        assert not result["ok"] and not result["cached"]
        assert result["error"]["code"] == "not_an_image"
    assert client.keys(f"{KEY_PREFIX}*") == []


def test_a_cache_that_is_down_counts_an_error_and_scores_anyway(make_service, loaded_model) -> None:
    down = ScoreCache.from_url(
        f"redis://127.0.0.1:{free_port()}/0",
        model=loaded_model.model_id, dtype="float32", decode_mode="exact", ttl_s=TTL,
    )
    service = make_service(down)
    errors = _counter("realscore_cache_errors_total", op="get")
    lookup_errors = _counter("realscore_cache_lookups_total", outcome="error")
    batches = service.batcher.batches_run

    results = [service.score_bytes("x", _png(4)) for _ in range(2)]

    assert all(r["ok"] and not r["cached"] for r in results), results
    assert results[0]["score"] == results[1]["score"]
    assert service.batcher.batches_run == batches + 2
    assert _counter("realscore_cache_errors_total", op="get") == errors + 1  # then backs off
    assert _counter("realscore_cache_lookups_total", outcome="error") == lookup_errors  # counted once
    assert _counter("realscore_cache_lookups_total", outcome="skipped") >= 1


def test_the_setting_turns_the_cache_on(loaded_model) -> None:
    assert ScoringService(loaded_model, load_settings(cache_url=""), local_roots=None).cache is None
    service = ScoringService(
        loaded_model, load_settings(cache_url="redis://127.0.0.1:1/3", cache_ttl=60), local_roots=None
    )
    assert service.cache is not None and service.cache.ttl_s == 60
    assert service.cache.namespace == cache_namespace(service.results.model, "float32", service.decode_mode)
    service.cache.close()


def test_concurrent_copies_of_one_image_cost_one_forward(make_service, loaded_model) -> None:
    client = fakeredis.FakeRedis()
    service = make_service(_cache(client, loaded_model.model_id))
    data = _png(5)
    images = _counter("realscore_batch_size_sum")

    results = service.map(lambda i: service.score_bytes(f"copy-{i}", data), list(range(8)))

    assert all(r["ok"] for r in results), results
    assert len({r["score"] for r in results}) == 1
    assert [r["cached"] for r in results].count(False) == 1, "more than one copy was scored"
    assert _counter("realscore_batch_size_sum") == images + 1
