"""S3 over HTTP: moto's standalone server (``s3_endpoint``), the real worker, the real boto3.

Nothing is patched: the worker subprocess reaches moto through ``REALSCORE_S3_ENDPOINT_URL`` exactly
as it would reach MinIO or AWS. The unit tests of :class:`worker.serving.sources.Sources` use the same
server.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from shared import client
from tests.tiny_clip import noise_image
from worker.serving.sources import CHUNK_BYTES, Sources

SCORE_TOLERANCE = 1e-4


def _png(seed: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class Bucket:
    name: str
    local: dict[str, Path]  # key -> the same bytes in a file the worker may read

    def uri(self, key: str) -> str:
        return f"s3://{self.name}/{key}"


@pytest.fixture(scope="module")
def s3(s3_endpoint: str):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture(scope="module")
def bucket(s3, served_dir: Path) -> Bucket:
    """A bucket of PNGs and JPEGs (and a denied ``private/`` prefix), mirrored in ``served_dir``."""
    name = f"realscore-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    objects = {
        "photos/a.png": _png(101, (300, 260)),
        "photos/b.jpg": _jpeg(102, (640, 480)),
        "photos/día 1 #2.jpeg": _jpeg(103, (200, 500)),  # a key that is not URL-safe
        "private/secret.png": _png(104, (224, 224)),
    }
    folder = served_dir / f"s3-mirror-{name}"
    folder.mkdir()
    local = {}
    for index, (key, data) in enumerate(objects.items()):
        s3.put_object(Bucket=name, Key=key, Body=data)
        path = folder / f"{index}-{Path(key).name}"
        path.write_bytes(data)
        local[key] = path
    policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{name}/private/*",
        }],
    }
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
    # The access_denied test means something only if moto's server enforces the policy.
    with pytest.raises(ClientError) as denied:
        s3.get_object(Bucket=name, Key="private/secret.png")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert s3.get_object(Bucket=name, Key="photos/a.png")["Body"].read() == objects["photos/a.png"]
    return Bucket(name, local)


PUBLIC_KEYS = ["photos/a.png", "photos/b.jpg", "photos/día 1 #2.jpeg"]


# Through the worker ------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_images_score_like_the_same_bytes_from_local_files(worker, bucket: Bucket) -> None:
    s3_uris = [bucket.uri(key) for key in PUBLIC_KEYS]
    local_uris = [str(bucket.local[key]) for key in PUBLIC_KEYS]

    from_s3 = client.score_many(s3_uris, timeout=60)
    from_files = client.score_many(local_uris, timeout=60)
    single = client.score(s3_uris[1], timeout=60)  # the realscore.score task, too

    assert [r["uri"] for r in from_s3] == s3_uris
    for s3_result, file_result in zip(from_s3, from_files):
        assert s3_result["ok"], s3_result
        assert file_result["ok"], file_result
        assert s3_result["sha256"] == file_result["sha256"]
        assert s3_result["score"] == pytest.approx(file_result["score"], abs=SCORE_TOLERANCE)
        assert s3_result["label"] == file_result["label"]
        assert -1.0 <= s3_result["score"] <= 1.0
    assert single["ok"] and single["uri"] == s3_uris[1]
    assert single["score"] == pytest.approx(from_files[1]["score"], abs=SCORE_TOLERANCE)


@pytest.mark.integration
def test_s3_errors_have_their_codes_and_spare_their_neighbours(worker, bucket: Bucket) -> None:
    cases = [
        (bucket.uri("photos/a.png"), None),
        (bucket.uri("photos/missing.png"), "not_found"),
        (f"s3://realscore-missing-{uuid.uuid4().hex[:12]}/x.png", "not_found"),
        (bucket.uri("private/secret.png"), "access_denied"),
        (f"s3://{bucket.name}", "bad_uri"),
        (f"s3://{bucket.name}/", "bad_uri"),
        (bucket.uri("photos/b.jpg"), None),
    ]
    results = client.score_many([uri for uri, _ in cases], timeout=60)

    assert [r["uri"] for r in results] == [uri for uri, _ in cases]
    for (uri, code), result in zip(cases, results):
        if code is None:
            assert result["ok"] and result["error"] is None, result
            assert isinstance(result["score"], float)
        else:
            assert not result["ok"] and result["score"] is None, result
            assert result["error"]["code"] == code, (uri, result["error"])
    # One image through realscore.score as well: a 403 is access_denied there too.
    denied = client.score(bucket.uri("private/secret.png"), timeout=60)
    assert denied["error"]["code"] == "access_denied"


# Sources against the same server (no worker) -----------------------------------------------------


class _CountingBody:
    """Wraps a botocore StreamingBody and counts the bytes actually read from it."""

    def __init__(self, body) -> None:
        self._body = body
        self.bytes_read = 0
        self.closed = False

    def read(self, amount: int | None = None) -> bytes:
        chunk = self._body.read(amount)
        self.bytes_read += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True
        self._body.close()


class _InstrumentedClient:
    """The real boto3 client; ``get_object`` hands back a counting body (and can hide the length,
    as a chunked response would, to reach the read loop's own cap)."""

    def __init__(self, real, hide_length: bool) -> None:
        self._real = real
        self._hide_length = hide_length
        self.bodies: list[_CountingBody] = []

    def get_object(self, **kwargs):
        response = self._real.get_object(**kwargs)
        response["Body"] = _CountingBody(response["Body"])
        self.bodies.append(response["Body"])
        if self._hide_length:
            response.pop("ContentLength", None)
        return response


def _sources(endpoint: str, **overrides) -> Sources:
    options = dict(local_roots=[], max_bytes=50 << 20, timeout=20.0, s3_endpoint_url=endpoint)
    options.update(overrides)
    return Sources(**options)


@pytest.fixture(scope="module")
def big_object(s3, bucket: Bucket) -> tuple[str, int]:
    key, size = "big/blob.bin", 4 * CHUNK_BYTES + 123
    s3.put_object(Bucket=bucket.name, Key=key, Body=b"\0" * size)
    return bucket.uri(key), size


@pytest.mark.parametrize("hide_length", [False, True], ids=["content-length", "read-loop"])
def test_too_large_object_is_refused_without_reading_it_whole(
    s3_endpoint: str, big_object: tuple[str, int], hide_length: bool
) -> None:
    from shared.errors import ErrorCode, ScoringError

    uri, size = big_object
    max_bytes = CHUNK_BYTES + CHUNK_BYTES // 2
    sources = _sources(s3_endpoint, max_bytes=max_bytes)
    instrumented = _InstrumentedClient(sources.s3, hide_length)
    sources._s3 = instrumented

    with pytest.raises(ScoringError) as refused:
        sources.fetch(uri)

    assert refused.value.code is ErrorCode.TOO_LARGE
    (body,) = instrumented.bodies
    assert body.closed
    if hide_length:  # the read loop stops at the first chunk past the limit
        assert max_bytes < body.bytes_read <= max_bytes + CHUNK_BYTES < size
    else:  # the declared length is enough: not one byte is read
        assert body.bytes_read == 0


def test_object_at_the_limit_is_fetched(s3_endpoint: str, s3, bucket: Bucket) -> None:
    data = b"x" * 5000
    s3.put_object(Bucket=bucket.name, Key="limit/exact.bin", Body=data)
    assert _sources(s3_endpoint, max_bytes=len(data)).fetch(bucket.uri("limit/exact.bin")) == data


def test_sources_build_one_s3_client_with_a_pool_for_every_thread(s3_endpoint: str) -> None:
    threads = 24
    sources = _sources(s3_endpoint, max_pool_connections=threads)
    barrier = threading.Barrier(threads)
    seen: list[int] = []

    def first_fetch() -> None:
        barrier.wait()  # all threads reach the lazily built client together
        seen.append(id(sources.s3))

    workers = [threading.Thread(target=first_fetch) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()

    assert len(seen) == threads and len(set(seen)) == 1
    assert sources.s3.meta.config.max_pool_connections == threads
    assert _sources(s3_endpoint).s3 is not sources.s3  # one per instance, not a global


def test_scoring_service_pools_a_connection_per_fetching_thread(loaded_model, s3_endpoint: str) -> None:
    from shared.settings import load_settings
    from worker.serving.service import ScoringService

    settings = load_settings(max_batch_size=8, s3_endpoint_url=s3_endpoint)
    service = ScoringService(loaded_model, settings)
    try:
        pool = service.sources.s3.meta.config.max_pool_connections
        # Celery's task threads (`score`) and the service's fetch pools (`score_many`, one per
        # lane) fetch at once.
        fetch_threads = settings.task_concurrency + sum(p.max_threads for p in service._pools.values())
        assert pool >= fetch_threads
    finally:
        service.stop()


def test_an_objects_declared_size_is_reserved_before_its_body_is_read(
    s3_endpoint: str, s3, bucket: Bucket
) -> None:
    from shared.errors import ErrorCode, ScoringError

    data = bytes(range(256)) * 40
    s3.put_object(Bucket=bucket.name, Key="reserve/a.bin", Body=data)
    reserved: list[int] = []
    sources = _sources(s3_endpoint)
    assert sources.fetch(bucket.uri("reserve/a.bin"), lambda size, deadline: reserved.append(size)) == data
    assert reserved == [len(data)]

    def full(size: int, deadline: float) -> None:
        raise TimeoutError("no room")

    with pytest.raises(ScoringError) as caught:
        sources.fetch(bucket.uri("reserve/a.bin"), full)
    assert caught.value.code is ErrorCode.FETCH_TIMEOUT
    assert "REALSCORE_MAX_FETCH_BYTES" in caught.value.message
