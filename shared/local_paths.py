"""How the command line turns what a user typed into a URI the service accepts.

The service (and :mod:`shared.client`) take absolute paths, ``file://`` and ``s3://`` URIs only:
a worker has no working directory of the caller's to resolve against. ``realscore score`` and
``realscore submit`` resolve relative paths against their own working directory first.
"""

from __future__ import annotations

import os


def absolute_uri(uri: str) -> str:
    """A relative path made absolute; URIs, absolute and blank inputs pass through unchanged
    (a blank one is then refused as ``bad_uri``, not read as the working directory)."""
    if not uri.strip() or "://" in uri or uri.startswith("/"):
        return uri
    return os.path.abspath(uri)
