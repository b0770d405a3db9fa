#!/bin/sh
# Set up a virtual environment (once) and run the whole test suite.
# Dependencies come from requirements/test.lock (exact versions, hash-checked; regenerate
# with sh scripts/lock.sh), the project itself is installed editable on top.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --require-hashes -r requirements/test.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/ruff check gateway tests bench
exec .venv/bin/python -m pytest "$@"
