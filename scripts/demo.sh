#!/bin/sh
# Set up a virtual environment (once) and run the end-to-end demo:
# local IoT Hub emulator (TLS) + gateway + sample AMQP and MQTT devices.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[sim]'
exec .venv/bin/iot-gateway demo "$@"
