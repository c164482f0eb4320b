"""The result dict every scoring path returns (worker, embedded CLI, evaluate).

Only the raw score is ever cached or computed by the model; label and threshold are applied here,
when a result is produced, from the settings in force.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from shared.errors import ErrorCode, ScoringError
from shared.redact import redact_known

Label = Literal["real", "ai"]


class ErrorInfo(TypedDict):
    code: str
    message: str


class Result(TypedDict):
    uri: str
    ok: bool
    score: float | None
    label: Label | None
    threshold: float
    model: str
    error: ErrorInfo | None
    sha256: str | None
    elapsed_ms: float
    cached: bool


def label_for(score: float, threshold: float, high_score_means: Label) -> Label:
    """Above the threshold means ``high_score_means``; at or below it, the other class."""
    low: Label = "ai" if high_score_means == "real" else "real"
    return high_score_means if score > threshold else low


@dataclass(frozen=True)
class ResultFactory:
    """Builds results stamped with one model identity and one decision rule.

    ``include_sha256=False`` (``REALSCORE_RESULT_SHA256=false``) leaves ``sha256`` null, so that
    whoever can enqueue cannot confirm an object's contents from its hash. Error results redact
    their ``uri`` and message as logs are redacted (:func:`shared.redact.redact_known`: secret
    shapes and the literal secrets this process was configured with): a presigned URL, a password
    sent by mistake or a configured secret quoted in an exception is never served, nor echoed
    into the result backend.
    """

    model: str
    threshold: float = 0.0
    high_score_means: Label = "real"
    include_sha256: bool = True

    def ok(
        self,
        uri: str,
        score: float,
        *,
        sha256: str | None,
        elapsed_ms: float,
        cached: bool = False,
    ) -> Result:
        return Result(
            uri=uri,
            ok=True,
            score=float(score),
            label=label_for(score, self.threshold, self.high_score_means),
            threshold=self.threshold,
            model=self.model,
            error=None,
            sha256=sha256 if self.include_sha256 else None,
            elapsed_ms=round(elapsed_ms, 3),
            cached=cached,
        )

    def error(
        self,
        uri: Any,
        code: ErrorCode,
        message: str,
        *,
        sha256: str | None = None,
        elapsed_ms: float = 0.0,
    ) -> Result:
        return Result(
            uri=redact_known(uri if isinstance(uri, str) else repr(uri)),
            ok=False,
            score=None,
            label=None,
            threshold=self.threshold,
            model=self.model,
            error=ErrorInfo(code=code.value, message=redact_known(message)),
            sha256=sha256 if self.include_sha256 else None,
            elapsed_ms=round(elapsed_ms, 3),
            cached=False,
        )

    def from_exception(
        self, uri: Any, exc: BaseException, *, sha256: str | None = None, elapsed_ms: float = 0.0
    ) -> Result:
        """A :class:`ScoringError` keeps its code; anything else is ``internal``."""
        if isinstance(exc, ScoringError):
            return self.error(uri, exc.code, exc.message, sha256=sha256, elapsed_ms=elapsed_ms)
        return self.error(
            uri,
            ErrorCode.INTERNAL,
            f"{type(exc).__name__}: {exc}",
            sha256=sha256,
            elapsed_ms=elapsed_ms,
        )
