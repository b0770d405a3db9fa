#!/bin/sh
# Set up a virtual environment (once) and run the end-to-end demo:
# local IoT Hub emulator (TLS) + gateway + sample AMQP and MQTT devices.
# Dependencies come from requirements/sim.lock (the runtime plus the `sim` extra, exact
# versions, hash-checked), the project itself is installed editable on top.
set -eu
cd "$(dirname "$0")/.."
. scripts/sim-prereqs.sh
make_venv
sim_prereqs .venv/bin/python
.venv/bin/python -m pip install -q --require-hashes -r requirements/sim.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
sim_check_tls .venv/bin/python
exec .venv/bin/iot-gateway demo "$@"
