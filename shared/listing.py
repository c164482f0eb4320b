"""What a backfill scores: the URIs under an ``s3://bucket/prefix`` or a local folder, streamed.

Both listings are generators that hold one page (S3: 1000 keys) or one open directory per level
(local), never the whole listing, so a bucket of ten million keys lists in constant memory.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass

# The file names every command takes for images (backfill here; score, evaluate and train
# through worker/lifecycle/folders.py): the formats decode.ALLOWED_FORMATS reads.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".pjpeg", ".pjp",
    ".avif",
)


class ListingError(Exception):
    """The source cannot be listed (missing folder, unknown bucket, no credentials)."""


@dataclass(frozen=True)
class Source:
    """A parsed SOURCE argument: ``bucket`` set for S3, else ``path`` is a local folder."""

    text: str
    bucket: str | None = None
    prefix: str = ""
    path: str = ""

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None


def parse_source(text: str) -> Source:
    """``s3://bucket[/prefix]`` or a local folder (made absolute: workers need absolute paths)."""
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise ListingError(f"{text!r}: no bucket (expected s3://bucket/prefix)")
        return Source(text, bucket=bucket, prefix=prefix)
    if "://" in text:
        raise ListingError(f"{text!r}: a backfill source is s3://bucket/prefix or a local folder")
    path = os.path.abspath(text)
    if not os.path.isdir(path):
        raise ListingError(f"{text!r} is not a folder")
    return Source(text, path=path)


def _matches(relative: str, glob: str | None) -> bool:
    if glob is None:
        return True
    return fnmatch.fnmatchcase(relative, glob) or fnmatch.fnmatchcase(os.path.basename(relative), glob)


def iter_local(root: str, glob: str | None = None) -> Iterator[str]:
    """Absolute paths of the files under ``root``, depth first. Without ``glob``, files with an
    image extension; with it, files whose path relative to ``root`` (or whose name) matches it.
    Symlinks to files are listed (the worker checks where they lead); symlinked folders are not
    followed, so a link cycle cannot loop."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            if folder == root:
                raise ListingError(f"cannot list {root}: {error}") from None
            continue  # an unreadable subfolder; the rest of the tree is still listed
        subfolders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
                continue
            relative = os.path.relpath(entry.path, root)
            if glob is None:
                if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    yield entry.path
            elif _matches(relative, glob):
                yield entry.path
        stack.extend(reversed(subfolders))


def iter_s3(bucket: str, prefix: str, glob: str | None = None, endpoint_url: str | None = None) -> Iterator[str]:
    """``s3://bucket/key`` for every object under ``prefix`` (keys ending in ``/`` are folder
    markers, skipped). Every object is listed, whatever its name (keys need no extension); ``glob``
    filters on the key relative to the prefix, or its last segment."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint_url)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    try:
        for page in pages:
            for item in page.get("Contents", ()):
                key = item["Key"]
                if key.endswith("/"):
                    continue
                if _matches(key[len(prefix) :].lstrip("/"), glob):
                    yield f"s3://{bucket}/{key}"
    except (BotoCoreError, ClientError) as error:
        raise ListingError(f"cannot list s3://{bucket}/{prefix}: {error}") from None


def iter_source(source: Source, glob: str | None = None, endpoint_url: str | None = None) -> Iterator[str]:
    if source.is_s3:
        return iter_s3(source.bucket or "", source.prefix, glob, endpoint_url)
    return iter_local(source.path, glob)
