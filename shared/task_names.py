"""Task and queue names: the wire contract between clients and workers."""

from __future__ import annotations

SCORE = "realscore.score"
SCORE_MANY = "realscore.score_many"
EMBED = "realscore.embed"

INTERACTIVE_QUEUE = "realscore"
BULK_QUEUE = "realscore.bulk"

MAX_URIS_PER_TASK = 256
