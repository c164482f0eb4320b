# syntax=docker/dockerfile:1
# realscore images. The default target is the GPU worker; `--target monitor` gives a small image
# for Flower (no torch). Weights are mounted at /app/weights, not baked in (see README).
#
#   docker build -t realscore-worker .
#   docker build -t realscore-monitor --target monitor .

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/realscore/.cache/huggingface
RUN useradd --create-home --uid 10001 --user-group realscore \
    && mkdir -p /app/weights "$HF_HOME" \
    && chown -R realscore:realscore /app "$HF_HOME"
WORKDIR /app

# Flower on the same Celery app: only the torch-free half of the package is needed.
FROM base AS monitor
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY worker ./worker
RUN pip install '.[monitor]'
USER realscore
EXPOSE 5555
CMD ["celery", "-A", "shared.celery_app:app", "flower", "--port=5555", "--address=0.0.0.0"]

# The worker. torch first, in its own layer, so code changes do not re-download it: the default
# index's Linux wheels are CUDA builds that bring their own CUDA libraries (no CUDA base image;
# the host needs only the NVIDIA driver and the container toolkit).
FROM base AS worker
ARG TORCH_SPEC=torch
RUN pip install "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY worker ./worker
RUN pip install '.[worker]'
USER realscore
CMD ["realscore", "worker"]
