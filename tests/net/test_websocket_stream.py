"""WebSocketStream against a WebSocket server built on wsproto's server side in the test.

Good paths (binary both ways, fragments, pings, close handshakes) and every
bad input the hub could send: text frames, oversized or unparseable frames,
refused or garbage upgrades, closes with error codes.
"""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

from gateway.net.websocket_stream import (
    WebSocketError,
    WebSocketHandshakeError,
    WebSocketStream,
    open_websocket_stream,
)
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


class Hub:
    """The server end: wsproto over one side of an in-memory stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.request: Request | None = None
        self.events: list[object] = []

    async def accept(self, subprotocol: str | None = "mqtt") -> None:
        while self.request is None:
            self.ws.receive_data(await self.stream.receive_some(65536))
            for event in self.ws.events():
                if isinstance(event, Request):
                    self.request = event
        await self.stream.send_all(self.ws.send(AcceptConnection(subprotocol=subprotocol)))

    async def send(self, event: object) -> None:
        await self.stream.send_all(self.ws.send(event))  # type: ignore[arg-type]

    async def next_event(self) -> object:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def receive_bytes(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            event = await self.next_event()
            assert isinstance(event, BytesMessage), event
            got += event.data
        return got


async def connected(subprotocol: str = "mqtt", **kwargs: object) -> tuple[WebSocketStream, Hub]:
    client_end, server_end = trio.testing.memory_stream_pair()
    hub = Hub(server_end)
    result: list[WebSocketStream] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.accept, subprotocol)

        async def dial() -> None:
            result.append(
                await open_websocket_stream(
                    client_end,
                    host="hub.example",
                    port=443,
                    subprotocol=subprotocol,
                    **kwargs,  # type: ignore[arg-type]
                )
            )

        nursery.start_soon(dial)
    return result[0], hub


async def test_upgrade_request_and_binary_both_ways() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected("AMQPWSB10")
        assert hub.request is not None
        assert hub.request.target == "/$iothub/websocket"
        assert hub.request.host == "hub.example"
        assert hub.request.subprotocols == ["AMQPWSB10"]
        assert ws.subprotocol == "AMQPWSB10"
        await ws.send_all(b"AMQP\x03\x01\x00\x00")
        event = await hub.next_event()
        # One send_all is one complete binary message.
        assert isinstance(event, BytesMessage) and event.message_finished
        assert event.data == b"AMQP\x03\x01\x00\x00"
        await hub.send(Message(data=b"\x10\x02\x00\x00"))
        assert await ws.receive_some() == b"\x10\x02\x00\x00"


async def test_fragmented_message_arrives_in_order() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        parts = [b"a" * 1000, b"b" * 10, b"c" * 5000]
        for i, part in enumerate(parts):
            await hub.send(Message(data=part, message_finished=i == len(parts) - 1))
        got = b""
        while len(got) < sum(map(len, parts)):
            got += await ws.receive_some()
        assert got == b"".join(parts)


async def test_receive_some_respects_max_bytes() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.send(Message(data=bytes(range(100))))
        assert await ws.receive_some(30) == bytes(range(30))
        assert await ws.receive_some(30) == bytes(range(30, 60))
        assert await ws.receive_some(100) == bytes(range(60, 100))


async def test_ping_is_answered() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.send(Ping(payload=b"hello"))
        await hub.send(Message(data=b"after"))
        assert await ws.receive_some() == b"after"
        event = await hub.next_event()
        assert isinstance(event, Pong) and event.payload == b"hello"


async def test_text_frame_is_a_protocol_error_closed_with_1003() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.send(TextMessage(data="{}"))
        with pytest.raises(WebSocketError) as info:
            await ws.receive_some()
        assert info.value.code == 1003 and info.value.local
        assert "text message" in str(info.value)
        event = await hub.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1003
        # Broken from then on, for both directions.
        with pytest.raises(trio.BrokenResourceError):
            await ws.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await ws.send_all(b"x")


async def test_oversized_message_is_closed_with_1009() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected(max_message_size=1000)
        # Fragments under the limit one by one, over it together.
        await hub.send(Message(data=b"x" * 600, message_finished=False))
        await hub.send(Message(data=b"y" * 600, message_finished=True))
        got = await ws.receive_some()
        assert got == b"x" * 600
        with pytest.raises(WebSocketError) as info:
            await ws.receive_some()
        assert info.value.code == 1009
        event = await hub.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1009


async def test_messages_under_the_limit_reset_the_count() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected(max_message_size=1000)
        for _ in range(5):
            await hub.send(Message(data=b"z" * 900))
            assert await ws.receive_some() == b"z" * 900


async def test_unparseable_frame_is_closed_with_1002() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.stream.send_all(bytes([0x83, 0x00]))  # FIN + reserved opcode 3
        with pytest.raises(WebSocketError) as info:
            await ws.receive_some()
        assert info.value.code == 1002 and info.value.local
        event = await hub.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1002


async def test_huge_frame_header_is_refused_once_the_bytes_exceed_the_limit() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected(max_message_size=1024)
        # A binary frame announcing 2**40 bytes, then more than the limit of them.
        await hub.stream.send_all(bytes([0x82, 127]) + struct.pack("!Q", 2**40) + b"q" * 2048)
        with pytest.raises(WebSocketError) as info:
            while True:
                await ws.receive_some()
        assert info.value.code == 1009


async def test_close_1000_from_hub_is_end_of_stream_and_answered() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.send(Message(data=b"last"))
        await hub.send(CloseConnection(code=1000))
        assert await ws.receive_some() == b"last"
        assert await ws.receive_some() == b""
        assert await ws.receive_some() == b""
        event = await hub.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1000
        assert hub.ws.state is ConnectionState.CLOSED


async def test_close_with_error_code_from_hub_is_connection_loss() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.send(CloseConnection(code=1011, reason="server overloaded"))
        with pytest.raises(WebSocketError) as info:
            await ws.receive_some()
        assert info.value.code == 1011 and not info.value.local
        assert "1011" in str(info.value) and "server overloaded" in str(info.value)
        event = await hub.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1011


async def test_transport_end_without_close_is_end_of_stream() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await hub.stream.aclose()
        assert await ws.receive_some() == b""


async def test_aclose_does_the_close_handshake() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()

        async def answer() -> None:
            event = await hub.next_event()
            assert isinstance(event, CloseConnection) and event.code == 1000
            await hub.send(event.response())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            await ws.aclose()
        assert hub.ws.state is ConnectionState.CLOSED
        with pytest.raises(trio.ClosedResourceError):
            await ws.send_all(b"x")


async def test_aclose_is_bounded_when_the_hub_never_answers(autojump_clock: object) -> None:
    ws, hub = await connected()
    start = trio.current_time()
    await ws.aclose()  # the hub reads nothing and answers nothing
    assert 0 < trio.current_time() - start <= 5


async def test_aclose_forcefully_does_not_wait() -> None:
    with trio.fail_after(WAIT):
        ws, hub = await connected()
        await trio.aclose_forcefully(ws)
        assert await hub.stream.receive_some(100) == b""


async def test_upgrade_refused_names_the_status() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def refuse() -> None:
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(await server_end.receive_some(65536))
        list(ws.events())
        body = b"<html>Unauthorized: IotHub said no</html>"
        await server_end.send_all(
            ws.send(
                RejectConnection(
                    status_code=401,
                    headers=[(b"content-length", str(len(body)).encode())],
                    has_body=True,
                )
            )
            + ws.send(RejectData(data=body))
        )

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            with pytest.raises(WebSocketHandshakeError) as info:
                await open_websocket_stream(
                    client_end, host="hub.example", port=443, subprotocol="mqtt"
                )
    assert info.value.reason == "websocket_refused"
    assert info.value.status == 401
    assert "HTTP 401" in info.value.detail and "IotHub said no" in info.value.detail


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
    ],
    ids=["not-http", "bad-accept-key", "binary"],
)
async def test_garbage_upgrade_answer(answer: bytes) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def garbage() -> None:
        await server_end.receive_some(65536)
        await server_end.send_all(answer)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(garbage)
            with pytest.raises(WebSocketHandshakeError) as info:
                await open_websocket_stream(
                    client_end, host="hub.example", port=443, subprotocol="mqtt"
                )
    assert info.value.reason == "websocket_protocol"


async def test_hub_hangs_up_during_upgrade() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def hang_up() -> None:
        await server_end.receive_some(65536)
        await server_end.aclose()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang_up)
            with pytest.raises(WebSocketHandshakeError) as info:
                await open_websocket_stream(
                    client_end, host="hub.example", port=443, subprotocol="mqtt"
                )
    assert info.value.reason == "closed"


async def test_wrong_subprotocol_is_refused() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def accept_other() -> None:
        request = await server_end.receive_some(65536)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        await server_end.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Protocol: mqtt\r\n"
            b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
        )

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_other)
            with pytest.raises(WebSocketHandshakeError) as info:
                await open_websocket_stream(
                    client_end, host="hub.example", port=443, subprotocol="AMQPWSB10"
                )
    assert info.value.reason == "websocket_protocol"
    assert "subprotocol" in info.value.detail


async def test_data_right_after_the_upgrade_answer_is_kept() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def accept_and_talk() -> None:
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(await server_end.receive_some(65536))
        list(ws.events())
        # The upgrade answer and the first frame in one write.
        await server_end.send_all(
            ws.send(AcceptConnection(subprotocol="mqtt")) + ws.send(Message(data=b"early"))
        )

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_and_talk)
            ws = await open_websocket_stream(
                client_end, host="hub.example", port=443, subprotocol="mqtt"
            )
        assert await ws.receive_some() == b"early"


async def test_pong_queued_while_a_send_is_blocked() -> None:
    # A send that cannot complete (nobody reads the hub side) must not stop the
    # receiver from handling a ping; the pong follows the blocked write.
    client_end, server_end = trio.testing.lockstep_stream_pair()
    hub = Hub(server_end)
    result: list[WebSocketStream] = []

    async def dial() -> None:
        result.append(
            await open_websocket_stream(
                client_end, host="hub.example", port=443, subprotocol="mqtt"
            )
        )

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.accept, "mqtt")
            nursery.start_soon(dial)
        ws = result[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.send_all, b"blocked until the hub reads")
            await trio.testing.wait_all_tasks_blocked()

            async def ping_then_data() -> None:
                await hub.send(Ping(payload=b"p"))
                await hub.send(Message(data=b"d"))

            nursery.start_soon(ping_then_data)
            assert await ws.receive_some() == b"d"
            assert await hub.receive_bytes(len(b"blocked until the hub reads")) == (
                b"blocked until the hub reads"
            )
            event = await hub.next_event()
            assert isinstance(event, Pong) and event.payload == b"p"
