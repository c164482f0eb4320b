"""The stable per-image error codes of the result contract, and the exception that carries one."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Codes clients branch on: never rename one, only add."""

    BAD_URI = "bad_uri"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    FORBIDDEN_PATH = "forbidden_path"
    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"
    FETCH_TIMEOUT = "fetch_timeout"
    OUT_OF_MEMORY = "out_of_memory"
    BAD_REQUEST = "bad_request"
    # The source, not this image: the worker's S3 credentials, region or endpoint are missing or
    # wrong, or the endpoint is down. The message says what to set; other images fail alike.
    SOURCE_UNAVAILABLE = "source_unavailable"
    INTERNAL = "internal"


class ScoringError(Exception):
    """One image could not be scored; becomes an error result, never a failed task."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ScoringError({self.code.value!r}, {self.message!r})"
