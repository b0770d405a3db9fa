"""The MQTT forwarder against a scripted hub, on trio's mock clock: rate, window,
bounded retries, backoff. (End to end against hubsim: test_store_forward_hubsim.py.)"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.mqtt import encode
from gateway.mqtt.packets import Connect, Disconnect, Publish
from gateway.mqtt.reader import PacketReader
from gateway.mqtt_relay import Opened, UpstreamUnavailable
from gateway.mqtt_relay.forwarder import MqttForwarder
from gateway.mqtt_relay.local_session import CONNECT_META, StoreForward
from gateway.store import FakeStore

HUB = "myhub.azure-devices.net"


def config(rate: float = 10.0) -> Any:
    key = base64.b64encode(os.urandom(32)).decode()
    return parse_config_text(
        f"""
admin: {{enabled: false}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: hub, protocol: mqtt, host: 127.0.0.1, port: 8883, allow_plaintext: true}}
mqtt_routes:
  - {{hub: {HUB}, connector: hub}}
store_and_forward: {{path: /tmp/unused.db, replay_rate: {rate}}}
credentials:
  allow_inline_secrets: true
  devices:
    - {{id: dev1, key: "{key}", trust: network, store_and_forward: true}}
""",
        "gateway.yaml",
    )


class ScriptedHub:
    """An upstream that answers CONNECT and PUBLISH as `answer` says; records sends."""

    def __init__(self, answer: Callable[[Publish, int], str] | None = None,
                 connack: int = 0) -> None:  # fmt: skip
        self.answer = answer or (lambda p, n: "puback")
        self.connack = connack
        self.dials = 0
        self.unreachable = False
        self.sent: list[tuple[float, str, bytes]] = []  # (mock time, topic, payload)
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects = 0

    async def open(self, connector: Any, profile: Any) -> Opened:
        self.dials += 1
        if self.unreachable:
            raise UpstreamUnavailable("refused", "connect refused")
        ours, theirs = trio.testing.memory_stream_pair()
        trio.lowlevel.spawn_system_task(self._serve, theirs)
        return Opened(ours, "scripted")

    async def _serve(self, stream: Any) -> None:
        reader = PacketReader(1 << 20)
        pending: list[int] = []
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                reader.feed(data)
                while (packet := reader.next_packet()) is not None:
                    if isinstance(packet, Connect):
                        await stream.send_all(encode.connack(self.connack))
                        if self.connack:
                            await stream.aclose()
                            return
                    elif isinstance(packet, Publish):
                        self.sent.append((trio.current_time(), packet.topic, bytes(packet.payload)))
                        what = self.answer(packet, len(self.sent))
                        if what == "close":
                            await stream.aclose()
                            return
                        pending.append(packet.packet_id or 0)
                    elif isinstance(packet, Disconnect):
                        self.disconnects += 1
                        await stream.aclose()
                        return
                self.in_flight = len(pending)
                self.max_in_flight = max(self.max_in_flight, len(pending))
                # Answered a turn later, so the forwarder's window fills as over a network.
                await trio.sleep(0.001)
                for packet_id in pending:
                    await stream.send_all(encode.puback(packet_id))
                pending.clear()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def stored(count: int, rate: float = 10.0, size: int = 10) -> tuple[Any, FakeStore]:
    cfg = config(rate)
    store = await FakeStore.open(cfg.store_and_forward)
    connect = encode.connect("dev1", username=f"{HUB}/dev1/?api-version=2021-04-12")
    await store.put_meta("dev1", CONNECT_META, connect)
    for i in range(count):
        await store.append(device="dev1", connector="hub", protocol="mqtt",
                           address=f"devices/dev1/messages/events/n={i}", meta=b"",
                           payload=bytes([i % 256]) * size)  # fmt: skip
    return cfg, store


def forwarder(cfg: Any, store: FakeStore, hub: ScriptedHub, **kwargs: Any) -> MqttForwarder:
    credentials = CredentialStore.from_config(cfg.credentials)
    return MqttForwarder(StoreForward(store), cfg, credentials, hub.open, **kwargs)


async def drained(store: FakeStore, device: str = "dev1") -> None:
    while store.backlog(device):
        await trio.sleep(0.01)


async def test_replay_honours_the_rate_limit(autojump_clock):
    # 8/s: a binary fraction, so the mock clock's float arithmetic stays exact.
    cfg, store = await stored(100, rate=8.0)
    hub = ScriptedHub()
    fw = forwarder(cfg, store, hub)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(fw.run)
        await drained(store)
        nursery.cancel_scope.cancel()
    assert [t for _, t, _ in hub.sent] == [
        f"devices/dev1/messages/events/n={i}" for i in range(100)
    ]
    times = [t - start for t, _, _ in hub.sent]
    burst = store.replay_limiter("hub").burst
    for i, t in enumerate(times):
        in_a_second = sum(1 for u in times[i:] if u < t + 1.0)
        assert in_a_second <= 8 + burst
    assert times[-1] >= (100 - burst) / 8 - 0.01
    assert fw.replayed == 100 and hub.disconnects == 1


async def test_live_messages_behind_a_backlog_are_not_held_to_the_replay_rate(autojump_clock):
    # The device keeps sending at exactly replay_rate while its backlog replays. Were its
    # new messages limited too, the backlog would never shrink; limited is only what was
    # stored before the replay connection came up.
    cfg = config(8.0)
    store = await FakeStore.open(cfg.store_and_forward, clock=trio.current_time)
    connect = encode.connect("dev1", username=f"{HUB}/dev1/?api-version=2021-04-12")
    await store.put_meta("dev1", CONNECT_META, connect)

    async def append(i: int) -> None:
        await store.append(device="dev1", connector="hub", protocol="mqtt",
                           address=f"devices/dev1/messages/events/n={i}", meta=b"",
                           payload=bytes([i]))  # fmt: skip

    for i in range(16):
        await append(i)
    await trio.sleep(1.0)  # mock time: the backlog is older than the replay
    hub = ScriptedHub()
    fw = forwarder(cfg, store, hub)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(fw.run)
        for i in range(16, 96):  # 80 live messages at 8/s: 10 s of mock time
            await append(i)
            await trio.sleep(0.125)
        await drained(store)
        done = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert [t for _, t, _ in hub.sent] == [
        f"devices/dev1/messages/events/n={i}" for i in range(96)
    ]
    # All 96 at 8/s would take 12 s; the 16 old ones at 8/s plus the live ones as they
    # come end with the last live message.
    assert done < 10.5
    old = [t - start for t, _, _ in hub.sent[:16]]
    burst = store.replay_limiter("hub").burst
    assert old[-1] >= (16 - burst) / 8 - 0.01


async def test_window_bounds_messages_in_flight(autojump_clock):
    cfg, store = await stored(200, rate=1e6)
    hub = ScriptedHub()
    fw = forwarder(cfg, store, hub, window=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(fw.run)
        await drained(store)
        nursery.cancel_scope.cancel()
    assert len(hub.sent) == 200
    assert hub.max_in_flight == 5


async def test_message_the_hub_closes_on_is_rejected_after_max_attempts(autojump_clock):
    cfg, store = await stored(10, rate=1e6)
    hub = ScriptedHub(lambda p, n: "close" if p.topic.endswith("n=4") else "puback")
    fw = forwarder(cfg, store, hub, window=4, max_attempts=3, backoff=(0.5, 4.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(fw.run)
        await drained(store)
        nursery.cancel_scope.cancel()
    assert fw.rejected == 1
    assert store.stats().rejected == {"hub": 1}
    first_arrivals = list(dict.fromkeys(t for _, t, _ in hub.sent))
    assert first_arrivals == [
        f"devices/dev1/messages/events/n={i}" for i in range(10) if i != 4
    ] or first_arrivals == [f"devices/dev1/messages/events/n={i}" for i in range(10)]
    assert sum(1 for _, t, _ in hub.sent if t.endswith("n=4")) == 3  # bounded


@pytest.mark.parametrize("mode", ["dial", "connack3"])
async def test_unreachable_hub_is_retried_with_backoff_not_in_a_loop(autojump_clock, mode):
    cfg, store = await stored(5, rate=1e6)
    hub = ScriptedHub(connack=3 if mode == "connack3" else 0)
    hub.unreachable = mode == "dial"
    fw = forwarder(cfg, store, hub, backoff=(0.5, 8.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(fw.run)
        await trio.sleep(60)
        assert 5 <= hub.dials <= 14  # 0.5, 1, 2, 4, 8, 8, ... (+-20 % jitter) in 60 s
        assert store.backlog("dev1") == 5
        hub.unreachable, hub.connack = False, 0
        await drained(store)
        nursery.cancel_scope.cancel()
    assert len(hub.sent) == 5
