# iot-gateway container image: a builder stage makes a virtual environment,
# the runtime stage is python-slim plus that venv, running as a non-root user.
#
#   docker build -t iot-gateway .
#   docker run -d -p 5672:5672 -p 1883:1883 -p 127.0.0.1:9090:9090 \
#       -v $PWD/gateway.yaml:/etc/iot-gateway/gateway.yaml:ro \
#       -v $PWD/admin-token:/etc/iot-gateway/admin-token:ro iot-gateway
#
# Builds with the classic builder (DOCKER_BUILDKIT=0) as well as BuildKit: no
# frontend image to pull, no BuildKit-only instructions or build arguments.
# Multi-architecture (amd64, arm64 for a Pi 4/5 with a 64-bit OS, armv7 for
# 32-bit Raspberry Pi OS), see docs/operations.md:
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t REGISTRY/iot-gateway:TAG --push .
#
# The base image is pinned by the digest of its multi-platform index, so a
# rebuild never picks up a moved tag; bump both FROM lines together (see
# docs/operations.md). Python dependencies come from requirements/runtime.lock,
# every file checked against its sha256.
#
# The built-in configuration (deploy/gateway.yaml) serves the admin endpoint on
# 0.0.0.0:9090 inside the container, so health checks, Kubernetes probes and
# Prometheus can reach it; /api/* there needs the bearer token of
# admin.token_file (/etc/iot-gateway/admin-token, mode 0600, uid 10001; mount
# it). Publish that port to the host's loopback only, or not at all.

# --- builder ------------------------------------------------------------------------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# 32-bit ARM has no PyYAML wheel on PyPI: give pip a compiler there for the locked
# sdist (the image's Python headers are in /usr/local/include). The architecture
# comes from the image itself, so this works without BuildKit's platform
# arguments. The compiler stays in this stage; the runtime image never sees it.
RUN case "$(dpkg --print-architecture)" in \
        armhf | armel) \
            apt-get update \
            && apt-get install -y --no-install-recommends gcc libc6-dev libyaml-dev \
            && rm -rf /var/lib/apt/lists/* ;; \
    esac

RUN python -m venv /opt/iot-gateway/venv

WORKDIR /src
# Dependencies first, so editing the code does not rebuild this layer.
COPY requirements/runtime.lock requirements/runtime.lock
RUN /opt/iot-gateway/venv/bin/pip install --require-hashes -r requirements/runtime.lock
# The gateway, built with the locked setuptools; setuptools is not needed at run time.
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
RUN /opt/iot-gateway/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/iot-gateway/venv/bin/pip uninstall -y setuptools \
    && /opt/iot-gateway/venv/bin/python -m compileall -q /opt/iot-gateway/venv \
    && /opt/iot-gateway/venv/bin/iot-gateway version

# --- runtime ------------------------------------------------------------------------
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS runtime

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
