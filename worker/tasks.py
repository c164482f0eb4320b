"""Public entry point kept stable for ``celery -A``-style imports: importing it registers the tasks.

The tasks themselves live in :mod:`worker.serving.tasks`.
"""

from worker.serving.tasks import embed, score, score_many

__all__ = ["embed", "score", "score_many"]
