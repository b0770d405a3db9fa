"""AMQP devices for black-box tests, built on python-qpid-proton's blocking API.

`ProtonDevice` does what an IoT Hub SDK does over plaintext AMQP: SASL ANONYMOUS, a CBS
link pair with put-token, a D2C sender sending pre-encoded message bytes unsettled, and a
C2D receiver that keeps the raw bytes and settles with a chosen outcome.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proton import Condition, Data, Delivery, Endpoint, Link, Message, symbol, ulong
from proton.handlers import MessagingHandler
from proton.reactor import LinkOption
from proton.utils import BlockingConnection, BlockingReceiver, BlockingSender

from tests.waiting import FAILSAFE

from .amqp_hub import raw_tag

HUB_HOST = "myhub.azure-devices.net"


class _TargetAddress(LinkOption):
    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: Link) -> None:
        link.target.address = self.address


class _LinkProperties(LinkOption):
    def __init__(self, properties: dict[Any, Any]) -> None:
        self.properties = properties

    def apply(self, link: Link) -> None:
        link.properties = self.properties


class _SettleModes(LinkOption):
    def __init__(self, snd: int, rcv: int) -> None:
        self.snd = snd
        self.rcv = rcv

    def apply(self, link: Link) -> None:
        link.snd_settle_mode = self.snd
        link.rcv_settle_mode = self.rcv


@dataclass
class RawIncoming:
    data: bytes
    tag: bytes
    delivery: Delivery
    settled_by_sender: bool


class _RawCollector(MessagingHandler):
    """Receiver handler that keeps each message's exact bytes and its delivery."""

    def __init__(self) -> None:
        super().__init__(prefetch=0, auto_accept=False)
        self.incoming: deque[RawIncoming] = deque()
        self.detached: Condition | None = None
        self.detached_seen = False

    def on_link_error(self, event: Any) -> None:
        # Record the peer's error and close only this link (the default closes the connection).
        self.detached = event.link.remote_condition
        self.detached_seen = True
        if event.link.state & Endpoint.LOCAL_ACTIVE:
            event.link.close()

    def on_link_closing(self, event: Any) -> None:
        self.detached_seen = True

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        if not dlv.readable or dlv.partial:
            return
        link = dlv.link
        data = link.recv(dlv.pending) or b""
        link.advance()
        self.incoming.append(RawIncoming(bytes(data), raw_tag(dlv), dlv, dlv.settled))


def put_token_request(
    device_id: str, token: str, *, message_id: Any = 0, reply_to: str | None = "cbs"
) -> Message:
    return Message(
        id=ulong(message_id) if isinstance(message_id, int) else message_id,
        reply_to=reply_to,
        properties={
            "operation": "put-token",
            "type": "servicebus.windows.net:sastoken",
            "name": f"{HUB_HOST}/devices/{device_id}",
        },
        body=token,
    )


class ProtonDevice:
    """One device connection through the gateway's plaintext AMQP listener."""

    def __init__(
        self,
        port: int,
        device_id: str,
        *,
        timeout: float = FAILSAFE,
        sasl: bool = True,
        plain: tuple[str, str] | None = None,
        max_frame_size: int | None = None,
        heartbeat: float | None = None,
    ) -> None:
        self.device_id = device_id
        self.timeout = timeout
        kwargs: dict[str, Any]
        if plain is not None:
            kwargs = {
                "allowed_mechs": "PLAIN",
                "allow_insecure_mechs": True,
                "user": plain[0],
                "password": plain[1],
            }
        elif sasl:
            kwargs = {"allowed_mechs": "ANONYMOUS"}
        else:
            kwargs = {"sasl_enabled": False}
        if max_frame_size is not None:
            kwargs["max_frame_size"] = max_frame_size
        self.conn = BlockingConnection(
            f"amqp://127.0.0.1:{port}", timeout=timeout, heartbeat=heartbeat, **kwargs
        )
        self._tags = itertools.count()
        self.cbs_sender: BlockingSender | None = None
        self.cbs_receiver: BlockingReceiver | None = None
        self.cbs_replies = _RawCollector()
        self.last_reply_raw = b""

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

    def drop(self) -> None:
        """Lose the connection abruptly: the socket closes without detach, end or close."""
        transport = self.conn.conn.transport
        transport.close_tail()
        transport.close_head()
        try:
            self.wait(lambda: False, timeout=FAILSAFE, what="socket closed")
        except ConnectionError:
            pass
        self.close()

    def __enter__(self) -> ProtonDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- CBS ----------------------------------------------------------------

    def open_cbs(
        self,
        *,
        sender_name: str = "cbs-sender",
        receiver_name: str = "cbs-receiver",
        reply_to: str | None = "cbs",
        receiver_target: str | None = None,
    ) -> None:
        """Attach the CBS pair; replies are kept raw in `cbs_replies`."""
        self.cbs_reply_to = reply_to
        self.cbs_sender = self.conn.create_sender("$cbs", name=sender_name)
        self.cbs_replies = _RawCollector()
        self.cbs_receiver = self.conn.create_receiver(
            "$cbs",
            name=receiver_name,
            credit=10,
            handler=self.cbs_replies,
            options=_TargetAddress(receiver_target or reply_to or "$cbs"),
        )

    def put_token(
        self, token: str = "SharedAccessSignature sr=x&sig=y&se=1", *, message_id: Any = 0
    ) -> tuple[Message, bytes]:
        """Send a put-token for this device; returns (reply, request bytes as encoded).

        The reply's exact bytes are in `last_reply_raw`."""
        if self.cbs_sender is None:
            self.open_cbs()
        assert self.cbs_sender is not None
        request = put_token_request(
            self.device_id, token, message_id=message_id, reply_to=self.cbs_reply_to
        )
        return self.send_cbs_request(request)

    def send_cbs_request(self, request: Message) -> tuple[Message, bytes]:
        """Send any CBS request on the open CBS pair; returns (reply, request bytes)."""
        assert self.cbs_sender is not None
        encoded = request.encode()
        dlv = self.send_raw(self.cbs_sender, encoded)
        self.wait_settled([dlv])
        self.wait_incoming(self.cbs_replies, 1)
        item = self.cbs_replies.incoming.popleft()
        if not item.settled_by_sender:
            self.settle_incoming(item, Delivery.ACCEPTED)
        self.last_reply_raw = item.data
        reply = Message()
        reply.decode(item.data)
        return reply, encoded

    # --- links ---------------------------------------------------------------

    def sender(
        self,
        address: str,
        *,
        name: str | None = None,
        properties: dict[Any, Any] | None = None,
        snd_settle_mode: int = Link.SND_UNSETTLED,
    ) -> BlockingSender:
        options: list[LinkOption] = [_SettleModes(snd_settle_mode, Link.RCV_FIRST)]
        if properties:
            options.append(_LinkProperties(properties))
        return self.conn.create_sender(address, name=name, options=options)

    def receiver(
        self,
        address: str,
        *,
        name: str | None = None,
        credit: int = 10,
        rcv_settle_mode: int = Link.RCV_FIRST,
    ) -> tuple[BlockingReceiver, _RawCollector]:
        collector = _RawCollector()
        rcv = self.conn.create_receiver(
            address,
            name=name,
            credit=credit,
            handler=collector,
            options=[_SettleModes(Link.SND_UNSETTLED, rcv_settle_mode)],
        )
        return rcv, collector

    def send_raw(self, sender: BlockingSender, data: bytes, tag: bytes | None = None) -> Delivery:
        link = sender.link
        dlv = link.delivery(tag if tag is not None else b"t%d" % next(self._tags))
        link.send(data)
        link.advance()
        return dlv

    def wait(
        self, condition: Callable[[], Any], timeout: float | None = None, what: str = ""
    ) -> None:
        """Drive this connection's I/O until condition() holds.

        The condition may depend on another thread (the hub), so I/O is processed in
        short slices rather than blocking until this connection has an event.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        container = self.conn.container
        saved = container.timeout
        container.timeout = 0.02
        try:
            while not condition():
                if self.conn.disconnected:
                    raise ConnectionError(f"device {self.device_id}: disconnected ({what})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"device {self.device_id}: timed out: {what}")
                container.process()
        finally:
            container.timeout = saved

    def wait_settled(self, deliveries: list[Delivery], timeout: float | None = None) -> None:
        self.wait(
            lambda: all(d.settled for d in deliveries), timeout, "deliveries settled by the gateway"
        )

    def pump(self, seconds: float) -> None:
        """Process I/O for a while without expecting anything (used to prove a negative)."""
        end = time.monotonic() + seconds
        try:
            self.wait(lambda: time.monotonic() >= end, seconds + 5, "pump")
        except TimeoutError:
            pass

    def wait_incoming(
        self, collector: _RawCollector, count: int = 1, timeout: float | None = None
    ) -> None:
        self.wait(
            lambda: len(collector.incoming) >= count, timeout, f"{count} message(s) from the hub"
        )

    def settle_incoming(
        self, item: RawIncoming, outcome: int, condition: Condition | None = None
    ) -> None:
        if condition is not None:
            item.delivery.local.condition = condition
        item.delivery.update(outcome)
        item.delivery.settle()


def message_sections(raw: bytes) -> dict[int, Any]:
    """Decode a message's sections with proton's codec, keeping AMQP types: {descriptor: value}."""
    out: dict[int, Any] = {}
    offset = 0
    while offset < len(raw):
        data = Data()
        used = data.decode(raw[offset:])
        data.rewind()
        data.next()
        section = data.get_object()
        out[int(section.descriptor)] = _owned(section.value)
        offset += used
    return out


def _owned(value: Any) -> Any:
    """proton hands out binary values as views into its own buffer: copy them out."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_owned(v) for v in value]
    if isinstance(value, dict):
        return {_owned(k): _owned(v) for k, v in value.items()}
    return value


def sample_messages(count: int) -> list[bytes]:
    """Messages with every kind of section a device might send, encoded by proton."""
    out = []
    for i in range(count):
        kind = i % 5
        msg = Message()
        msg.id = f"msg-{i}" if i % 2 else ulong(i)
        msg.correlation_id = i
        msg.content_type = "application/json"
        msg.content_encoding = "utf-8"
        if i % 3 == 0:
            msg.subject = "telemetry"
            msg.creation_time = 1700000000.0 + i
        msg.properties = {
            "seq": i,
            "kind": f"k{kind}",
            "temperature": 21.5 + i / 10,
            "flag": bool(i % 2),
        }
        msg.annotations = {symbol("iothub-connection-device-id-hint"): "d", symbol("x-opt-seq"): i}
        if i % 4 == 0:
            msg.instructions = {symbol("x-opt-delivery"): i}
        msg.durable = bool(i % 2)
        msg.priority = i % 10
        if kind == 0:
            msg.body = {"temp": 20 + i, "text": "héllo wörld", "values": [1, 2.5, None]}
        elif kind == 1:
            msg.inferred = True
            msg.body = bytes(range(256)) * (1 + i % 7)  # data section
        elif kind == 2:
            msg.inferred = True
            msg.body = [i, "seq", b"\x00\x01", 3.25]  # amqp-sequence section
        elif kind == 3:
            msg.body = "x" * (i * 37 % 9000)  # amqp-value string, sometimes multi-frame
        else:
            msg.body = None
        out.append(msg.encode())
    return out
