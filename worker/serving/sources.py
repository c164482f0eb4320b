"""URI -> bytes, for local files and S3, with the path and bucket policies, a size cap and one
overall deadline.

Size limits are enforced while reading (an object is never read whole to learn it is too big).
``FETCH_TIMEOUT`` is one deadline for the whole fetch, held two ways:

- S3 bodies are read with ``read1`` (whatever has arrived, not a full chunk) and the socket's
  timeout set to the time left before every read, so neither a silent nor a slow-drip endpoint
  (one byte every 200 ms never trips a per-read timeout) keeps a read going past the deadline.
- What no read loop can bound (botocore's request and its headers, a local file on a stalled
  network mount, where ``read`` blocks in the kernel and cannot be interrupted) is bounded by
  letting the blocked thread go (worker/serving/deadlines.py): a fetch runs on a reused helper
  thread the caller stops waiting for at the deadline, or, on a ``score_many`` lane thread,
  inline, and the map's consumer gives up on the lane thread instead. Either way it costs the
  image ``fetch_timeout``, not a thread; at most ``deadlines.MAX_ABANDONED`` threads are left
  blocked at once, then fetches fail fast.

Celery's time limits do nothing in the thread pool, hence all this. S3 socket timeouts are sized
so botocore's three attempts fit in ``FETCH_TIMEOUT``.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from shared.buckets import ANY_BUCKET, is_plain_bucket
from shared.errors import ErrorCode, ScoringError
from shared.redact import redact
from worker.serving import deadlines
from worker.serving.deadlines import within_deadline

Reserve = Callable[[int, float], None]  # (bytes about to be read, the fetch's deadline)

CHUNK_BYTES = 1 << 20
S3_ATTEMPTS = 3
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
# The worker's own credentials are wrong: a configuration problem, not this object's.
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


@dataclass(frozen=True)
class LocalRef:
    path: str


@dataclass(frozen=True)
class S3Ref:
    bucket: str
    key: str


def parse_uri(uri: object) -> LocalRef | S3Ref:
    """``file:///abs``, ``/abs`` or ``s3://bucket/key``; anything else is an error code."""
    if not isinstance(uri, str) or not uri.strip():
        raise ScoringError(ErrorCode.BAD_URI, f"URI must be a non-empty string, got {uri!r}")
    if "\x00" in uri:
        raise ScoringError(ErrorCode.BAD_URI, "URI contains a NUL byte")
    if uri.startswith("/"):
        return _local_ref(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ScoringError(ErrorCode.BAD_URI, f"file URIs need an absolute path: {uri}")
        return _local_ref(unquote(parts.path))
    if scheme == "s3":
        key = uri[len("s3://") + len(parts.netloc) + 1 :] if uri[:5].lower() == "s3://" else ""
        if not parts.netloc or not key:
            raise ScoringError(
                ErrorCode.BAD_URI, f"expected s3://bucket/key, got {_shown(redact(uri))}"
            )
        if "@" in parts.netloc:  # never echo a user:password@
            raise ScoringError(ErrorCode.BAD_URI, "s3:// URIs take no user or password")
        if not is_plain_bucket(parts.netloc):
            raise ScoringError(
                ErrorCode.BAD_URI,
                f"{_shown(parts.netloc)!r} is not a plain S3 bucket name (ARNs, access points, "
                "aliases and directory buckets are refused)",
            )
        try:
            key.encode("utf-8")  # botocore's own encode would escape as `internal`
        except UnicodeEncodeError:
            raise ScoringError(
                ErrorCode.BAD_URI, f"s3:// key is not valid Unicode: {_shown(ascii(key))}"
            ) from None
        return S3Ref(parts.netloc, key)
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive, i.e. a relative path
        raise ScoringError(
            ErrorCode.UNSUPPORTED_SCHEME, f"scheme {scheme!r} is not served (file, s3)"
        )
    raise ScoringError(ErrorCode.BAD_URI, f"expected an absolute path, file:// or s3:// URI: {uri}")


def _local_ref(path: str) -> LocalRef:
    """A local path the OS can be handed: ``os.open`` raises ``ValueError`` (not ``OSError``) on
    a NUL (``file:///a%00b`` decodes to one) or a lone surrogate (JSON's ``"\\ud800"``)."""
    if "\x00" in path:
        raise ScoringError(ErrorCode.BAD_URI, "URI contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ScoringError(
            ErrorCode.BAD_URI, f"path is not encodable as a file name: {_shown(ascii(path))}"
        ) from None
    return LocalRef(path)


class _Readable(Protocol):
    def read(self, amount: int, /) -> bytes: ...


class _FdReader:
    """``read`` on a bare descriptor: no file object (and its own fstat) per image."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, amount: int) -> bytes:
        return os.read(self.fd, amount)


def _timed_out(what: str) -> ScoringError:
    return ScoringError(ErrorCode.FETCH_TIMEOUT, f"{what}: not read within the deadline")


def _reserve(reserve: Reserve, nbytes: int, deadline: float, what: str) -> None:
    """Room for ``nbytes`` in the fetch budget before reading them, or ``fetch_timeout``."""
    try:
        reserve(nbytes, deadline)
    except TimeoutError:
        raise ScoringError(
            ErrorCode.FETCH_TIMEOUT,
            f"{what}: not read within the deadline: no room for its {nbytes} bytes in "
            "REALSCORE_MAX_FETCH_BYTES (the worker holds that much fetched and not yet decoded)",
        ) from None


def _read_capped(stream: _Readable, max_bytes: int, deadline: float, what: str) -> bytes:
    """Read ``stream`` to its end; ``too_large`` past ``max_bytes``, ``fetch_timeout`` past the
    deadline (checked before every read: ``stream.read`` must itself return by the deadline)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise _timed_out(what)
        chunk = stream.read(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise ScoringError(
                ErrorCode.TOO_LARGE,
                f"{what}: over {max_bytes} bytes (REALSCORE_MAX_IMAGE_BYTES)",
            )
        chunks.append(chunk)


def _socket_of(raw: object) -> socket.socket | None:
    """The socket under a urllib3 response, or None once http.client has let go of it.

    The path is the one botocore's ``StreamingBody.set_socket_timeout`` uses; that method logs a
    traceback at ERROR when the socket is gone, which it is after the last byte, hence our own.
    """
    fp = getattr(getattr(raw, "_fp", None), "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


class _DeadlineBody:
    """A botocore ``StreamingBody`` read so that every read returns by the deadline.

    ``StreamingBody.read(n)`` waits for ``n`` bytes: a trickle never fills a chunk and never goes
    silent long enough for the socket timeout. ``read1`` returns whatever has arrived, and the
    socket timeout is cut to the time left before each read, so a read ends by the deadline.
    """

    def __init__(self, body: object, deadline: float, socket_timeout: float, what: str) -> None:
        self._body = body
        self._raw = getattr(body, "_raw_stream", None)
        self._deadline = deadline
        self._socket_timeout = socket_timeout
        self._what = what

    def read(self, amount: int) -> bytes:
        from urllib3.exceptions import ProtocolError, ReadTimeoutError

        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(self._what)
        if self._raw is None or not hasattr(self._raw, "read1"):
            return self._body.read(amount)  # type: ignore[attr-defined]
        sock = _socket_of(self._raw)
        if sock is not None:  # None once drained: read1 then answers from what is buffered
            try:
                sock.settimeout(max(0.01, min(self._socket_timeout, left)))
            except OSError:
                pass  # closed under us: read1 reports it
        try:
            return self._raw.read1(amount)
        except (ReadTimeoutError, TimeoutError):
            raise _timed_out(self._what) from None
        except ProtocolError as error:
            raise ScoringError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"{self._what}: the connection to S3 broke while reading ({type(error).__name__})",
            ) from None


def _fetch_timed_out(what: str) -> deadlines.TimedOut:
    """The error of a fetch past its deadline, or refused because too many are stuck (``why``)."""

    def timed_out(why: str | None) -> ScoringError:
        if why is None:
            return _timed_out(what)
        return ScoringError(ErrorCode.FETCH_TIMEOUT, f"{what}: not fetched: {why}")

    return timed_out


def abandoned_fetches() -> int:
    """Fetches still blocked after their caller gave up on them."""
    return deadlines.abandoned_count()


def _shown(path: str, limit: int = 200) -> str:
    """``path`` for a message, cut short: a name too long to open is too long to echo whole."""
    return path if len(path) <= limit else f"{path[:limit]}..."


def _local_error(path: str, error: OSError) -> ScoringError:
    """An ``OSError`` from resolving or opening a local file as a stable code, not ``internal``."""
    shown = _shown(path)
    number = error.errno
    if number in (errno.ENOENT, errno.ENOTDIR):
        return ScoringError(ErrorCode.NOT_FOUND, f"{shown}: no such file")
    if number == errno.EISDIR:
        return ScoringError(ErrorCode.NOT_FOUND, f"{shown}: is a directory")
    if number in (errno.EACCES, errno.EPERM):
        return ScoringError(ErrorCode.ACCESS_DENIED, f"{shown}: permission denied")
    if number == errno.ENAMETOOLONG:
        return ScoringError(ErrorCode.BAD_URI, f"{shown}: file name too long")
    if number == errno.ELOOP:
        return ScoringError(
            ErrorCode.NOT_FOUND, f"{shown}: too many levels of symbolic links (a symlink loop)"
        )
    reason = error.strerror or type(error).__name__
    return ScoringError(ErrorCode.NOT_FOUND, f"{shown}: cannot be read ({reason})")


def _resolve(path: str) -> Path:
    """``path`` absolute with symlinks and ``..`` gone; resolution failures as error codes."""
    try:
        return Path(os.path.abspath(path)).resolve()
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way, not as ELOOP
        raise ScoringError(
            ErrorCode.NOT_FOUND, f"{_shown(path)}: symlink loop, the path never resolves"
        ) from None
    except OSError as error:
        raise _local_error(path, error) from None


def _opened_path(fd: int) -> str | None:
    """The kernel's absolute path of an open descriptor, or None where ``/proc`` is absent.

    ``os.readlink`` rather than ``os.path.realpath``: the link's target is already canonical, and
    realpath would walk it by name once more, which is the race this check exists to close.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith("/") else None  # e.g. "pipe:[123]": not a path


def _open_nonblocking(path: str, flags: int) -> int:
    """``open()``'s opener: opening a FIFO for reading would block until a writer comes."""
    return os.open(path, flags | os.O_NONBLOCK)


# Linux: a descriptor that names a file without opening it (no device's open() runs, a FIFO
# does not block, no read permission is needed), which /proc/self/fd can then reopen.
_O_PATH = getattr(os, "O_PATH", 0)


def _open_path(path: str) -> int:
    """An ``O_PATH`` descriptor of ``path``, symlinks followed, by one walk in the kernel."""
    return os.open(path, _O_PATH | os.O_CLOEXEC)


def _root_prefixes(roots: Sequence[Path]) -> tuple[str, ...]:
    """``"/root/"`` per root: a canonical path is inside a root when it starts with one (or is
    the root itself), which is :meth:`Path.is_relative_to` on strings, without building Paths."""
    return tuple(str(root).rstrip("/") + "/" for root in roots)



class Sources:
    """Fetches image bytes. One instance per process: its S3 client is thread-safe and pooled."""

    def __init__(
        self,
        *,
        local_roots: Sequence[Path] | None,
        max_bytes: int,
        timeout: float,
        s3_endpoint_url: str | None = None,
        s3_buckets: Sequence[str] | None = None,
        max_pool_connections: int = 64,
    ) -> None:
        # None trusts every path (the embedded CLI); a list, even empty, is the worker's policy.
        self.local_roots = None if local_roots is None else [Path(r).resolve() for r in local_roots]
        self._root_prefixes = _root_prefixes(self.local_roots or ())
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._s3_endpoint_url = s3_endpoint_url
        # None trusts every bucket (the embedded CLI); a list is the worker's policy: empty
        # refuses s3:// URIs (fail closed, as LOCAL_ROOTS does), ["*"] allows any plain name.
        self.s3_buckets = None if s3_buckets is None else frozenset(s3_buckets)
        self._max_pool_connections = max_pool_connections
        self._s3 = None
        self._s3_lock = threading.Lock()  # task threads race to the first S3 fetch

    def fetch(self, uri: object, reserve: Reserve | None = None) -> bytes:
        """The bytes ``uri`` names, or a :class:`ScoringError`; returns by ``timeout`` (plus a
        fraction of a second) whatever the file system or the endpoint does. ``reserve(size,
        deadline)`` is called with the size the file or object declares before any byte of it is
        read (the fetch memory budget), and may raise to refuse it."""
        ref = parse_uri(uri)
        deadline = time.monotonic() + self.timeout
        if isinstance(ref, S3Ref):
            self.check_bucket(ref)
            what = f"s3://{ref.bucket}/{_shown(ref.key)}"
            return within_deadline(
                deadline, _fetch_timed_out(what), lambda: self._fetch_s3(ref, deadline, reserve)
            )
        return within_deadline(
            deadline, _fetch_timed_out(_shown(ref.path)), lambda: self._fetch_local(ref, deadline, reserve)
        )

    def check_bucket(self, ref: S3Ref) -> None:
        """Refuse a bucket the policy does not allow, before any request."""
        if self.s3_buckets is None or ANY_BUCKET in self.s3_buckets:
            return
        what = f"s3://{ref.bucket}/{_shown(ref.key)}"
        if not self.s3_buckets:
            raise ScoringError(
                ErrorCode.FORBIDDEN_PATH,
                f"{what}: s3:// URIs are not served: REALSCORE_S3_BUCKETS is empty "
                "(list the buckets, or '[\"*\"]' for any)",
            )
        if ref.bucket not in self.s3_buckets:
            raise ScoringError(
                ErrorCode.FORBIDDEN_PATH,
                f"{what}: bucket {ref.bucket!r} is not in REALSCORE_S3_BUCKETS",
            )

    # Local files -----------------------------------------------------------------------------

    def check_local_path(self, path: str) -> Path:
        """The resolved path (symlinks and ``..`` gone), if the policy allows it.

        A path outside the roots is ``forbidden_path`` even where resolving it fails (a symlink
        loop, a directory we may not search): its own error would tell what lies out there."""
        if self.local_roots is None:
            return _resolve(path)
        if not self.local_roots:
            raise ScoringError(
                ErrorCode.FORBIDDEN_PATH,
                "local files are not served: REALSCORE_LOCAL_ROOTS is empty",
            )
        try:
            resolved = _resolve(path)
        except ScoringError:
            # realpath (non-strict) never raises: it follows what links it can, so a link out of
            # the roots before the failing part counts too.
            if self._inside_roots(os.path.realpath(path)):
                raise
            raise ScoringError(
                ErrorCode.FORBIDDEN_PATH, f"{_shown(path)} is outside REALSCORE_LOCAL_ROOTS"
            ) from None
        if not self._inside_roots(resolved):
            raise ScoringError(
                ErrorCode.FORBIDDEN_PATH,
                f"{path} is outside REALSCORE_LOCAL_ROOTS",
            )
        return resolved

    def _inside_roots(self, path: Path | str) -> bool:
        """Whether a canonical path is a root or below one (one string test, no Paths built)."""
        return (str(path).rstrip("/") + "/").startswith(self._root_prefixes)

    def check_opened(self, fd: int, path: str) -> None:
        """Refuse an open file that is not inside the roots, whatever its name said before.

        :meth:`check_local_path` resolves by name and ``open`` walks the name again: a directory
        swapped for a symlink in between would lead outside the roots. The kernel knows which
        file the descriptor really is; ``/proc/self/fd`` (Linux) tells us. Without ``/proc`` the
        name is resolved again and must still be inside and be the same inode as the descriptor
        (a narrower window, not none).
        """
        if self.local_roots is None:
            return
        escaped = (
            f"{_shown(path)}: the path changed while it was opened and now leads outside "
            "REALSCORE_LOCAL_ROOTS"
        )
        opened = _opened_path(fd)
        if opened is not None:
            if not self._inside_roots(opened):
                raise ScoringError(ErrorCode.FORBIDDEN_PATH, escaped)
            return
        again = _resolve(path)
        info = os.fstat(fd)
        try:
            named = os.stat(again)
        except OSError:
            raise ScoringError(ErrorCode.FORBIDDEN_PATH, escaped) from None
        same = (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino)
        if not (same and self._inside_roots(again)):
            raise ScoringError(ErrorCode.FORBIDDEN_PATH, escaped)

    def _fetch_local(self, ref: LocalRef, deadline: float, reserve: Reserve | None = None) -> bytes:
        if self.local_roots is not None and not self.local_roots:
            self.check_local_path(ref.path)  # raises: local files are not served
        if self.local_roots is not None and _O_PATH:
            data = self._fetch_opened_first(ref, deadline, reserve)
            if data is not None:
                return data
        if self.local_roots is None:  # trusted: no policy to check, ".." collapsed by name as ever
            path: str | Path = os.path.abspath(ref.path)
        else:
            path = self.check_local_path(ref.path)
        try:
            with open(path, "rb", opener=_open_nonblocking) as handle:
                self.check_opened(handle.fileno(), ref.path)  # before anything is read
                return self._read_regular(handle, ref.path, deadline, reserve=reserve)
        except OSError as error:  # ELOOP, ENAMETOOLONG, EIO... too: none of them is `internal`
            raise _local_error(ref.path, error) from None

    def _fetch_opened_first(
        self, ref: LocalRef, deadline: float, reserve: Reserve | None = None
    ) -> bytes | None:
        """The policy checked on the file itself: the name is walked once, by the kernel, into an
        ``O_PATH`` descriptor (opening nothing), whose canonical path ``/proc/self/fd`` tells;
        inside the roots and a regular file, that very file is reopened for reading. No
        component-by-component resolution in Python (the per-image cost it had) and no window
        between check and open. None (the caller resolves by name instead) where ``/proc`` is
        missing, or when the walk fails: the name-based check then says ``forbidden_path`` for a
        missing file outside the roots, as before, rather than whether it exists."""
        try:
            # abspath collapses ".." by name first, as the name-based check always did.
            fd = _open_path(os.path.abspath(ref.path))
        except OSError:
            return None
        try:
            opened = _opened_path(fd)
            if opened is None:
                return None
            if not self._inside_roots(opened):
                raise ScoringError(
                    ErrorCode.FORBIDDEN_PATH, f"{ref.path} is outside REALSCORE_LOCAL_ROOTS"
                )
            try:
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode):
                    raise ScoringError(ErrorCode.NOT_FOUND, f"{_shown(ref.path)}: is a directory")
                if not stat.S_ISREG(info.st_mode):  # a FIFO or a device: never even opened
                    raise ScoringError(ErrorCode.NOT_FOUND, f"{ref.path}: not a regular file")
                reader = _open_nonblocking(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                try:  # the same inode as fd: its fstat is `info`
                    return self._read_regular(_FdReader(reader), ref.path, deadline, info, reserve)
                finally:
                    os.close(reader)
            except OSError as error:
                raise _local_error(ref.path, error) from None
        finally:
            os.close(fd)

    def _read_regular(
        self,
        handle: _Readable,
        path: str,
        deadline: float,
        info: os.stat_result | None = None,
        reserve: Reserve | None = None,
    ) -> bytes:
        """The whole of an open regular file (``info``: its fstat, when known), within the size
        cap and the deadline; its size ``reserve``d first."""
        if info is None:
            info = os.fstat(handle.fileno())  # type: ignore[attr-defined]
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device: no end, or no writer
            raise ScoringError(ErrorCode.NOT_FOUND, f"{path}: not a regular file")
        size = info.st_size
        if size > self.max_bytes:
            raise ScoringError(
                ErrorCode.TOO_LARGE,
                f"{path}: {size} bytes, over {self.max_bytes} (REALSCORE_MAX_IMAGE_BYTES)",
            )
        if reserve is not None:
            _reserve(reserve, size, deadline, path)
        return _read_capped(handle, self.max_bytes, deadline, path)

    # S3 --------------------------------------------------------------------------------------

    @property
    def s3(self):  # noqa: ANN201 - botocore's client type is generated at run time
        if self._s3 is None:
            with self._s3_lock:
                if self._s3 is None:
                    self._s3 = self._make_s3_client()
        return self._s3

    @property
    def _socket_timeout(self) -> float:
        return min(5.0, self.timeout / (2 * S3_ATTEMPTS))

    def _make_s3_client(self):  # noqa: ANN202
        import boto3
        from botocore.config import Config

        # Three attempts of (connect + read) each fit in FETCH_TIMEOUT, so botocore's own retries
        # cannot carry a fetch far past its deadline before our read loop even starts.
        socket_timeout = self._socket_timeout
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self._s3_endpoint_url,
            config=Config(
                max_pool_connections=self._max_pool_connections,
                connect_timeout=socket_timeout,
                read_timeout=socket_timeout,
                retries={"mode": "standard", "total_max_attempts": S3_ATTEMPTS},
            ),
        )

    def _fetch_s3(self, ref: S3Ref, deadline: float, reserve: Reserve | None = None) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            InvalidEndpointConfigurationError,
            NoCredentialsError,
            NoRegionError,
            ParamValidationError,
            PartialCredentialsError,
            ProfileNotFound,
            ReadTimeoutError,
        )

        what = f"s3://{ref.bucket}/{_shown(ref.key)}"
        try:
            response = self.s3.get_object(Bucket=ref.bucket, Key=ref.key)
            body = response["Body"]
            try:
                if response.get("ContentLength", 0) > self.max_bytes:
                    raise ScoringError(
                        ErrorCode.TOO_LARGE,
                        f"{what}: {response['ContentLength']} bytes, over {self.max_bytes} "
                        "(REALSCORE_MAX_IMAGE_BYTES)",
                    )
                if reserve is not None:
                    _reserve(reserve, response.get("ContentLength") or self.max_bytes, deadline, what)
                reader = _DeadlineBody(body, deadline, self._socket_timeout, what)
                data = _read_capped(reader, self.max_bytes, deadline, what)
                declared = response.get("ContentLength")
                if declared is not None and len(data) != declared:  # read1 skips botocore's check
                    raise ScoringError(
                        ErrorCode.SOURCE_UNAVAILABLE,
                        f"{what}: the connection ended after {len(data)} of {declared} bytes",
                    )
                return data
            finally:
                body.close()
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _NOT_FOUND or status == "404":
                raise ScoringError(ErrorCode.NOT_FOUND, f"{what}: {code or status}") from None
            if code in _CREDENTIALS:
                raise ScoringError(
                    ErrorCode.SOURCE_UNAVAILABLE,
                    f"{what}: S3 refused the worker's credentials ({code}): check its "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or role",
                ) from None
            if code in _DENIED or status == "403":
                raise ScoringError(ErrorCode.ACCESS_DENIED, f"{what}: {code or status}") from None
            if code == "InvalidBucketName":
                raise ScoringError(ErrorCode.BAD_URI, f"{what}: invalid bucket name") from None
            raise ScoringError(
                ErrorCode.SOURCE_UNAVAILABLE, f"{what}: S3 said {code} ({status})"
            ) from None
        except (ConnectTimeoutError, ReadTimeoutError):
            raise ScoringError(ErrorCode.FETCH_TIMEOUT, f"{what}: S3 did not answer in time") from None
        except (NoCredentialsError, PartialCredentialsError, ProfileNotFound) as error:
            raise ScoringError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"{what}: the worker has no usable S3 credentials ({type(error).__name__}): set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give it a role",
            ) from None
        except NoRegionError:
            raise ScoringError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"{what}: no AWS region configured: set AWS_DEFAULT_REGION",
            ) from None
        except (EndpointConnectionError, InvalidEndpointConfigurationError) as error:
            raise ScoringError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"{what}: cannot reach the S3 endpoint ({type(error).__name__}): check "
                "REALSCORE_S3_ENDPOINT_URL and that the endpoint is up",
            ) from None
        except ParamValidationError as error:  # botocore checks names before sending anything
            if "bucket name" in str(error).lower():
                message = f"{what}: {ref.bucket!r} is not a valid S3 bucket name"
            else:
                message = f"{what}: S3 refused the request's parameters ({_shown(str(error))})"
            raise ScoringError(ErrorCode.BAD_URI, message) from None
        except BotoCoreError as error:
            raise ScoringError(
                ErrorCode.SOURCE_UNAVAILABLE, f"{what}: S3 request failed: {_shown(redact(str(error)))}"
            ) from None
