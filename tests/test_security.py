"""Hostile input and access: deadlines that hold, allow-lists that fail closed, settings that
cannot be misspelt, hashes an operator can turn off, secrets that never reach logs or results.

The slow-drip tests run a real HTTP server on a loopback port as the S3 endpoint, so the real
boto3/urllib3 stack reads from a real socket (a faked ``read()`` that returns at once is what hid
the drip before).
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ErrorCode, ScoringError
from shared.redact import MASK, RedactingFilter, known_secrets, redact
from shared.results import ResultFactory
from shared.settings import SettingsError, check_unknown_variables, known_variables, load_settings
from worker.serving.sources import Sources, parse_uri

FETCH_TIMEOUT = 2.0
# Generous: the old read loop held a dripping fetch for the whole object (hours at this rate).
DEADLINE_SLACK_S = 5.0


# A dripping S3 endpoint ---------------------------------------------------------------------------


class _Drip(http.server.BaseHTTPRequestHandler):
    """Answers every GetObject slowly: headers then one byte per interval, or the headers
    themselves one byte at a time (``server.drip_headers``)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.server
        headers = (
            "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
            f"Content-Length: {server.body_bytes}\r\nETag: \"1\"\r\n\r\n"
        ).encode()
        try:
            if server.drip_headers:
                for byte in headers:
                    if server.stop.wait(server.interval):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            else:
                self.wfile.write(headers)
                self.wfile.flush()
            for _ in range(min(server.body_bytes, server.send_bytes)):
                if server.stop.wait(server.interval):
                    return
                self.wfile.write(b"\x89")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what it should do
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture()
def dripping_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[http.server.ThreadingHTTPServer]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "drip", "AWS_SECRET_ACCESS_KEY": "drip", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    server.body_bytes, server.interval, server.drip_headers = 100_000, 0.15, False
    server.send_bytes = server.body_bytes
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("drip_headers", [False, True], ids=["body", "headers"])
def test_slow_drip_s3_endpoint_ends_in_fetch_timeout_by_the_deadline(
    dripping_endpoint: http.server.ThreadingHTTPServer, drip_headers: bool
) -> None:
    dripping_endpoint.drip_headers = drip_headers
    endpoint = f"http://127.0.0.1:{dripping_endpoint.server_address[1]}"
    sources = Sources(
        local_roots=[], max_bytes=1 << 20, timeout=FETCH_TIMEOUT, s3_endpoint_url=endpoint,
        s3_buckets=["media"],
    )
    started = time.monotonic()
    with pytest.raises(ScoringError) as caught:
        sources.fetch("s3://media/slow.png")
    elapsed = time.monotonic() - started
    assert caught.value.code is ErrorCode.FETCH_TIMEOUT, caught.value
    assert elapsed < FETCH_TIMEOUT + DEADLINE_SLACK_S, elapsed


def test_s3_fetch_reads_whole_objects_quietly(s3_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    """The deadline-aware reader gets every byte of a multi-chunk object and logs nothing."""
    import boto3

    from worker.serving.sources import CHUNK_BYTES

    data = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="realscore-quiet")
    s3.put_object(Bucket="realscore-quiet", Key="big.bin", Body=data)
    sources = Sources(local_roots=[], max_bytes=1 << 26, timeout=30, s3_endpoint_url=s3_endpoint)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the second reuses the pooled connection
            assert sources.fetch("s3://realscore-quiet/big.bin") == data
    loud = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not loud, loud


def test_s3_body_cut_short_is_source_unavailable_not_a_corrupt_image(
    dripping_endpoint: http.server.ThreadingHTTPServer,
) -> None:
    dripping_endpoint.body_bytes, dripping_endpoint.send_bytes, dripping_endpoint.interval = 1000, 10, 0
    endpoint = f"http://127.0.0.1:{dripping_endpoint.server_address[1]}"
    sources = Sources(local_roots=[], max_bytes=1 << 20, timeout=10, s3_endpoint_url=endpoint)
    with pytest.raises(ScoringError) as caught:
        sources.fetch("s3://media/short.png")
    assert caught.value.code is ErrorCode.SOURCE_UNAVAILABLE, caught.value


def test_a_fetch_blocked_in_the_kernel_costs_the_caller_only_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read on a stalled network mount blocks in the kernel and cannot be interrupted: the
    caller gets ``fetch_timeout`` at the deadline, the helper is counted until it returns, and at
    ``MAX_ABANDONED`` stuck helpers new fetches fail at once instead of piling up threads."""
    import worker.serving.deadlines as deadlines
    import worker.serving.sources as sources_module

    (tmp_path / "a.png").write_bytes(b"png")
    release = threading.Event()
    real_read = sources_module._read_capped

    def stalled(stream, max_bytes, deadline, what):  # like read(2) on a hung NFS mount
        release.wait(60)
        return real_read(stream, max_bytes, deadline, what)

    from tests.processes import wait_until

    # Helpers left by other tests (the header drip) end on their own; start from none.
    wait_until(lambda: sources_module.abandoned_fetches() == 0, 30, "earlier fetch helpers done")
    monkeypatch.setattr(sources_module, "_read_capped", stalled)
    monkeypatch.setattr(deadlines, "MAX_ABANDONED", 1)
    sources = Sources(local_roots=[tmp_path], max_bytes=100, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(ScoringError) as caught:
            sources.fetch(str(tmp_path / "a.png"))
        assert caught.value.code is ErrorCode.FETCH_TIMEOUT
        assert time.monotonic() - started < 0.5 + DEADLINE_SLACK_S
        with pytest.raises(ScoringError) as refused:  # the cap is reached: no new helper
            sources.fetch(str(tmp_path / "a.png"))
        assert refused.value.code is ErrorCode.FETCH_TIMEOUT
        assert "still stuck" in refused.value.message
    finally:
        release.set()
    wait_until(lambda: sources_module.abandoned_fetches() == 0, 10, "the stalled helper done")
    monkeypatch.setattr(sources_module, "_read_capped", real_read)
    assert sources.fetch(str(tmp_path / "a.png")) == b"png"


# Buckets: plain names only, fail closed ---------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/ap/key.png",
        "s3://arn:aws:s3-object-lambda:us-east-1:123456789012:accesspoint/olap/key.png",
        "s3://my-ap-hrzrlukc5m36ft7okagglf3gmwluquse1b-s3alias/key.png",
        "s3://my-olap-abcdef--ol-s3/key.png",
        "s3://bucket-base-name--usw2-az1--x-s3/key.png",
        "s3://mfzwi23gnjvgw.mrap/key.png",
        "s3://192.168.5.4/key.png",
        "s3://user:pass@media/key.png",
        "s3://media:9000/key.png",
        "s3://Media/key.png",
    ],
)
def test_anything_but_a_plain_bucket_name_is_bad_uri(uri: str) -> None:
    with pytest.raises(ScoringError) as caught:
        parse_uri(uri)
    assert caught.value.code is ErrorCode.BAD_URI
    assert "user:pass" not in caught.value.message  # a user:password@ is never echoed


@pytest.mark.parametrize("value", ['["arn:aws:s3:::media"]', '["media-s3alias"]', '["Media"]'])
def test_s3_buckets_setting_takes_plain_names_only(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("REALSCORE_S3_BUCKETS", value)
    with pytest.raises(SettingsError, match="REALSCORE_S3_BUCKETS"):
        load_settings()


def test_s3_buckets_default_is_empty_and_star_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALSCORE_S3_BUCKETS", raising=False)
    assert load_settings().s3_buckets == []
    monkeypatch.setenv("REALSCORE_S3_BUCKETS", '["*", "media.example.com"]')
    assert load_settings().s3_buckets == ["*", "media.example.com"]


# Settings: an unknown REALSCORE_* stops start-up ------------------------------------------------


def test_misspelt_setting_names_the_closest_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALSCORE_S3_BUCKET", '["media"]')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("REALSCORE_S3_BUCKET:")
    assert "did you mean REALSCORE_S3_BUCKETS?" in message


def test_known_variables_come_from_the_settings_class() -> None:
    from shared.settings import Settings

    assert known_variables() == {f"REALSCORE_{name.upper()}" for name in Settings.model_fields}
    assert "REALSCORE_S3_BUCKETS" in known_variables()
    # REALSCORE_TEST_* is the test suite's own prefix: no setting may ever start with it.
    assert not any(name.startswith("REALSCORE_TEST_") for name in known_variables())


def test_test_prefix_and_other_prefixes_are_not_checked() -> None:
    check_unknown_variables({"REALSCORE_TEST_REDIS_DB": "14", "REALSCOREX": "1", "PATH": "/bin"})
    check_unknown_variables({"realscore_model": "x"})  # read case-insensitively, and known
    with pytest.raises(SettingsError, match="REALSCORE_NOTHING_LIKE_IT"):
        check_unknown_variables({"REALSCORE_NOTHING_LIKE_IT": "1"})
    with pytest.raises(SettingsError, match="REALSCORE_DEVISE.*REALSCORE_DEVICE"):
        check_unknown_variables({"realscore_devise": "cpu"})


def test_cli_stops_in_one_line_on_an_unknown_setting(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "REALSCORE_MAX_BATCHSIZE": "8"}
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "submit", str(tmp_path / "x.png")],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "REALSCORE_MAX_BATCHSIZE" in lines[0], done.stderr
    assert "REALSCORE_MAX_BATCH_SIZE" in lines[0]


def test_rediss_urls_must_ask_for_certificate_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.celery_app import configure

    monkeypatch.setenv("REALSCORE_BROKER_URL", "rediss://:pw@redis.example:6380/0")
    with pytest.raises(SettingsError, match="REALSCORE_BROKER_URL.*ssl_cert_reqs"):
        load_settings()
    url = "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required"
    monkeypatch.setenv("REALSCORE_BROKER_URL", url)
    monkeypatch.setenv("REALSCORE_RESULT_BACKEND", url)
    from celery import Celery

    app = configure(Celery("rediss-check"), load_settings())
    import ssl

    assert app.connection_for_write().ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED  # kombu verifies
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED  # and so does the backend


# What results reveal ------------------------------------------------------------------------------


def test_result_sha256_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, loaded_model, tmp_path: Path) -> None:
    from tests.tiny_clip import noise_image
    from worker.serving.service import ScoringService

    noise_image(7, (64, 48)).save(tmp_path / "a.png")
    monkeypatch.setenv("REALSCORE_RESULT_SHA256", "false")
    settings = load_settings()
    assert settings.result_sha256 is False
    service = ScoringService(loaded_model, settings, local_roots=[tmp_path]).start()
    try:
        ok, missing = service.score_uris([str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    finally:
        service.stop()
    assert ok["ok"] and ok["sha256"] is None
    assert missing["error"]["code"] == "not_found" and missing["sha256"] is None
    on = ResultFactory("m").ok("u", 0.5, sha256="ab" * 32, elapsed_ms=1)
    assert on["sha256"] == "ab" * 32  # the default keeps it


# S3 configuration problems have their own code ------------------------------------------------------


def test_s3_without_credentials_is_source_unavailable_and_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    sources = Sources(local_roots=[], max_bytes=10, timeout=5, s3_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ScoringError) as caught:
        sources.fetch("s3://media/a.png")
    assert caught.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "AWS_ACCESS_KEY_ID" in caught.value.message


def test_unreachable_s3_endpoint_is_source_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.processes import free_port

    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    sources = Sources(local_roots=[], max_bytes=10, timeout=5, s3_endpoint_url=endpoint)
    with pytest.raises(ScoringError) as caught:
        sources.fetch("s3://media/a.png")
    assert caught.value.code is ErrorCode.SOURCE_UNAVAILABLE
    assert "REALSCORE_S3_ENDPOINT_URL" in caught.value.message


# Redaction ------------------------------------------------------------------------------------------

PRESIGNED = (
    "https://media.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
)


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        (PRESIGNED, "X-Amz-Signature=0f1e"),
        (PRESIGNED, "AKIAIOSFODNN7EXAMPLE"),
        ("redis://:hunter2-broker@redis:6379/0", "hunter2-broker"),
        ("rediss://default:p%40ss@host:6380/0?ssl_cert_reqs=required", "p%40ss"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI"),
        ("key id AKIAIOSFODNN7EXAMPLE refused", "AKIAIOSFODNN7EXAMPLE"),
    ],
)
def test_redact_removes_secret_shapes(text: str, gone: str) -> None:
    cleaned = redact(text)
    assert gone not in cleaned and MASK in cleaned


def test_redact_keeps_ordinary_text_and_removes_known_literals() -> None:
    plain = "s3://media/photos/a.png: NoSuchKey"
    assert redact(plain) == plain
    env = {
        "AWS_SECRET_ACCESS_KEY": "literal-secret-value",
        "REALSCORE_BROKER_URL": "redis://:broker-pw-123@redis:6379/0",
    }
    secrets = known_secrets(env)
    assert set(secrets) == {"literal-secret-value", "broker-pw-123"}
    assert redact("failed with literal-secret-value and broker-pw-123", secrets).count(MASK) == 2


def test_known_literals_are_removed_where_they_stand_alone_not_inside_words() -> None:
    secrets = known_secrets({"REALSCORE_BROKER_URL": "amqp://guest:guest@rabbit:5672//"})
    assert secrets == ["guest"]
    assert redact("/data/guestbook.png: not found", secrets) == "/data/guestbook.png: not found"
    assert redact("login guest refused (user=guest)", secrets) == f"login {MASK} refused (user={MASK})"


def test_log_filter_redacts_messages_arguments_and_tracebacks() -> None:
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(["topsecret-literal"]))
    logger = logging.getLogger("realscore.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("connecting to %s", "redis://:pw-in-url@h:1/0")
        try:
            raise RuntimeError("boom topsecret-literal")
        except RuntimeError:
            logger.exception("failed for %s", PRESIGNED)
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    for secret in ("pw-in-url", "topsecret-literal", "X-Amz-Signature=0f1e"):
        assert secret not in output
    assert "RuntimeError" in output and "connecting to redis://" in output


def test_error_results_redact_uri_and_message() -> None:
    result = ResultFactory("m").error(PRESIGNED, ErrorCode.UNSUPPORTED_SCHEME, f"cannot fetch {PRESIGNED}")
    text = json.dumps(result)
    assert "X-Amz-Signature" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    assert result["uri"].startswith("https://media.s3.amazonaws.com/a.png?")



# A real worker and client on a password-protected Redis; its log after S3 and broker errors ---------


@pytest.mark.integration
def test_worker_and_client_on_a_password_redis_keep_secrets_out_of_logs_and_results(
    worker_env: dict, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys
    import uuid

    import redis

    from tests.processes import WorkerProcess, free_port, wait_until
    from tests.tiny_clip import noise_image
    from tests.worker_helpers import app_for, private_redis

    redis_password = f"redis-pw-{uuid.uuid4().hex}"
    aws_secret = f"aws-secret-{uuid.uuid4().hex}"
    served = tmp_path / "served"
    served.mkdir()
    noise_image(3, (96, 80)).save(served / "ok.png")
    uris = [
        str(served / "ok.png"),
        PRESIGNED,  # never fetched (https is off), and never echoed whole
        "s3://user:s3-userinfo-pw@media/a.png",
        f"s3://realscore-missing-{uuid.uuid4().hex[:10]}/a.png",
    ]
    with private_redis(password=redis_password) as url:
        host_only = url.replace(f":{redis_password}@", "")
        with pytest.raises(redis.AuthenticationError):  # it really asks for the password
            redis.Redis.from_url(host_only).ping()
        env = {
            **worker_env,
            "REALSCORE_BROKER_URL": url,
            "REALSCORE_RESULT_BACKEND": url,
            "REALSCORE_LOCAL_ROOTS": json.dumps([str(served)]),
            "REALSCORE_METRICS_PORT": str(free_port()),
            "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
            "AWS_SECRET_ACCESS_KEY": aws_secret,
        }
        process = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            process.wait_ready(app_for(url))
            # The client: `realscore submit`, i.e. shared.client on the configured app.
            done = subprocess.run(
                [sys.executable, "-m", "shared.cli", "submit", *uris, "--timeout", "60"],
                env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
            )
            assert done.returncode == 0, done.stderr
            results = [json.loads(line) for line in done.stdout.splitlines()]
            assert [r["error"]["code"] if r["error"] else None for r in results] == [
                None, "unsupported_scheme", "bad_uri", "not_found",
            ], results
            assert results[0]["ok"] and isinstance(results[0]["score"], float)
            # A broker error: Redis changes its password and drops the worker's connections; the
            # worker logs that it cannot reconnect (with the URL it uses) and keeps retrying.
            admin = redis.Redis.from_url(url)
            admin.config_set("requirepass", f"{redis_password}-rotated")
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
            wait_until(
                lambda: "Cannot connect" in process.log() or "Connection to broker lost" in process.log(),
                30, "the worker's broker error in its log",
            )
        finally:
            process.stop(timeout=20)
    log = process.log()
    secrets = [redis_password, aws_secret, "AKIAIOSFODNN7EXAMPLE", "X-Amz-Signature=0f1e", "s3-userinfo-pw"]
    for secret in secrets:
        assert secret not in done.stdout, secret
        assert secret not in log, secret


def test_error_results_remove_the_configured_secrets_as_logs_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret from the settings quoted in an exception never reaches a result."""
    secret, cache_pw, broker_pw = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY", "cache-pw-4711", "broker-pw-0815"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("REALSCORE_CACHE_URL", f"redis://:{cache_pw}@cache:6379/3")
    monkeypatch.setenv("REALSCORE_BROKER_URL", f"redis://:{broker_pw}@redis:6379/0")
    error = RuntimeError(f"signing with {secret} failed; AUTH {cache_pw} refused; then {broker_pw}")
    result = ResultFactory("m").from_exception(f"s3://media/{secret}.png", error)
    text = json.dumps(result)
    for literal in (secret, cache_pw, broker_pw):
        assert literal not in text
    assert result["error"]["message"].startswith("RuntimeError: signing with ***")
    assert result["error"]["code"] == "internal"
