# The vlsearch image: the API (`vlsearch serve`) and the workers (`vlsearch worker`) run from it.
#
#   docker build -t vlsearch:cpu .                                  # CPU torch (the default)
#   docker build -t vlsearch:cuda --build-arg TORCH_VARIANT=cuda .  # CUDA torch (PyPI's Linux wheels)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ...   # a chosen CUDA build
#
# docker-compose.yml builds both variants. The torch pins are those of pyproject.toml (tests/test_compose.py
# checks that they agree).
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch first, in its own layer: the largest download, and the one that differs between the variants.
RUN set -eux; \
    case "$TORCH_VARIANT" in \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        cuda) index="${TORCH_INDEX_URL:-}" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install ${index:+--index-url "$index"} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The project itself (not editable: the shipped models under models/ install as package data).
COPY . /src
RUN pip install /src && rm -rf /src

RUN set -eux; \
    useradd --create-home --uid 1000 --user-group vlsearch; \
    mkdir -p /data /models; \
    chown vlsearch:vlsearch /data /models

# A named volume mounted on /data or /models starts with this ownership, so the non-root user can write there.
ENV VLSEARCH_DATA_DIR=/data \
    HF_HOME=/models/huggingface \
    TORCH_HOME=/models/torch

USER vlsearch
WORKDIR /home/vlsearch
EXPOSE 8000

CMD ["vlsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]
