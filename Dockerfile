# tokend's container image: a slim Python, a virtualenv built from the wheel, a
# non-root user, and nothing written outside the mounted volumes, so it runs with a
# read-only root filesystem. tokend runs as PID 1 and handles SIGTERM (drain), SIGINT
# and SIGHUP (reload) itself; no init wrapper is needed.
#
#   docker build -t tokend .
#   docker run --read-only -v tokend-state:/var/lib/tokend -v tokend-run:/run/tokend \
#     -v ./config.yaml:/etc/tokend/config.yaml:ro tokend
#
# tests/test_packaging.py lints this file with hadolint and runs its install steps.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tokend ./tokend
# tokend's wheel and every dependency's, so the final stage installs offline.
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tokend" \
      org.opencontainers.image.description="Keeps OAuth 2.0 access tokens fresh for many accounts and hands them to applications" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid, so Kubernetes' runAsUser/fsGroup and volume permissions can name it.
RUN groupadd --system --gid 10001 tokend \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tokend
COPY --from=build /wheels /wheels
# Byte-compiled at install time: with a read-only root, nothing is compiled at start.
RUN python -m venv /opt/tokend \
 && /opt/tokend/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
      --find-links=/wheels /wheels/tokend-*.whl \
 && rm -rf /wheels \
 && /opt/tokend/bin/tokend --version
# TOKEND_CONFIG is a path, not a secret ("TOKEN" in its name trips DL3064). `tokend
# token` and `tokend status` find the socket through it (serve.socket).
# hadolint ignore=DL3064
ENV PATH=/opt/tokend/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKEND_CONFIG=/etc/tokend/config.yaml
# Mount points: state (a volume that survives restarts), the socket and token files
# (shared with the application), the config (read-only).
WORKDIR /var/lib/tokend
USER 10001:10001
# /metrics, /healthz and /readyz (serve.metrics_listen: "0.0.0.0:9464").
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokend"]
CMD ["run"]
