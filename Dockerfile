# wanstream live server image (see docs/deploy.md).
#
#   GPU (default):  docker build -t wanstream .
#   CPU variant:    docker build --build-arg VARIANT=cpu -t wanstream:cpu .
#   run:            docker run --gpus all -p 7860:7860 -v /path/to/models:/models:ro wanstream
#
# The project installs itself with its own files: `make env` (the Makefile's pinned torch / torchvision, then
# `pip install -e ".[test]"` from pyproject.toml) into /opt/venv. The model is not in the image: mount it at
# /models/wan (a folder in the released layout, or one made by `wanstream init-random`).

ARG VARIANT=gpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.12-slim-bookworm AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# CPU-only torch wheels (much smaller); everything else from PyPI
ENV PIP_INDEX_URL=https://download.pytorch.org/whl/cpu PIP_EXTRA_INDEX_URL=https://pypi.org/simple

FROM base-${VARIANT} AS final
WORKDIR /opt/wanstream
COPY pyproject.toml Makefile README.md ./
COPY wanstream ./wanstream
RUN make env PYTHON=python3 VENV=/opt/venv && rm -rf /root/.cache/pip
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 7860
# SIGTERM drains (new streams refused, running ones finish within --drain-grace), then the server exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["wanstream", "serve"]
CMD ["--model", "/models/wan", "--host", "0.0.0.0", "--port", "7860", "--drain-grace", "30"]
