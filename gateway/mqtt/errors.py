"""Errors raised by the MQTT codec.

Everything the codec raises for bad input is an `MQTTProtocolError`; callers
catch that one class. The error carries what the relay may tell the peer:
an MQTT 5 reason code, and for CONNECT problems the 3.1.1 CONNACK return code.
"""

from __future__ import annotations

from gateway.logsafe import shown


class MQTTError(Exception):
    """Base class of every error raised by `gateway.mqtt`."""


class MQTTProtocolError(MQTTError):
    """The peer broke the MQTT protocol; the connection must be closed.

    `reason` is a short human-readable description, safe to log (it never
    contains payload bytes or credentials).
    """

    #: MQTT 5 reason code a server would put in CONNACK/DISCONNECT (0x82 Protocol Error).
    reason_code: int = 0x82
    #: MQTT 3.1.1 CONNACK return code to answer a bad CONNECT with, if any.
    connack_code: int | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedPacket(MQTTProtocolError):
    """The bytes do not form a valid packet (0x81 Malformed Packet)."""

    reason_code = 0x81


class PacketTooLarge(MQTTProtocolError):
    """A packet's size (fixed header + remaining length) exceeds the limit.

    Raised as soon as the remaining length is known, before the body is buffered.
    """

    reason_code = 0x95

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"packet of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class ConnectTooLarge(PacketTooLarge):
    """The first packet, sent before the device is authenticated, exceeds the
    CONNECT limit (see `gateway.mqtt.limits`); raised once its fixed header is read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.reason = f"CONNECT of {size} bytes exceeds the limit of {limit} bytes"
        self.args = (self.reason,)


class UnsupportedProtocolVersion(MQTTProtocolError):
    """CONNECT names a protocol or level we cannot relay (3.1.1 CONNACK code 1)."""

    reason_code = 0x84
    connack_code = 1

    def __init__(self, protocol_name: str, protocol_level: int) -> None:
        super().__init__(f"unsupported protocol {shown(protocol_name)} level {protocol_level}")
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level
