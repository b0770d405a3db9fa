#!/bin/sh
# Install (or upgrade) iot-gateway as a systemd service on a Raspberry Pi or
# any Debian-like system. Safe to run again: it never overwrites an existing
# /etc/iot-gateway/gateway.yaml and only restarts the service if it was running.
#
#   sudo systemd/install.sh                    # from a checkout of the repository
#   sudo systemd/install.sh --config config/iothub-mqtt.yaml
#   sudo systemd/install.sh --no-start         # install and enable, start later
#   systemd/install.sh --dry-run               # print what would be done
#   --build-deps / --no-build-deps             # force / skip the compiler (see below)
#   --root DIR                                 # stage every file under DIR (packaging, tests)
#
# Dependencies come from requirements/runtime.lock: exact versions, every file
# checked against its sha256. Where PyPI has no wheel for this machine (PyYAML
# on 32-bit Raspberry Pi OS, armhf) pip builds from the locked sdist, so on
# armhf/armel the script installs gcc, python3-dev and libyaml-dev first.
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
BIN_DIR=/usr/local/bin
ROOT=
SERVICE_USER=iot-gateway
SRC=$(cd "$(dirname "$0")/.." && pwd)
EXAMPLE_CONFIG=
PYTHON=${PYTHON:-python3}
DRY_RUN=0
START=1
BUILD_DEPS=auto

usage() {
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --config) EXAMPLE_CONFIG=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        --source) SRC=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --build-deps) BUILD_DEPS=yes; shift ;;
        --no-build-deps) BUILD_DEPS=no; shift ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

[ -n "$EXAMPLE_CONFIG" ] || EXAMPLE_CONFIG="$SRC/config/iothub-amqp.yaml"
LOCK="$SRC/requirements/runtime.lock"
VENV="$ROOT$PREFIX/venv"

run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

say() { echo "iot-gateway install: $*"; }

# With --root nothing outside DIR is touched: no account, no ownership, no apt-get, no systemctl.
staged() { [ -n "$ROOT" ]; }

if [ "$DRY_RUN" = 0 ] && ! staged && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo), or with --dry-run to see the steps" >&2
    exit 1
fi
if [ ! -f "$LOCK" ]; then
    echo "install.sh: $LOCK is missing (--source must be a checkout of iot-gateway)" >&2
    exit 1
fi

APT_UPDATED=0
apt_install() {
    if staged; then
        echo "install.sh: needs the Debian packages $* (not installed with --root)" >&2
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: no apt-get; install $* by hand" >&2
        return 0
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        run apt-get update -qq
        APT_UPDATED=1
    fi
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# 1. Python with venv support (Raspberry Pi OS / Debian: python3-venv).
if ! "$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    say "installing python3-venv"
    apt_install python3 python3-venv
    if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
        echo "install.sh: need Python >= 3.11 with the venv module (Debian 12 / Raspberry Pi OS 12 or later)" >&2
        exit 1
    fi
fi

# 2. A compiler where PyPI has no wheel. Only PyYAML lacks one among the runtime dependencies,
# and only on 32-bit ARM (armhf: Raspberry Pi OS 32-bit; armel); pydantic-core has armv7
# wheels. We build from the locked, hash-checked sdist rather than take Debian's python3-yaml
# through --system-site-packages: that would be another version than the lock's, and would
# put every Debian Python package on the service's import path. Without a compiler PyYAML
# still installs (pure Python, slower parsing of the configuration only): --no-build-deps.
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)
if [ "$BUILD_DEPS" = auto ]; then
    case "$ARCH" in
        armhf | armel | arm | armv6l | armv7l) BUILD_DEPS=yes ;;
        *) BUILD_DEPS=no ;;
    esac
fi
if [ "$BUILD_DEPS" = yes ]; then
    say "installing a compiler for dependencies without a wheel on $ARCH"
    apt_install gcc libc6-dev python3-dev libyaml-dev
fi

# 3. Dedicated system user, no shell, no home directory of its own.
if staged; then
    :
elif getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
    say "user $SERVICE_USER exists"
else
    say "creating system user $SERVICE_USER"
    run useradd --system --user-group --no-create-home \
        --home-dir /var/lib/iot-gateway --shell /usr/sbin/nologin \
        --comment "iot-gateway service" "$SERVICE_USER"
fi

# 4. Virtual environment under $PREFIX: the locked dependencies (hash-checked), then the
# gateway itself, built with the locked setuptools (no other download).
run install -d -m 0755 "$ROOT$PREFIX" "$ROOT$PREFIX/docs"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment in $VENV"
    run "$PYTHON" -m venv "$VENV"
fi
say "installing the dependencies in $LOCK"
run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes -r "$LOCK"
say "installing iot-gateway from $SRC"
run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-deps --no-build-isolation --force-reinstall "$SRC"
if [ -f "$SRC/docs/operations.md" ]; then
    run install -m 0644 "$SRC/docs/operations.md" "$ROOT$PREFIX/docs/operations.md"
fi
# A convenience link so `iot-gateway status` works from any shell.
run install -d -m 0755 "$ROOT$BIN_DIR"
run ln -sfn "$PREFIX/venv/bin/iot-gateway" "$ROOT$BIN_DIR/iot-gateway"

# 5. Configuration: install the example once, never overwrite.
if staged; then
    owner=""
else
    owner="-o root -g $SERVICE_USER"
fi
# shellcheck disable=SC2086 # $owner is two options or none
run install -d -m 0750 $owner "$ROOT$CONFIG_DIR"
if [ -e "$ROOT$CONFIG_DIR/gateway.yaml" ]; then
    say "keeping existing $ROOT$CONFIG_DIR/gateway.yaml"
else
    say "installing example configuration $EXAMPLE_CONFIG -> $ROOT$CONFIG_DIR/gateway.yaml (edit the hub name)"
    # shellcheck disable=SC2086
    run install -m 0640 $owner "$EXAMPLE_CONFIG" "$ROOT$CONFIG_DIR/gateway.yaml"
fi

# 6. The unit, enabled at boot, once the configuration checks out.
run install -d -m 0755 "$ROOT$UNIT_DIR"
run install -m 0644 "$SRC/systemd/iot-gateway.service" "$ROOT$UNIT_DIR/iot-gateway.service"
CONFIG_OK=1
if [ "$DRY_RUN" = 0 ] && ! "$VENV/bin/iot-gateway" check -c "$ROOT$CONFIG_DIR/gateway.yaml" >/dev/null; then
    "$VENV/bin/iot-gateway" check -c "$ROOT$CONFIG_DIR/gateway.yaml" || true
    CONFIG_OK=0
fi
if staged; then
    say "staged under $ROOT; not enabled or started"
    [ "$CONFIG_OK" = 1 ] || exit 1
    exit 0
fi
if [ "$DRY_RUN" = 0 ] && [ ! -d /run/systemd/system ]; then
    # A container or chroot: the files are in place, systemd takes over once booted.
    say "systemd is not running here: unit installed; once booted: systemctl enable --now iot-gateway"
    exit 0
fi
run systemctl daemon-reload
run systemctl enable iot-gateway.service

# 7. Start or restart.
if [ "$CONFIG_OK" = 0 ]; then
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
