"""``realscore submit URI...``: score through Redis and the workers, JSON lines out."""

from __future__ import annotations

import argparse
import json
import sys

from shared import client
from shared.cli import EXIT_FAILURE, EXIT_OK


def run(args: argparse.Namespace) -> int:
    try:
        results = client.score_many(args.uris, timeout=args.timeout)
    except client.ScoreTimeout as error:
        print(f"realscore submit: {error}", file=sys.stderr)
        return EXIT_FAILURE
    for result in results:
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return EXIT_OK
