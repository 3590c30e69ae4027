# syntax=docker/dockerfile:1
# Medical Aegis serving image: ONNX Runtime on CUDA 13 + cuDNN 9 (onnxruntime-gpu 1.31.1), no torch.
#
#   docker build -t medical-aegis:gpu .                                      # GPU image (default)
#   docker build -t medical-aegis:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#                --build-arg ORT_EXTRA=cpu --build-arg AEGIS_DEVICE=cpu .    # CPU image
#
# The embedded default bundle (models/default) must exist in the build context: the build fails otherwise.
# The builder installs a relocatable CPython 3.11 (uv's managed Python when the base image has none; the base's own
# python3.11 on python:3.11-slim) and a virtual environment under /opt; the runtime stage copies only /opt, so no
# build tool, package manager cache or uv ends up in the final image.

ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# --------------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
# gpu -> onnxruntime-gpu, cpu -> onnxruntime (pyproject extras; never both)
ARG ORT_EXTRA=gpu
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
RUN test -f models/default/manifest.json \
    || { echo "models/default/manifest.json is missing: the image embeds the default bundle" >&2; exit 1; }
RUN mkdir -p /opt/python \
    && uv venv --python 3.11 /opt/venv \
    && uv pip install --python /opt/venv/bin/python ".[${ORT_EXTRA},serve]" \
    && /opt/venv/bin/python -c "import models.bundle as b; b.load_bundle(); import onnxruntime, service.main"

# --------------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG AEGIS_DEVICE=cuda
LABEL org.opencontainers.image.title="medical-aegis" \
      org.opencontainers.image.description="Medical image classifier defended by Cushion + Shield (FastAPI, ONNX Runtime)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AEGIS_DEVICE=${AEGIS_DEVICE} \
    AEGIS_DRAIN_SECONDS=5 \
    AEGIS_RECORD_URL=sqlite:////var/lib/aegis/records.sqlite
# the decision record's default SQLite file lives on a volume owned by the service user (compose and Kubernetes
# point AEGIS_RECORD_URL at PostgreSQL instead)
RUN groupadd --system --gid 10001 aegis \
    && useradd --system --uid 10001 --gid aegis --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin aegis \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/aegis
VOLUME ["/var/lib/aegis"]
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/aegis
USER 10001:10001
EXPOSE 8000
# /readyz answers 200 only once the bundle is loaded and a warm-up inference ran (503 while starting or draining)
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
