#!/bin/sh
# Set up a virtual environment (once) and run the whole test suite.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check gateway tests bench
exec .venv/bin/python -m pytest "$@"
