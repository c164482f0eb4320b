"""Secrets out of text that is logged or returned: URL passwords, signed query strings, keys.

One function, :func:`redact`, used wherever a URI, URL or error message goes into a log line or
a result. It removes what has the shape of a secret (the password in ``scheme://user:pass@host``,
the query string of a URL that carries a signature or token, AWS access key ids, ``key=value``
pairs whose key names a secret) and the literal values of the secrets this process was given
(``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, the broker's, result backend's and result
cache's passwords): log lines through :class:`RedactingFilter`, results through
:func:`redact_known`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s/]*)@")
# A query string with a signature, credential or token in it (presigned S3, SAS, signed CDN URLs).
_SIGNED_QUERY = re.compile(
    r"\?(?P<query>[^\s\"'<>]*?(?:signature|credential|security-token|token|sig|key|password|"
    r"secret|expires|auth)[^\s\"'<>]*)",
    re.IGNORECASE,
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_PAIR = re.compile(
    r"(?P<key>\b[\w-]*(?:secret|password|passwd|token|signature)[\w-]*\b\s*[=:]\s*)"
    r"(?P<value>[\"']?)[^\s\"'&,;]+(?P=value)",
    re.IGNORECASE,
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_URL_SETTINGS = ("REALSCORE_BROKER_URL", "REALSCORE_RESULT_BACKEND", "REALSCORE_CACHE_URL")
_MIN_LITERAL = 4  # shorter "secrets" would blank out ordinary words


def url_password(url: str) -> str | None:
    """The password in ``url``'s userinfo, decoded, or None."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def known_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values this process holds, from its environment (where every setting comes
    from): AWS keys, the passwords in the broker, result backend and result cache URLs."""
    environ = os.environ if environ is None else environ
    found = [environ[name] for name in _SECRET_ENV if environ.get(name)]
    for name in _URL_SETTINGS:
        password = url_password(environ.get(name, ""))
        if password:
            found.append(password)
    return found


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret-shaped part and every literal in ``secrets`` replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _SIGNED_QUERY.sub(f"?{MASK}", text)
    text = _AWS_KEY_ID.sub(MASK, text)
    text = _SECRET_PAIR.sub(lambda m: f"{m['key']}{MASK}", text)
    literals = _literals(tuple(secrets))
    return literals.sub(MASK, text) if literals else text


@functools.lru_cache(maxsize=16)
def _literals(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern for the secrets (built once per set of them, not per line or result), longest
    first, each only where it stands alone: a weak password such as RabbitMQ's "guest" must not
    turn /data/guestbook.png into /data/***book.png."""
    kept = sorted({s for s in secrets if len(s) >= _MIN_LITERAL}, key=len, reverse=True)
    if not kept:
        return None
    return re.compile(rf"(?<![0-9A-Za-z])(?:{'|'.join(map(re.escape, kept))})(?![0-9A-Za-z])")


def redact_known(text: str) -> str:
    """:func:`redact` with this process's :func:`known_secrets`, read now: what logs remove."""
    values = tuple(os.environ.get(name, "") for name in (*_SECRET_ENV, *_URL_SETTINGS))
    return redact(text, _secrets_of(values))


@functools.lru_cache(maxsize=16)
def _secrets_of(values: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`known_secrets` of these settings' values, parsed once per set of values."""
    return tuple(known_secrets(dict(zip((*_SECRET_ENV, *_URL_SETTINGS), values))))


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's final message (arguments and traceback too)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        cleaned = redact(message, self.secrets)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger: logging.Logger | None = None, secrets: Iterable[str] | None = None) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to every handler of ``logger`` (the root by default)."""
    logger = logger or logging.getLogger()
    chosen = RedactingFilter(known_secrets() if secrets is None else secrets)
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(chosen)
    return chosen
