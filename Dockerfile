# syntax=docker/dockerfile:1
#
# iot-gateway container image: a builder stage makes a virtual environment,
# the runtime stage is python-slim plus that venv, running as a non-root user.
#
#   docker build -t iot-gateway .
#   docker run -d -p 5672:5672 -p 1883:1883 -p 127.0.0.1:9090:9090 \
#       -v $PWD/gateway.yaml:/etc/iot-gateway/gateway.yaml:ro iot-gateway
#
# Multi-architecture (amd64, arm64 for a Pi 4/5 with a 64-bit OS, armv7 for
# 32-bit Raspberry Pi OS), see docs/operations.md:
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t REGISTRY/iot-gateway:TAG --push .
#
# The built-in configuration (deploy/gateway.yaml) serves the admin endpoint on
# 0.0.0.0:9090 inside the container, so health checks, Kubernetes probes and
# Prometheus can reach it; publish that port to the host's loopback only, or
# not at all.

ARG PYTHON_VERSION=3.11

# --- builder ------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ARG TARGETARCH
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# 32-bit ARM has no binary wheels for some dependencies (PyYAML): give pip a
# compiler there. The compiler stays in this stage; the runtime image never sees it.
RUN if [ "$TARGETARCH" = "arm" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev libyaml-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN python -m venv /opt/iot-gateway/venv \
    && /opt/iot-gateway/venv/bin/pip install --upgrade pip

WORKDIR /src
# Dependencies first, so editing the code does not rebuild this layer.
COPY pyproject.toml README.md ./
RUN mkdir gateway && touch gateway/__init__.py \
    && /opt/iot-gateway/venv/bin/pip install . \
    && /opt/iot-gateway/venv/bin/pip uninstall -y iot-gateway
COPY gateway ./gateway
RUN /opt/iot-gateway/venv/bin/pip install --no-deps . \
    && /opt/iot-gateway/venv/bin/python -m compileall -q /opt/iot-gateway/venv \
    && /opt/iot-gateway/venv/bin/iot-gateway version

# --- runtime ------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="iot-gateway" \
      org.opencontainers.image.description="Transparent AMQP 1.0 / MQTT gateway: plaintext devices on the LAN, TLS to Azure IoT Hub" \
      org.opencontainers.image.licenses="MIT"

# A fixed numeric uid/gid so Kubernetes runAsNonRoot can verify it and mounted
# files (a client key, say) can be made readable to it.
RUN groupadd --system --gid 10001 iot-gateway \
    && useradd --system --uid 10001 --gid iot-gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin iot-gateway

COPY --from=builder /opt/iot-gateway/venv /opt/iot-gateway/venv
COPY deploy/gateway.yaml /etc/iot-gateway/gateway.yaml

ENV PATH=/opt/iot-gateway/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IOTGW_HEALTH_URL=http://127.0.0.1:9090/healthz

USER 10001:10001
WORKDIR /

# AMQP and MQTT for devices, admin (metrics, health, /api) for operators.
EXPOSE 5672 1883 9090

# No curl in the image: the health check is a few lines of the Python we ship.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['IOTGW_HEALTH_URL'], timeout=4).status == 200 else 1)"]

# SIGTERM drains (stop accepting, let in-flight deliveries settle for up to
# gateway.drain_timeout, detach cleanly); give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["iot-gateway"]
CMD ["run", "-c", "/etc/iot-gateway/gateway.yaml"]
