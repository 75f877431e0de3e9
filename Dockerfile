# syntax=docker/dockerfile:1
# The gateway image: dependencies from the hashed lock file, no compilers in the final stage, non-root.
# Build: docker build -t gateway .   Run: docker run -p 8080:8080 -v ./config:/etc/gateway:ro gateway
# With hosted providers (litellm, the `providers` extra): docker build --build-arg LOCK=providers -t gateway .

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
ARG LOCK=runtime
# Every dependency ships as a wheel with its hash in the lock: nothing is compiled, nothing floats.
COPY requirements/pip.lock requirements/${LOCK}.lock requirements/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements/pip.lock \
 && /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements/${LOCK}.lock
COPY pyproject.toml README.md ./
COPY gateway gateway
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --create-home gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_STATE_PATH=/var/lib/gateway/state.db
WORKDIR /var/lib/gateway
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=2).status != 200)"]
ENTRYPOINT ["gateway", "serve"]
CMD ["--config", "/etc/gateway/gateway.yaml"]
