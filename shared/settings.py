"""All configuration, read once from ``REALSCORE_*`` environment variables.

One pydantic-settings class serves the web backend, the worker and the command line, so a value
means the same thing everywhere. A bad value stops start-up with one line naming the variable
(:func:`load_settings` turns pydantic's report into :class:`SettingsError`), and so does an
unknown ``REALSCORE_*`` variable (a misspelt setting would otherwise be ignored silently; the
message names the closest real one). ``REALSCORE_TEST_*`` is reserved for the test suite.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.buckets import ANY_BUCKET, is_plain_bucket

ENV_PREFIX = "REALSCORE_"
# Variables the test suite sets for itself (e.g. REALSCORE_TEST_REDIS_DB); never a setting.
TEST_PREFIX = ENV_PREFIX + "TEST_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_FIELD_IN_MESSAGE = re.compile(r'field "(\w+)"')


class SettingsError(ValueError):
    """A setting has a value we cannot run with; the message names the variable."""


class Settings(BaseSettings):
    """Every ``REALSCORE_*`` variable, with defaults for one machine with Redis on localhost."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Broker and results.
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/0"
    result_expires: int = Field(86_400, ge=60, description="seconds a result stays in the backend")
    visibility_timeout: int = Field(
        900, ge=10, description="seconds before Redis redelivers an unacknowledged message"
    )
    max_attempts: int = Field(3, ge=1, le=100, description="deliveries of one task before giving up")
    forward_timeout: float = Field(
        300.0, gt=0, description="seconds one forward pass may run before the worker is declared hung"
    )

    # Model.
    model: str = "openai/clip-vit-large-patch14"
    head_weights: Path = Path("weights/modelo_final.pth")
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    decode: Literal["auto", "exact", "tensor", "gpu"] = Field(
        "auto", description="preprocessing mode; auto: gpu on CUDA with torchvision, else exact"
    )
    compile: Literal["off", "cuda-graphs", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="cuda-graphs: the tower captured as CUDA graphs; else a torch.compile mode; "
        "either way warmed up at start over fixed batch sizes",
    )

    # Batching and worker threads.
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    switch_interval_ms: float = Field(
        5.0,
        ge=0.01,
        le=100,
        description="the process's GIL switch interval (sys.setswitchinterval), set when scoring "
        "starts: how long the batcher thread may wait for a busy thread to let the GIL go; "
        "5 is CPython's own",
    )
    concurrency: int | None = Field(
        None, ge=1, le=4096, description="task threads; default 4 x MAX_BATCH_SIZE"
    )
    max_pending_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="image bytes in flight per worker process; default max(1 GiB, 128 MiB x cores)",
    )
    max_fetch_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="fetched (compressed) bytes per worker process from before their read until "
        "their decode is counted; default max(512 MiB, 2 x MAX_IMAGE_BYTES)",
    )
    bulk_task_slots: int = Field(
        4, ge=1, le=4096, description="bulk chunks one worker process works on at once"
    )
    malloc_trim_interval: float = Field(
        30.0,
        ge=0,
        description="seconds between malloc_trim(0) calls handing freed heap pages back; 0 is off",
    )

    # Inputs.
    local_roots: list[Path] = Field(default_factory=list)
    max_image_bytes: int = Field(50 << 20, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    fetch_timeout: float = Field(30.0, gt=0)
    s3_endpoint_url: str | None = None
    s3_buckets: list[str] = Field(
        default_factory=list,
        description='buckets s3:// URIs may name; empty refuses s3:// (fail closed); ["*"] any',
    )
    result_sha256: bool = Field(True, description="put the image's sha256 in score results")

    # Verdicts.
    threshold: float = Field(0.0, ge=-1.0, le=1.0)
    high_score_means: Literal["real", "ai"] = "real"

    # Operations.
    metrics_port: int | None = Field(None, ge=1, le=65535)

    # Result cache (off when empty). Keep it off the queues' Redis, or at least give it its own
    # database: every key has a TTL, and the queues' Redis must run with noeviction.
    cache_url: str | None = None
    cache_ttl: int = Field(
        7 * 86_400, ge=1, description="seconds a cached score lives (every key has this TTL)"
    )

    @field_validator("device")
    @classmethod
    def _device_is_known(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("s3_endpoint_url", "cache_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _tls_is_verified(cls, value: str) -> str:
        # Without ssl_cert_reqs kombu connects to a rediss:// broker with CERT_NONE (no check of
        # the server's certificate) and Celery's backend refuses to start: ask for it up front.
        if value.lower().startswith("rediss://") and "ssl_cert_reqs=" not in value:
            raise ValueError(
                "a rediss:// URL needs ?ssl_cert_reqs=required (and &ssl_ca_certs=/path/ca.pem "
                "for a private CA)"
            )
        return value

    @field_validator("s3_buckets")
    @classmethod
    def _plain_bucket_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not is_plain_bucket(name):
                raise ValueError(
                    f"{name!r} is not a plain bucket name (no ARNs, access points or aliases)"
                )
        return value

    @property
    def pending_bytes(self) -> int:
        """The pixel budget: room for a rotated 12-MP JPEG decode per core (~105 MiB with its
        compressed bytes), and never under 1 GiB."""
        return self.max_pending_bytes or max(1 << 30, (os.cpu_count() or 1) * (128 << 20))

    @property
    def fetch_bytes(self) -> int:
        """The fetch budget: room for two of the largest files at least, so one never waits
        alone behind the cap."""
        return self.max_fetch_bytes or max(512 << 20, 2 * self.max_image_bytes)

    @property
    def task_concurrency(self) -> int:
        """Task threads per worker process: each in-flight image holds one."""
        return self.concurrency or 4 * self.max_batch_size


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{ENV_PREFIX}{field.upper()}: {first['msg']}{more}"


def known_variables() -> set[str]:
    """Every ``REALSCORE_*`` name a setting reads, derived from the class (never a hand list)."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def check_unknown_variables(environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`SettingsError` naming the first ``REALSCORE_*`` variable that is no setting,
    and the closest real one."""
    environ = os.environ if environ is None else environ
    known = known_variables()
    unknown = sorted(
        name
        for name in (key.upper() for key in environ)
        if name.startswith(ENV_PREFIX) and not name.startswith(TEST_PREFIX) and name not in known
    )
    if not unknown:
        return
    first = unknown[0]
    close = difflib.get_close_matches(first, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else " (README lists the settings)"
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
    raise SettingsError(f"{first}: not a realscore setting{hint}{more}")


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus ``overrides``); raise :class:`SettingsError` on a bad value or
    an unknown ``REALSCORE_*`` variable."""
    check_unknown_variables()
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None
    except ValueError as error:  # pydantic-settings' own JSON parsing of list variables
        field = _FIELD_IN_MESSAGE.search(str(error))
        if field is None:
            raise SettingsError(str(error).splitlines()[0]) from None
        raise SettingsError(
            f"{ENV_PREFIX}{field.group(1).upper()}: not valid JSON (list settings take a JSON "
            "array, e.g. '[\"/data/media\"]')"
        ) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return load_settings()
