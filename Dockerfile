# syntax=docker/dockerfile:1
#
# pqproxy: the hybrid post-quantum TLS 1.3 reverse proxy, as a small non-root image.
#
#   docker build -t pqproxy:0.1.0 .
#   docker build -t pqproxy:0.1.0-liboqs --build-arg WITH_LIBOQS=1 .   # + the liboqs backend
#
# Runs `pqproxy serve --config /etc/pqproxy/pqproxy.yaml`: mount the config there and the
# certificate and key it names (e.g. /etc/pqproxy/certs/). TLS on 8443, admin on 9100.
# tests/unit/test_deploy.py checks what this file promises (non-root, no build tools in the
# final stage, the health check, the entrypoint, the ports).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# 1: build liboqs from a pinned release and add the liboqs backend (liboqs-python).
ARG WITH_LIBOQS=0

# --- build: pqproxy and its dependencies into a virtualenv --------------------------------------
# Every dependency ships manylinux wheels (cryptography, uvloop, PyYAML): no compiler needed.
FROM ${PYTHON_IMAGE} AS build
ARG WITH_LIBOQS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pqproxy ./pqproxy
RUN python -m venv /opt/pqproxy \
    && extras="" && if [ "$WITH_LIBOQS" = 1 ]; then extras="[liboqs]"; fi \
    && /opt/pqproxy/bin/pip install ".${extras}" \
    && /opt/pqproxy/bin/python -m compileall -q /opt/pqproxy/lib

# --- liboqs, when WITH_LIBOQS=1: built from a pinned release, verified by its SHA-256 --------------
FROM ${PYTHON_IMAGE} AS liboqs-build-1
ARG LIBOQS_VERSION=0.16.0
ARG LIBOQS_SHA256=162d5b510518ee5f285f82fa1f16402a885176e818bf1b1a4c3c91c9a2f01eae
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates cmake curl gcc libc6-dev ninja-build \
    && rm -rf /var/lib/apt/lists/*
# The same script and options as `make liboqs` (ML-KEM and ML-DSA only, no OpenSSL).
COPY scripts/build-liboqs.sh /src/build-liboqs.sh
RUN LIBOQS_SRC="https://github.com/open-quantum-safe/liboqs/archive/refs/tags/${LIBOQS_VERSION}.tar.gz" \
        LIBOQS_SHA256="${LIBOQS_SHA256}" bash /src/build-liboqs.sh /opt/liboqs-build \
    && mkdir -p /opt/liboqs/lib \
    && cp -a /opt/liboqs-build/lib/liboqs.so* /opt/liboqs/lib/

# Without liboqs: an empty /opt/liboqs/lib, so the final stage copies the same path either way.
FROM scratch AS liboqs-build-0
WORKDIR /opt/liboqs/lib

FROM liboqs-build-${WITH_LIBOQS} AS liboqs

# --- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/pqproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OQS_INSTALL_PATH=/opt/liboqs
# A fixed numeric user, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 pqproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pqproxy \
    && mkdir -p /etc/pqproxy/certs
COPY --from=build /opt/pqproxy /opt/pqproxy
# Only the shared library: no headers, no cmake files, no compiler.
COPY --from=liboqs /opt/liboqs/lib /opt/liboqs/lib
USER 10001:10001
# TLS (listeners.listen in the config), admin (/metrics, /healthz, /readyz).
EXPOSE 8443 9100
# The slim image has no curl: Python asks the admin endpoint (the config's admin address must
# be reachable on 127.0.0.1:9100 inside the container, as 127.0.0.1:9100 or 0.0.0.0:9100 are).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]
ENTRYPOINT ["pqproxy", "serve", "--config", "/etc/pqproxy/pqproxy.yaml"]
