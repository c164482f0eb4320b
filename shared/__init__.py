"""realscore's torch-free half: settings, task names, result schema, Celery app, client, CLI.

A web backend installs ``realscore`` without the ``worker`` extra and imports only this package.
"""
