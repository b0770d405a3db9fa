#!/bin/sh
# Install (or upgrade) iot-gateway as a systemd service on a Raspberry Pi or
# any Debian-like system. Safe to run again: it never overwrites an existing
# /etc/iot-gateway/gateway.yaml and only restarts the service if it was running.
#
#   sudo systemd/install.sh                    # from a checkout of the repository
#   sudo systemd/install.sh --config config/iothub-mqtt.yaml
#   sudo systemd/install.sh --no-start         # install and enable, start later
#   systemd/install.sh --dry-run               # print what would be done
#
# Layout:
#   /opt/iot-gateway/venv/        virtual environment with the gateway
#   /opt/iot-gateway/docs/        operations guide
#   /etc/iot-gateway/gateway.yaml configuration (root:iot-gateway 0640)
#   /etc/systemd/system/iot-gateway.service
#   user and group iot-gateway    (system account, no login, no home)
set -eu

PREFIX=/opt/iot-gateway
CONFIG_DIR=/etc/iot-gateway
UNIT_DIR=/etc/systemd/system
SERVICE_USER=iot-gateway
SRC=$(cd "$(dirname "$0")/.." && pwd)
EXAMPLE_CONFIG="$SRC/config/iothub-amqp.yaml"
PYTHON=${PYTHON:-python3}
DRY_RUN=0
START=1

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --config) EXAMPLE_CONFIG=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --source) SRC=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

say() { echo "iot-gateway install: $*"; }

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo), or with --dry-run to see the steps" >&2
    exit 1
fi

# 1. Python with venv support (Raspberry Pi OS / Debian: python3-venv).
if ! "$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    if command -v apt-get >/dev/null 2>&1; then
        say "installing python3-venv"
        run apt-get install -y python3 python3-venv
    else
        echo "install.sh: need Python >= 3.11 with the venv module" >&2
        [ "$DRY_RUN" = 1 ] || exit 1
    fi
fi

# 2. Dedicated system user, no shell, no home directory of its own.
if getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
    say "user $SERVICE_USER exists"
else
    say "creating system user $SERVICE_USER"
    run useradd --system --user-group --no-create-home \
        --home-dir /var/lib/iot-gateway --shell /usr/sbin/nologin \
        --comment "iot-gateway service" "$SERVICE_USER"
fi

# 3. Virtual environment under $PREFIX, with the gateway installed (upgraded).
run install -d -m 0755 "$PREFIX" "$PREFIX/docs"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    say "creating virtual environment in $PREFIX/venv"
    run "$PYTHON" -m venv "$PREFIX/venv"
fi
say "installing iot-gateway from $SRC"
run "$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
run "$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$SRC"
if [ -f "$SRC/docs/operations.md" ]; then
    run install -m 0644 "$SRC/docs/operations.md" "$PREFIX/docs/operations.md"
fi
# A convenience link so `iot-gateway status` works from any shell.
run ln -sfn "$PREFIX/venv/bin/iot-gateway" /usr/local/bin/iot-gateway

# 4. Configuration: install the example once, never overwrite.
run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
if [ -e "$CONFIG_DIR/gateway.yaml" ]; then
    say "keeping existing $CONFIG_DIR/gateway.yaml"
else
    say "installing example configuration $EXAMPLE_CONFIG -> $CONFIG_DIR/gateway.yaml (edit the hub name)"
    run install -m 0640 -o root -g "$SERVICE_USER" "$EXAMPLE_CONFIG" "$CONFIG_DIR/gateway.yaml"
fi

# 5. The unit, enabled at boot.
run install -m 0644 "$SRC/systemd/iot-gateway.service" "$UNIT_DIR/iot-gateway.service"
run systemctl daemon-reload
run systemctl enable iot-gateway.service

# 6. Validate, then start or restart.
if [ "$DRY_RUN" = 0 ] && ! "$PREFIX/venv/bin/iot-gateway" check -c "$CONFIG_DIR/gateway.yaml" >/dev/null; then
    "$PREFIX/venv/bin/iot-gateway" check -c "$CONFIG_DIR/gateway.yaml" || true
    say "fix $CONFIG_DIR/gateway.yaml, then: systemctl start iot-gateway"
    exit 0
fi
if [ "$START" = 1 ]; then
    if [ "$DRY_RUN" = 0 ] && systemctl is-active --quiet iot-gateway.service; then
        say "restarting the running service (new code and unit)"
        run systemctl restart iot-gateway.service
    else
        run systemctl start iot-gateway.service
    fi
    say "done: journalctl -u iot-gateway -f; iot-gateway status"
else
    say "installed and enabled; start with: systemctl start iot-gateway"
fi
