# syntax=docker/dockerfile:1
# x2v-gateway image: the wheel built from this repo and its runtime dependencies, nothing else.
#
#   docker build -t x2v-gateway .
#   docker run -d -p 127.0.0.1:8000:8000 -v x2v-data:/data --env-file .env x2v-gateway
#
# Settings come from the environment (or a .env file in the working directory, /home/x2v);
# see deploy/compose.env.example and docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: turn the source tree into a wheel ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# .dockerignore lets only these in, so a stray .env or data/ never reaches the image.
COPY pyproject.toml README.md ./
COPY src ./src
COPY templates ./templates
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: install the wheel alone (its dependencies come from PyPI, no dev/test extras) --
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid, so a bind-mounted data directory can be chown'ed to it on the host.
RUN useradd --create-home --home-dir /home/x2v --uid 10001 --user-group --no-log-init x2v \
    && mkdir /data \
    && chown x2v:x2v /data

COPY --from=build /wheels /tmp/wheels
RUN python -m pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# Listening on every interface is right inside the container only: the container's network is
# the boundary. Outside, the gateway defaults to 127.0.0.1.
ENV X2V_HOST=0.0.0.0 \
    X2V_PORT=8000 \
    X2V_DATA_DIR=/data

# Numeric, so a runtime can tell it is not root without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/x2v
# The SQLite job record and the blob store: losing this volume loses every job.
VOLUME ["/data"]
EXPOSE 8000

# slim has no curl; the standard library does the request. urlopen raises on any status >= 400.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('X2V_PORT', '8000'), timeout=4)"]

CMD ["x2v-gateway", "serve"]
