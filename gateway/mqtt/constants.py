"""MQTT packet types, protocol levels and the reason codes the gateway uses."""

from __future__ import annotations

from enum import IntEnum


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15  # MQTT 5 only; reserved in 3.1.1


# Protocol levels carried in CONNECT.
MQTT_3_1 = 3  # protocol name "MQIsdp"
MQTT_3_1_1 = 4
MQTT_5 = 5

SUPPORTED_PROTOCOLS = {("MQIsdp", MQTT_3_1), ("MQTT", MQTT_3_1_1), ("MQTT", MQTT_5)}

# Largest value the 4-byte remaining-length encoding can carry (3.1.1 section 2.2.3).
MAX_REMAINING_LENGTH = 268_435_455

# Default device-side limit: IoT Hub's 256 KiB message plus room for topic and headers.
DEFAULT_MAX_PACKET_SIZE = 262_144 + 1024

# Fixed-header flag nibble each packet type must carry (3.1.1 table 2.2 / 5.0 table 2-2).
# PUBLISH is absent: its flags are DUP/QoS/RETAIN and are checked separately.
REQUIRED_FLAGS: dict[int, int] = {
    PacketType.CONNECT: 0,
    PacketType.CONNACK: 0,
    PacketType.PUBACK: 0,
    PacketType.PUBREC: 0,
    PacketType.PUBREL: 2,
    PacketType.PUBCOMP: 0,
    PacketType.SUBSCRIBE: 2,
    PacketType.SUBACK: 0,
    PacketType.UNSUBSCRIBE: 2,
    PacketType.UNSUBACK: 0,
    PacketType.PINGREQ: 0,
    PacketType.PINGRESP: 0,
    PacketType.DISCONNECT: 0,
    PacketType.AUTH: 0,
}


class ConnackCode(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


# MQTT 5 reason codes the gateway itself emits.
V5_SUCCESS = 0x00
V5_MALFORMED_PACKET = 0x81
V5_PROTOCOL_ERROR = 0x82
V5_UNSUPPORTED_PROTOCOL_VERSION = 0x84
V5_NOT_AUTHORIZED = 0x87
V5_SERVER_UNAVAILABLE = 0x88
V5_KEEP_ALIVE_TIMEOUT = 0x8D
V5_TOPIC_NAME_INVALID = 0x90
V5_PACKET_TOO_LARGE = 0x95

# 3.1.1 CONNACK code -> the MQTT 5 reason code with the same meaning.
V5_CONNACK_EQUIVALENT = {
    ConnackCode.ACCEPTED: V5_SUCCESS,
    ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION: V5_UNSUPPORTED_PROTOCOL_VERSION,
    ConnackCode.IDENTIFIER_REJECTED: 0x85,
    ConnackCode.SERVER_UNAVAILABLE: V5_SERVER_UNAVAILABLE,
    ConnackCode.BAD_USERNAME_OR_PASSWORD: 0x86,
    ConnackCode.NOT_AUTHORIZED: V5_NOT_AUTHORIZED,
}
