"""Sans-I/O MQTT 3.1.1 / 5.0 codec: framing, packet views, encoders, topic rules.

No sockets, no clocks: bytes in (`PacketReader.feed`), packet views out
(`PacketReader.next_packet`), each view keeping its original bytes in `raw`.
"""

from __future__ import annotations

from .constants import (
    DEFAULT_MAX_PACKET_SIZE,
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    ConnackCode,
    PacketType,
)
from .errors import (
    ConnectTooLarge,
    MalformedPacket,
    MQTTError,
    MQTTProtocolError,
    PacketTooLarge,
    UnsupportedProtocolVersion,
)
from .packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
)
from .properties import Property
from .reader import PacketReader
from .session import RelayState
from .topics import TopicPolicy, filter_covers, topic_matches

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "MQTT_3_1",
    "MQTT_3_1_1",
    "MQTT_5",
    "Auth",
    "Connack",
    "ConnackCode",
    "Connect",
    "Disconnect",
    "MQTTError",
    "MQTTProtocolError",
    "MalformedPacket",
    "Packet",
    "PacketReader",
    "ConnectTooLarge",
    "PacketTooLarge",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Property",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "RelayState",
    "Suback",
    "Subscribe",
    "TopicPolicy",
    "Unsuback",
    "Unsubscribe",
    "UnsupportedProtocolVersion",
    "Will",
    "filter_covers",
    "topic_matches",
]
