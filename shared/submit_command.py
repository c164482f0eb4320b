"""``realscore submit URI...``: score through Redis and the workers, JSON lines out.

Relative paths are resolved against this command's working directory, as ``realscore score``
does; the workers must be able to read the resulting absolute path (their ``LOCAL_ROOTS``).
A timeout or an unreachable Redis is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from shared import client
from shared.local_paths import absolute_uri
from shared.usage import EXIT_FAILURE, EXIT_OK


def run(args: argparse.Namespace) -> int:
    try:
        results = client.score_many([absolute_uri(uri) for uri in args.uris], timeout=args.timeout)
    except (client.ScoreTimeout, client.BrokerUnavailable) as error:
        print(f"realscore submit: {error}", file=sys.stderr)
        return EXIT_FAILURE
    for given, result in zip(args.uris, results):
        result["uri"] = given
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return EXIT_OK
