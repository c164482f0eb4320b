"""What counts as a plain S3 bucket name, for URIs (worker) and ``REALSCORE_S3_BUCKETS`` (settings).

A plain bucket name follows S3's naming rules: 3-63 characters of lower-case letters, digits,
dots and hyphens, starting and ending with a letter or digit, not shaped like an IP address. An
ARN (``arn:aws:s3:...``), an access-point or Object Lambda alias (``...-s3alias``, ``...--ol-s3``),
a directory bucket (``...--x-s3``), a table bucket or a multi-region access point (``.mrap``) is
refused: botocore routes those to other accounts' data or other services, and an allow-list of
names cannot reason about where they lead. Dots are allowed (older buckets have them; botocore
addresses them path-style), but not two in a row nor next to a hyphen.
"""

from __future__ import annotations

import re

ANY_BUCKET = "*"  # in REALSCORE_S3_BUCKETS: any plain bucket the worker's credentials reach
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", "--x-s3", "--table-s3", ".mrap")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def is_plain_bucket(name: str) -> bool:
    """True for an ordinary S3 bucket name; False for ARNs, aliases, IPs and other forms."""
    return (
        bool(_BUCKET_RE.match(name))
        and ".." not in name
        and ".-" not in name
        and "-." not in name
        and not _IP_RE.match(name)
        and not name.startswith(_RESERVED_PREFIXES)
        and not name.endswith(_RESERVED_SUFFIXES)
    )
