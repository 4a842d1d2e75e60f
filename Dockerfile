# syntax=docker/dockerfile:1
# Maestro operator image: `maestro operator` as a non-root user on a read-only root.
#
#   docker build -t ghcr.io/maestro-dev/maestro:0.1.0 .
#
# Stage 1 builds a virtualenv from hash-pinned dependencies (requirements.lock) plus a
# wheel of this project; stage 2 copies only that virtualenv onto a clean slim base, so
# no compiler, pip cache or source tree reaches the final image.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/maestro
WORKDIR /src
# The lock alone first: dependency layers stay cached while only the source changes.
COPY requirements.lock ./
RUN /opt/maestro/bin/pip install --require-hashes -r requirements.lock
# README.m[d]: optional (a glob matching nothing is skipped while pyproject.toml matches).
COPY pyproject.toml README.m[d] ./
COPY operator ./operator
# --no-deps: every dependency is already installed, pinned and hash-checked above.
RUN /opt/maestro/bin/pip wheel --no-deps -w /tmp/wheels . \
 && /opt/maestro/bin/pip install --no-deps /tmp/wheels/*.whl \
 && /opt/maestro/bin/python -m compileall -q /opt/maestro/lib

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="maestro" \
      org.opencontainers.image.description="Kubernetes operator that runs DAG workflows, with run history in PostgreSQL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/maestro-dev/maestro" \
      org.opencontainers.image.documentation="https://github.com/maestro-dev/maestro/tree/main/docs"

# A numeric user, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
# Everything that might write (HOME, caches, temp files) points at /tmp, the only
# writable path when the pod runs with readOnlyRootFilesystem (mount an emptyDir there).
ENV PATH=/opt/maestro/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    TMPDIR=/tmp

COPY --from=build /opt/maestro /opt/maestro
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["maestro"]
CMD ["operator"]
