#!/bin/sh
# Regenerate the dependency locks in requirements/ from pyproject.toml.
#
#   sh scripts/lock.sh                        # after editing dependencies: add/drop what changed,
#                                             # every other pin stays where it is
#   sh scripts/lock.sh --upgrade              # move every pin to the newest release
#   sh scripts/lock.sh --upgrade-package trio # move one
#   sh scripts/lock.sh --tool 0.14.0          # change the version of uv that makes the locks
#
# Each lock pins exact versions with the sha256 of every file PyPI has for them (the wheels for
# every platform and the sdist), resolved once for Python >= 3.11 on any OS and architecture
# (uv's universal mode; platform-specific packages carry markers). So the same lock installs
# with `pip install --require-hashes` on x86_64, aarch64 and armv7 (which builds from the sdist
# where PyPI has no wheel; see docs/operations.md).
#
#   requirements/runtime.lock  the daemon: systemd/install.sh, the Dockerfile
#   requirements/sim.lock      + the `sim` extra (hub emulator): scripts/demo.sh, the benchmarks
#   requirements/test.lock     + every extra: scripts/test.sh, .ci/run
#   requirements/sdk.lock      the Azure device SDKs tests/sdk drives (.venv-sdk), from sdk.in
#   requirements/mutation.lock mutmut for scripts/mutation.sh (on top of test.lock), from mutation.in
#
# All three agree on every version they share: test.lock is resolved first and the others are
# constrained to it. Each also pins setuptools, the build backend, so the project itself
# installs with `pip install --no-deps --no-build-isolation` from locked parts only.
#
# A merge conflict in a lock: take either side (git checkout --theirs requirements/), then run
# this script again.
set -eu
cd "$(dirname "$0")/.."

TOOL_DIR=build/lock-tool
TOOL_LOCK=requirements/lock-tool.txt
# Lower bound for the universal resolution; the same as requires-python in pyproject.toml.
PYTHON_VERSION=3.11

tool_version() {
    sed -n 's/^uv==\([^ ]*\).*/\1/p' "$TOOL_LOCK"
}

# uv itself comes from PyPI, at the version and hashes in requirements/lock-tool.txt, in a
# virtual environment of its own (build/ is ignored by git), made once.
install_tool() {
    want=$(tool_version)
    if [ -x "$TOOL_DIR/bin/uv" ] && [ "$("$TOOL_DIR/bin/uv" --version | cut -d' ' -f2)" = "$want" ]; then
        return
    fi
    rm -rf "$TOOL_DIR"
    python3 -m venv "$TOOL_DIR"
    "$TOOL_DIR/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-hashes -r "$TOOL_LOCK"
}

compile() {
    out=$1
    shift
    # --no-config: no uv.toml of the user's changes the result.
    "$TOOL_DIR/bin/uv" pip compile --quiet --no-config --universal \
        --python-version "$PYTHON_VERSION" --generate-hashes \
        --custom-compile-command "sh scripts/lock.sh" --output-file "$out" "$@"
}

install_tool

if [ "${1:-}" = "--tool" ]; then
    [ $# -eq 2 ] || { echo "usage: sh scripts/lock.sh --tool VERSION" >&2; exit 2; }
    echo "uv==$2" | "$TOOL_DIR/bin/uv" pip compile --quiet --no-config --universal \
        --python-version "$PYTHON_VERSION" --generate-hashes \
        --custom-compile-command "sh scripts/lock.sh --tool $2" --output-file "$TOOL_LOCK" -
    install_tool
    echo "lock.sh: uv $(tool_version); now run sh scripts/lock.sh"
    exit 0
fi

build_in=requirements/build.in
compile requirements/test.lock pyproject.toml "$build_in" --all-extras "$@"
compile requirements/sim.lock pyproject.toml "$build_in" --extra sim -c requirements/test.lock "$@"
compile requirements/runtime.lock pyproject.toml "$build_in" -c requirements/test.lock "$@"
# The Azure device SDKs' own environment for tests/sdk (paho-mqtt<2: not constrained to test.lock).
compile requirements/sdk.lock requirements/sdk.in "$@"
# mutmut for scripts/mutation.sh, installed on top of test.lock.
compile requirements/mutation.lock requirements/mutation.in -c requirements/test.lock "$@"

for lock in requirements/runtime.lock requirements/sim.lock requirements/test.lock requirements/sdk.lock \
    requirements/mutation.lock; do
    echo "$lock: $(grep -c '^[A-Za-z0-9]' "$lock") packages"
done
