"""A frame-level AMQP 1.0 client over a plain socket, encoded with proton's codec.

proton's Python API cannot set a transfer's message-format, so batch sends
(message-format 0x80013700, as the IoT Hub SDKs use) are written frame by frame here.
Performatives are encoded and decoded with `proton.Data`, not with the gateway's codec.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from proton import Data, Described, Message, symbol, ubyte, uint, ulong, ushort

from tests.waiting import FAILSAFE

OPEN, BEGIN, ATTACH, FLOW, TRANSFER, DISPOSITION, DETACH, END, CLOSE = range(0x10, 0x19)
SASL_MECHANISMS, SASL_INIT, SASL_OUTCOME = 0x40, 0x41, 0x44
SOURCE, TARGET = 0x28, 0x29
ACCEPTED, REJECTED, RELEASED = 0x24, 0x25, 0x26
BATCH_FORMAT = 0x80013700


@dataclass
class Frame:
    channel: int
    descriptor: int | None
    fields: list[Any]
    payload: bytes


def encode_performative(descriptor: int, fields: list[Any]) -> bytes:
    data = Data()
    data.put_object(Described(ulong(descriptor), fields))
    return bytes(data.encode())


def frame(body: bytes, channel: int = 0, frame_type: int = 0) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, frame_type, channel) + body


class RawAmqpClient:
    def __init__(self, port: int, timeout: float = FAILSAFE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""
        self.frames: list[Frame] = []
        self.next_outgoing_id = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("peer closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read_frame(self, deadline: float) -> Frame:
        while True:
            size, doff, _ftype, channel = struct.unpack(">IBBH", self._recv_exact(8, deadline))
            rest = self._recv_exact(size - 8, deadline)
            body = rest[doff * 4 - 8 :]
            if not body:
                continue  # empty frame: keep-alive
            data = Data()
            used = data.decode(body)
            data.rewind()
            data.next()
            obj = data.get_object()
            return Frame(channel, int(obj.descriptor), list(obj.value or []), body[used:])

    def expect(self, descriptor: int, predicate: Any = None, timeout: float | None = None) -> Frame:
        deadline = time.monotonic() + (timeout or self.timeout)
        for i, f in enumerate(self.frames):
            if f.descriptor == descriptor and (predicate is None or predicate(f)):
                return self.frames.pop(i)
        while True:
            f = self.read_frame(deadline)
            if f.descriptor == CLOSE and descriptor != CLOSE:
                raise ConnectionError(f"connection closed by peer: {f.fields}")
            if f.descriptor == descriptor and (predicate is None or predicate(f)):
                return f
            self.frames.append(f)

    def send(
        self, descriptor: int, fields: list[Any], payload: bytes = b"", channel: int = 0
    ) -> None:
        self.sock.sendall(frame(encode_performative(descriptor, fields) + payload, channel))

    # --- handshake --------------------------------------------------------

    def handshake(self, hostname: str = "myhub.azure-devices.net") -> None:
        deadline = time.monotonic() + self.timeout
        self.sock.sendall(b"AMQP\x03\x01\x00\x00")
        assert self._recv_exact(8, deadline) == b"AMQP\x03\x01\x00\x00"
        mechs = self.read_frame(deadline)
        assert mechs.descriptor == SASL_MECHANISMS, mechs
        self.sock.sendall(
            frame(encode_performative(SASL_INIT, [symbol("ANONYMOUS"), b""]), frame_type=1)
        )
        outcome = self.read_frame(deadline)
        assert outcome.descriptor == SASL_OUTCOME and outcome.fields[0] == 0, outcome
        self.sock.sendall(b"AMQP\x00\x01\x00\x00")
        assert self._recv_exact(8, deadline) == b"AMQP\x00\x01\x00\x00"
        self.send(OPEN, ["raw-device", hostname, uint(65536), ushort(15)])
        self.expect(OPEN)
        self.send(BEGIN, [None, uint(0), uint(5000), uint(5000)])
        self.expect(BEGIN)

    def attach(
        self, handle: int, name: str, *, receiver: bool, source: str | None, target: str | None
    ) -> Frame:
        src = (
            Described(ulong(SOURCE), [source])
            if source is not None
            else Described(ulong(SOURCE), [])
        )
        tgt = (
            Described(ulong(TARGET), [target])
            if target is not None
            else Described(ulong(TARGET), [])
        )
        fields = [name, uint(handle), receiver, ubyte(0), ubyte(0), src, tgt]
        if not receiver:
            fields += [
                None,
                False,
                uint(0),
            ]  # unsettled, incomplete-unsettled, initial-delivery-count
        self.send(ATTACH, fields)
        return self.expect(ATTACH, lambda f: f.fields[0] == name)

    def grant(self, handle: int, credit: int, delivery_count: int = 0) -> None:
        self.send(
            FLOW,
            [
                uint(0),
                uint(5000),
                uint(self.next_outgoing_id),
                uint(5000),
                uint(handle),
                uint(delivery_count),
                uint(credit),
            ],
        )

    def wait_credit(self, handle: int) -> None:
        self.expect(
            FLOW, lambda f: len(f.fields) > 6 and f.fields[4] == handle and (f.fields[6] or 0) > 0
        )

    def transfer(
        self, handle: int, delivery_id: int, tag: bytes, payload: bytes, *, message_format: int = 0
    ) -> None:
        self.send(
            TRANSFER,
            [uint(handle), uint(delivery_id), tag, uint(message_format), False, False],
            payload,
        )
        self.next_outgoing_id += 1

    def wait_disposition(self, delivery_id: int) -> Frame:
        def covers(f: Frame) -> bool:
            first = f.fields[1]
            last = f.fields[2] if len(f.fields) > 2 and f.fields[2] is not None else first
            return f.fields[0] is True and first <= delivery_id <= last

        return self.expect(DISPOSITION, covers)

    def put_token(self, device_id: str, hub_host: str = "myhub.azure-devices.net") -> Message:
        self.attach(0, "$cbs-sender", receiver=False, source="$cbs-sender", target="$cbs")
        self.attach(1, "$cbs-receiver", receiver=True, source="$cbs", target="cbs")
        self.grant(1, 10)
        self.wait_credit(0)
        request = Message(
            id=ulong(0),
            reply_to="cbs",
            properties={
                "operation": "put-token",
                "type": "servicebus.windows.net:sastoken",
                "name": f"{hub_host}/devices/{device_id}",
            },
            body="SharedAccessSignature sr=x&sig=y&se=1",
        )
        self.transfer(0, 0, b"\x00", request.encode())
        self.wait_disposition(0)
        reply_frame = self.expect(TRANSFER, lambda f: f.fields[0] == 1)
        if len(reply_frame.fields) < 5 or not reply_frame.fields[4]:
            self.send(
                DISPOSITION,
                [True, reply_frame.fields[1], None, True, Described(ulong(ACCEPTED), [])],
            )
        reply = Message()
        reply.decode(reply_frame.payload)
        return reply
