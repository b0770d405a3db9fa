#!/bin/sh
# Set up a virtual environment (once) and run the whole test suite.
# Dependencies come from requirements/test.lock (exact versions, hash-checked; regenerate
# with sh scripts/lock.sh), the project itself is installed editable on top.
set -eu
cd "$(dirname "$0")/.."
. scripts/sim-prereqs.sh
make_venv
sim_prereqs .venv/bin/python
.venv/bin/python -m pip install -q --require-hashes -r requirements/test.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
sim_check_tls .venv/bin/python
# The Azure device SDKs tests/sdk drives: azure-iot-device (pins paho-mqtt<2) and uamqp
# in their own environment, the Node.js SDK from its lock file (needs node and npm).
if [ ! -x .venv-sdk/bin/python ]; then
    python3 -m venv .venv-sdk
fi
.venv-sdk/bin/python -m pip install -q --require-hashes -r requirements/sdk.lock
if command -v npm >/dev/null 2>&1; then
    if [ ! -d tests/sdk/node/node_modules ] || \
       [ tests/sdk/node/package-lock.json -nt tests/sdk/node/node_modules/.package-lock.json ]; then
        (cd tests/sdk/node && npm ci --no-audit --no-fund --loglevel=error)
    fi
else
    echo "scripts/test.sh: npm not found: the Node.js SDK tests will be skipped" >&2
fi
.venv/bin/ruff check gateway tests bench
exec .venv/bin/python -m pytest "$@"
