"""The offline room: ``convert``, ``evaluate`` and ``train``, and what they share (features, folders).

These commands run by hand or in CI, never inside a serving worker.
"""
