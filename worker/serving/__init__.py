"""The serving room: URI -> bytes, the dynamic batcher, the scoring service, Celery tasks, the worker.

Everything a running ``realscore worker`` (or the embedded ``realscore score``) executes per image.
"""
