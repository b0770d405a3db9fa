"""Protocol state a transparent relay keeps for one MQTT connection.

The relay forwards packets unchanged; this object only checks that each one is
legal where it appears (who may send it, CONNECT first, CONNACK first) and
remembers what the relay needs: the CONNECT, the CONNACK code and the
keep-alive to enforce. No I/O and no clock: callers pass time in.
"""

from __future__ import annotations

from .constants import MQTT_5, PacketType
from .errors import MQTTProtocolError
from .packets import Connack, Connect, Packet
from .properties import Property

# Which side may send which packet (3.1.1 section 2.2.1, 5.0 section 2.1.2).
CLIENT_PACKETS = frozenset(
    {
        PacketType.CONNECT,
        PacketType.PUBLISH,
        PacketType.PUBACK,
        PacketType.PUBREC,
        PacketType.PUBREL,
        PacketType.PUBCOMP,
        PacketType.SUBSCRIBE,
        PacketType.UNSUBSCRIBE,
        PacketType.PINGREQ,
        PacketType.DISCONNECT,
        PacketType.AUTH,
    }
)
SERVER_PACKETS = frozenset(
    {
        PacketType.CONNACK,
        PacketType.PUBLISH,
        PacketType.PUBACK,
        PacketType.PUBREC,
        PacketType.PUBREL,
        PacketType.PUBCOMP,
        PacketType.SUBACK,
        PacketType.UNSUBACK,
        PacketType.PINGRESP,
        PacketType.DISCONNECT,
        PacketType.AUTH,
    }
)

# Keep-alive grace: a server closes after 1.5 x the client's keep-alive (3.1.1 section 3.1.2.10).
KEEP_ALIVE_FACTOR = 1.5


class RelayState:
    """Checks the packets of one relayed connection, in both directions."""

    __slots__ = ("connect", "connack_code", "keep_alive", "client_disconnected", "_server_spoke")

    def __init__(self) -> None:
        self.connect: Connect | None = None
        self.connack_code: int | None = None
        self.keep_alive = 0  # seconds; 0 = not enforced
        self.client_disconnected = False
        self._server_spoke = False

    @property
    def protocol_level(self) -> int | None:
        return self.connect.protocol_level if self.connect else None

    @property
    def keep_alive_timeout(self) -> float | None:
        """Seconds of client silence after which the connection must be closed."""
        return self.keep_alive * KEEP_ALIVE_FACTOR if self.keep_alive else None

    def keep_alive_deadline(self, last_heard: float) -> float:
        """When the client is considered gone, given when it was last heard (inf: never)."""
        timeout = self.keep_alive_timeout
        return last_heard + timeout if timeout is not None else float("inf")

    def client_packet(self, packet: Packet) -> None:
        """A packet from the client (device). Raises MQTTProtocolError if it is illegal here."""
        ptype = packet.type
        if self.client_disconnected:
            raise MQTTProtocolError(f"{ptype.name} after DISCONNECT")
        if self.connect is None:
            if not isinstance(packet, Connect):
                raise MQTTProtocolError(f"first packet is {ptype.name}, not CONNECT")
            self.connect = packet
            self.keep_alive = packet.keep_alive
            return
        if ptype not in CLIENT_PACKETS or ptype is PacketType.CONNECT:
            what = (
                "second CONNECT" if ptype is PacketType.CONNECT else f"{ptype.name} from a client"
            )
            raise MQTTProtocolError(what)
        if ptype is PacketType.DISCONNECT:
            self.client_disconnected = True

    def server_packet(self, packet: Packet) -> None:
        """A packet from the server (upstream). Raises MQTTProtocolError if it is illegal here."""
        ptype = packet.type
        v5 = self.protocol_level == MQTT_5
        if not self._server_spoke:
            # 5.0 enhanced authentication may exchange AUTH before CONNACK.
            if not (isinstance(packet, Connack) or (v5 and ptype is PacketType.AUTH)):
                raise MQTTProtocolError(f"server's first packet is {ptype.name}, not CONNACK")
        if ptype not in SERVER_PACKETS:
            raise MQTTProtocolError(f"{ptype.name} from a server")
        if ptype is PacketType.DISCONNECT and not v5:
            raise MQTTProtocolError("DISCONNECT from a server before MQTT 5")
        if isinstance(packet, Connack):
            if self.connack_code is not None:
                raise MQTTProtocolError("second CONNACK")
            self.connack_code = packet.return_code
            if v5:
                server_keep_alive = packet.property(Property.SERVER_KEEP_ALIVE)
                if isinstance(server_keep_alive, int):
                    # 5.0 section 3.2.2.3.14: the client must use the server's value.
                    self.keep_alive = server_keep_alive
        self._server_spoke = True
