"""realscore's GPU half: the model, preprocessing, sources, batcher and Celery tasks.

Needs the ``worker`` extra (torch, transformers, Pillow, safetensors).
"""
