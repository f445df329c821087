# localflow worker image: one image, one task per container
#   docker run --env-file .env localflow run examples/sophia/flow.yaml --task sophia/postgres --metrics-port 9100
# Multi-stage: the build stage has pip's caches and any compiler; the final stage has only the venv.
# BASE_IMAGE: any image with Python 3.11+ as `python3` (with venv) and `useradd`; both stages use it,
# since the venv links to its interpreter. `make test-compose` passes a Debian image it builds itself.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
COPY transforms ./transforms
COPY localflow ./localflow
RUN /opt/venv/bin/pip install . && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --create-home --home-dir /app localflow \
 && mkdir -p /var/log/sophia/agents && chown localflow /var/log/sophia/agents
COPY --from=build /opt/venv /opt/venv
COPY --chown=localflow examples /app/examples
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LOCALFLOW_METRICS_PORT=9100
USER localflow
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LOCALFLOW_METRICS_PORT', '9100'), timeout=3)"]
ENTRYPOINT ["localflow"]
CMD ["--help"]
