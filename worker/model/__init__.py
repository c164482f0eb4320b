"""The model room: the seed's architecture, safe weight loading, head files, decode and preprocessing.

Everything that turns bytes into a tensor and a tensor into a score lives here; nothing here knows
about Celery, Redis or URIs.
"""
