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
    sent = [absolute_uri(uri) for uri in args.uris]
    try:
        results = client.score_many(sent, timeout=args.timeout)
    except (client.ScoreTimeout, client.BrokerUnavailable) as error:
        print(f"realscore submit: {error}", file=sys.stderr)
        return EXIT_FAILURE
    for given, path, result in zip(args.uris, sent, results):
        if path != given and result.get("uri") == path:
            # A relative path is echoed as typed, as `score` does. Anything else keeps the
            # worker's own `uri` (which has secrets such as a URL's credentials redacted).
            result["uri"] = given
        sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return EXIT_OK
