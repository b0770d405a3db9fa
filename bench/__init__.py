"""Benchmark harness: the same device traffic direct, through stunnel and through iot-gateway.

Run ``python -m bench --help``. Everything runs on loopback; every process the
harness starts is stopped again, also on Ctrl-C or an error.
"""

from __future__ import annotations
