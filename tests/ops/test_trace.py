"""Frame trace: readable lines, and never a token, a password or a message body."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from proton import Connection, Message, Transport

from gateway.amqp.framing import (
    FRAME_SASL,
    SASL_HEADER,
    FrameReader,
    encode_frame,
    encode_transfer_frame,
)
from gateway.amqp.performatives import Attach, Detach, Error, SaslMechanisms, Source, Target
from gateway.amqp.types import Symbol, UInt
from gateway.mqtt.reader import PacketReader
from gateway.ops.trace import FrameTracer, format_amqp, redact_text

SIG = "TOPSECRETSIG%2Babc%3D"
TOKEN = f"SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig={SIG}&se=1700000000"
BODY_MARKER = "temperature-reading-42"


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def trace_log() -> Iterator[tuple[logging.Logger, ListHandler]]:
    logger = logging.getLogger("test.trace")
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


def assert_clean(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert "TOPSECRETSIG" not in text
    assert TOKEN not in text
    assert BODY_MARKER not in text


def proton_sasl_plain_frames() -> bytes:
    """What a proton client sends for SASL PLAIN with a SAS token as password."""
    transport = Transport()
    conn = Connection()
    conn.user = "dev1@sas.myhub"
    conn.password = TOKEN
    transport.bind(conn)
    sasl = transport.sasl()
    sasl.allowed_mechs("PLAIN")
    sasl.allow_insecure_mechs = True
    conn.open()
    header = transport.peek(transport.pending())
    transport.pop(len(header))
    assert bytes(header) == SASL_HEADER
    mechanisms = encode_frame(
        SaslMechanisms(sasl_server_mechanisms=Symbol("PLAIN")), 0, frame_type=FRAME_SASL
    )
    transport.push(SASL_HEADER + mechanisms)
    out = bytes(transport.peek(transport.pending()))
    assert TOKEN.encode() in out  # the secret really is on the wire
    return out


def test_sasl_plain_from_proton_is_redacted(trace_log) -> None:
    logger, handler = trace_log
    tracer = FrameTracer(logger, {"amqp"}, True)
    tracer.amqp("c1", "->", None, SASL_HEADER)
    reader = FrameReader()
    reader.feed(proton_sasl_plain_frames())
    while (frame := reader.next_frame()) is not None:
        tracer.amqp("c1", "<-", frame.channel, frame)
    assert handler.lines[0] == "[c1] -> SASL 1.0.0"
    assert (
        '@sasl-init(65) [mechanism=:PLAIN, initial-response=<PLAIN user="dev1@sas.myhub" password=<redacted>>'
        in handler.lines[1]
    )
    assert_clean(handler.lines)


def test_cbs_put_token_transfer_body_is_length_only(trace_log) -> None:
    logger, handler = trace_log
    tracer = FrameTracer(logger, {"amqp"}, True)
    message = Message(
        body=TOKEN,
        properties={"operation": "put-token", "type": "servicebus.windows.net:sastoken",
                    "name": "myhub.azure-devices.net/devices/dev1", "note": BODY_MARKER},
        reply_to="cbs",
        id=1,
    )  # fmt: skip
    payload = message.encode()
    wire = encode_transfer_frame(1, 0, 7, b"\x00\x00\x00\x07", 0, False, False, payload)
    reader = FrameReader()
    reader.feed(wire)
    frame = reader.next_frame()
    assert frame is not None
    tracer.amqp("c3", "<-", frame.channel, frame)
    line = handler.lines[0]
    assert line.startswith(
        '[c3]:1 <- @transfer(20) [handle=0, delivery-id=7, delivery-tag=b"\\x00\\x00\\x00\\x07"'
    )
    assert line.endswith(f"<{len(payload)} bytes>")
    assert_clean(handler.lines)


def test_attach_and_errors_are_readable_and_scrubbed(trace_log) -> None:
    logger, handler = trace_log
    tracer = FrameTracer(logger, ["amqp"])
    attach = Attach(
        name="sender-link",
        handle=UInt(0),
        role=False,
        source=Source(address="sender-link"),
        target=Target(address="amqps://myhub.azure-devices.net/devices/dev1/messages/events"),
        properties={Symbol("com.microsoft:client-version"): "c-sdk/1.0"},
    )
    tracer.amqp("c12", "<-", 0, attach)
    detach = Detach(
        handle=UInt(0),
        closed=True,
        error=Error(
            condition=Symbol("amqp:unauthorized-access"), description=f"token {TOKEN} rejected"
        ),
    )
    tracer.amqp("c12", "->", 0, detach)
    assert handler.lines[0].startswith(
        '[c12]:0 <- @attach(18) [name="sender-link", handle=0, role=false,'
    )
    assert (
        'target=@target(41) [address="amqps://myhub.azure-devices.net/devices/dev1/messages/events"'
        in handler.lines[0]
    )
    assert ":com.microsoft:client-version=" in handler.lines[0]
    assert "condition=:amqp:unauthorized-access" in handler.lines[1]
    assert "sig=<redacted>" in handler.lines[1]
    assert_clean(handler.lines)


def paho_packets() -> bytes:
    """CONNECT (password = token) and a QoS 1 PUBLISH as paho writes them."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev1", protocol=paho.MQTTv311)
    client.username_pw_set("myhub.azure-devices.net/dev1/?api-version=2021-04-12", TOKEN)
    client.will_set("devices/dev1/messages/events/", f"bye {BODY_MARKER}", qos=1)
    try:
        client.connect("127.0.0.1", server.getsockname()[1], keepalive=60)
        peer, _ = server.accept()
        peer.settimeout(5)
        peer.sendall(b"\x20\x02\x00\x00")  # CONNACK accepted
        client.loop(timeout=1.0)
        client.publish("devices/dev1/messages/events/", f"{BODY_MARKER} 21.5C", qos=1)
        data = b""
        for _ in range(20):  # bounded: until CONNECT and PUBLISH have arrived
            client.loop(timeout=0.1)
            data += peer.recv(65536)
            reader = PacketReader()
            reader.feed(data)
            if len(reader.packets()) >= 2:
                break
        peer.close()
        return data
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
        server.close()


def test_mqtt_connect_and_publish_from_paho_are_redacted(trace_log) -> None:
    logger, handler = trace_log
    tracer = FrameTracer(logger, {"mqtt"}, True)
    data = paho_packets()
    assert TOKEN.encode() in data and BODY_MARKER.encode() in data
    reader = PacketReader()
    reader.feed(data)
    packets = reader.packets()
    assert [type(p).__name__ for p in packets][:2] == ["Connect", "Publish"]
    for packet in packets:
        tracer.mqtt("m7", "<-", packet)
    tracer.mqtt("m7", "<-", data)  # raw bytes are summarised, never dumped
    connect, publish = handler.lines[0], handler.lines[1]
    assert connect.startswith("[m7] <- CONNECT")
    assert 'client-id="dev1"' in connect and "password=<redacted>" in connect
    assert 'username="myhub.azure-devices.net/dev1/?api-version=2021-04-12"' in connect
    assert "will=[" in connect
    assert publish.startswith("[m7] <- PUBLISH")
    assert 'topic="devices/dev1/messages/events/"' in publish and "qos=1" in publish
    assert f"payload=<{len(BODY_MARKER) + 6} bytes>" in publish
    assert handler.lines[-1] == f"[m7] <- CONNECT <{len(data)} bytes>"
    assert_clean(handler.lines)


class Exploding:
    """An object that fails on any attribute access."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"tracer touched {name} while disabled")


def test_disabled_tracer_touches_nothing(trace_log) -> None:
    logger, handler = trace_log
    for tracer in (
        FrameTracer(logger, {"amqp", "mqtt"}, enabled=False),
        FrameTracer(logger, set()),
    ):
        tracer.amqp("c1", "->", 0, Exploding(), 10)
        tracer.mqtt("m1", "->", Exploding())
    only_amqp = FrameTracer(logger, {"amqp"})
    only_amqp.mqtt("m1", "->", Exploding())
    assert handler.lines == []


def test_logger_level_gates_formatting(trace_log) -> None:
    logger, handler = trace_log
    logger.setLevel(logging.WARNING)
    FrameTracer(logger, {"amqp"}).amqp("c1", "->", 0, Exploding())
    assert handler.lines == []


def test_broken_frame_object_does_not_raise(trace_log) -> None:
    logger, handler = trace_log
    tracer = FrameTracer(logger, {"amqp", "mqtt"})
    tracer.mqtt("m1", "->", Exploding())
    assert len(handler.lines) == 1 and "m1" in handler.lines[0]


def test_configure_and_heartbeat() -> None:
    tracer = FrameTracer(None, [])
    assert not tracer.amqp_enabled
    tracer.configure(["amqp", "mqtt"])
    assert tracer.amqp_enabled and tracer.mqtt_enabled
    with pytest.raises(ValueError):
        tracer.configure(["http"])
    assert format_amqp("c1", "->", 0, None) == "[c1]:0 -> (empty frame)"


def test_redact_text() -> None:
    assert "TOPSECRETSIG" not in redact_text(f"x {TOKEN} y")
    conn_str = "HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0a2V5"
    assert redact_text(conn_str) == "HostName=h;DeviceId=d;SharedAccessKey=<redacted>"
    assert redact_text("plain") == "plain"
