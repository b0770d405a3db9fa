"""IoT Hub emulator for tests, benchmarks and the demo.

Built on python-qpid-proton (AMQP) and amqtt's MQTT codec, never on the
gateway's own protocol code, so a codec bug cannot hide behind itself.
"""

from __future__ import annotations

from .certs import CertPair
from .hub import HubSim
from .records import (
    AuthRecord,
    CbsRecord,
    ConnectionRecord,
    D2CRecord,
    DispositionRecord,
    FeedbackRecord,
    LinkRecord,
    ProtocolConnections,
    Recorder,
)
from .sas import make_token

__all__ = [
    "AuthRecord",
    "CbsRecord",
    "CertPair",
    "ConnectionRecord",
    "D2CRecord",
    "DispositionRecord",
    "FeedbackRecord",
    "HubSim",
    "LinkRecord",
    "ProtocolConnections",
    "Recorder",
    "make_token",
]
