"""Gateway-held credentials in the router, between scripted peers: one put per
identity before the attach, renewal on schedule (mock clock), retry with
backoff, expiry, local authentication (address, SASL PLAIN password), the
SASL gate, and the ``cbs`` connector option. Interop with proton and hubsim is
in tests/e2e_amqp/test_credentials.py."""

from __future__ import annotations

import ipaddress
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).parent))

from harness import HarnessIO, Peer, RouterHarness, router_harness  # noqa: E402

from gateway.amqp import (  # noqa: E402
    Connection,
    ConnectionError,
    LinkState,
    RemoteAttach,
    RemoteDetach,
    SaslClient,
    TransferReceived,
)
from gateway.amqp.framing import FRAME_SASL, SASL_HEADER, encode_frame  # noqa: E402
from gateway.amqp.message import Message, Properties, decode_message, encode_message  # noqa: E402  # noqa: E402
from gateway.amqp.performatives import Accepted, SaslInit, Source, Target  # noqa: E402
from gateway.amqp.types import Int  # noqa: E402
from gateway.auth.clock import BUILD_EPOCH  # noqa: E402
from gateway.auth.credentials import CredentialStore, DeviceCredential  # noqa: E402
from gateway.auth.local_auth import LocalAuthPolicy, hash_password, parse_password_hash  # noqa: E402
from gateway.config import ConfigError, parse_config_text  # noqa: E402
from gateway.net import amqp_listener  # noqa: E402
from gateway.router import core  # noqa: E402
from gateway.router.observe import NullObserver  # noqa: E402

HUB = "hub.example"
EPOCH = BUILD_EPOCH + 1_000_000.0  # a set clock (gateway.auth.clock)
KEY = SecretStr("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
PASSWORD = "local secret"

CONFIG = """
gateway: {{id: gw-test}}
admin: {{enabled: false}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
connectors:
  - name: hub
    protocol: amqp
    host: {hub}
    allow_plaintext: true
    connect_timeout: 2s
    reconnect: {{initial: 0.1s, max: 0.2s}}
    pool: {{max_connections: 2, max_devices_per_connection: {max_devices}}}{cbs}
link_routes:
  - {{prefix: "$cbs", connector: hub}}
  - {{prefix: "devices/", connector: hub}}
"""


def entry(device_id: str, *, trust: bool = False, nets: tuple[str, ...] = (),
          password: bool = False, kind: str = "key",
          module: str | None = None) -> DeviceCredential:  # fmt: skip
    policy = LocalAuthPolicy(
        password_hash=parse_password_hash(hash_password(PASSWORD, n=16)) if password else None,
        allowed_addresses=tuple(ipaddress.ip_network(n) for n in nets),
        trust_network=trust,
    )
    if kind == "x509":
        return DeviceCredential(device_id, None, "x509", policy, "cert", "devices[9]",
                                cert_file=Path("c.pem"), key_file=Path("k.pem"))  # fmt: skip
    return DeviceCredential(device_id, module, "key", policy, "secrets_file:k", "devices[0]",
                            key=KEY)  # fmt: skip


def store(ttl: float = 10.0, renew_at: float = 0.5) -> CredentialStore:
    return CredentialStore(
        [
            entry("dev1", trust=True),
            entry("dev2", nets=("192.168.0.0/16",)),
            entry("dev3", password=True),
            entry("dev4", nets=("10.0.0.0/8",)),
            entry("dev5", trust=True, kind="x509"),
            entry("dev6", module="m1", trust=True),
        ],
        token_ttl=ttl,
        renew_at=renew_at,
    )


class ScriptedHub:
    """Plays the hub on every upstream connection: answers attaches, grants credit,
    accepts transfers, answers put-tokens with ``status`` and records them."""

    def __init__(self) -> None:
        self.status = 200
        self.puts: list[tuple[float, str, str, int]] = []  # (time, audience, token, status)
        self.attaches: list[str] = []  # addresses the gateway attached, in order
        self.changed = trio.Event()

    async def serve(self, hub: Peer) -> None:
        seen = 0
        reply_links: dict[str, Any] = {}
        while True:
            new = hub.events[seen:]
            seen = len(hub.events)
            for ev in new:
                self._on_event(hub, ev, reply_links)
            if new:
                hub.poke()  # wakes its writer; no await since reading the events
            changed = hub._changed
            await changed.wait()

    def _on_event(self, hub: Peer, ev: Any, reply_links: dict[str, Any]) -> None:
        if isinstance(ev, RemoteAttach) and ev.link.state is LinkState.ATTACH_RCVD:
            a = ev.attach
            ev.link.answer_attach(a.source, a.target)
            if ev.link.is_receiver:
                ev.link.flow(100)
            elif a.target is not None:
                reply_links[str(a.target.address)] = ev.link
            address = a.target.address if ev.link.is_receiver else a.source.address
            self.attaches.append(str(address))
            self._notify()
        elif isinstance(ev, TransferReceived):
            if not ev.settled:
                ev.delivery.settle(Accepted())
            if str(ev.link.remote_attach.target.address) != "$cbs":
                return
            msg = decode_message(bytes(ev.payload))
            app = msg.application_properties or {}
            token = msg.body[0].value
            self.puts.append((trio.current_time(), str(app["name"]), str(token), self.status))
            reply = Message(
                properties=Properties(correlation_id=msg.properties.message_id),
                application_properties={"status-code": Int(self.status),
                                        "status-description": "scripted"},  # fmt: skip
            )
            link = reply_links[str(msg.properties.reply_to)]
            link.send_transfer(b"%d" % len(self.puts), encode_message(reply), settled=True)
            self._notify()
        elif isinstance(ev, RemoteDetach) and ev.link.state is LinkState.DETACH_RCVD:
            ev.link.detach(None, ev.closed)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> Any:
        with trio.fail_after(timeout):
            while not (value := predicate()):
                await self.changed.wait()
            return value


class CredHarness(RouterHarness):
    def __init__(self, nursery: trio.Nursery, *, max_devices: int = 10, cbs: str = "",
                 credentials: CredentialStore | None = None, observer: Any = None) -> None:  # fmt: skip
        super().__init__(nursery)
        cbs_line = f"\n    cbs: {cbs}" if cbs else ""
        text = CONFIG.format(hub=HUB, max_devices=max_devices, cbs=cbs_line)
        self.config = parse_config_text(text, "test.yaml")
        self.router = core.Router(self.config, connector_io=HarnessIO(self),
                                  credentials=credentials, observer=observer,
                                  clock=lambda: EPOCH + trio.current_time())  # fmt: skip
        self.script = ScriptedHub()

    async def open_stream(self, connector: Any, profile: Any) -> Any:
        stream = await super().open_stream(connector, profile)
        self.nursery.start_soon(self.script.serve, self.hubs[-1])
        return stream

    async def device(self, *, peer: str = "10.0.0.1",  # type: ignore[override]
                     sasl: SaslClient | None = None) -> Peer:  # fmt: skip
        dev_end, gw_end = trio.testing.memory_stream_pair()
        engine = Connection("client", "device", sasl=sasl, hostname=HUB)
        engine.open()
        dev = Peer(engine, dev_end, "device")
        listener = SimpleNamespace(name="amqp", sasl=["anonymous", "plain"], max_frame_size=65536,
                                   channel_max=255, idle_timeout=0, handshake_timeout=5)  # fmt: skip
        self.nursery.start_soon(amqp_listener.handle_device, gw_end, (peer, 4242), listener,
                                self.router)  # fmt: skip
        self.nursery.start_soon(dev.run)
        dev.poke()
        return dev


def harness(monkeypatch: Any, **kw: Any) -> AbstractAsyncContextManager[CredHarness]:
    return router_harness(monkeypatch, harness_class=CredHarness, **kw)


def attach(dev: Peer, device_id: str, *, receiver: bool = False, session: Any = None) -> Any:
    session = session or dev.engine.begin()
    address = f"devices/{device_id}/messages/" + ("devicebound" if receiver else "events")
    if receiver:
        link = session.attach(f"rx-{device_id}", "receiver", Source(address=address), Target())
    else:
        link = session.attach(f"tx-{device_id}", "sender", Source(), Target(address=address))
    dev.poke()
    return link


async def answered(dev: Peer, link: Any) -> Any:
    return await dev.next(RemoteAttach, lambda e: e.link is link)


async def refused(dev: Peer, link: Any) -> Any:
    return await dev.next(RemoteDetach, lambda e: e.link is link)


def audience(device_id: str) -> str:
    return f"{HUB}/devices/{device_id}"


# ------------------------------------------------------------------------- put and renewal


async def test_one_put_before_the_attaches_then_renewals_while_linked(
    monkeypatch, autojump_clock
) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device()
        session = dev.engine.begin()
        tx = attach(dev, "dev1", session=session)
        rx = attach(dev, "dev1", receiver=True, session=session)
        await answered(dev, tx)
        await answered(dev, rx)
        s = h.script
        # One token for both attaches, put over the gateway's CBS pair before either.
        assert [(p[1], p[3]) for p in s.puts] == [(audience("dev1"), 200)]
        assert s.attaches[:2] == ["$cbs", "$cbs"]
        assert sorted(s.attaches[2:]) == ["devices/dev1/messages/devicebound",
                                          "devices/dev1/messages/events"]  # fmt: skip
        assert f"se={EPOCH + 10:.0f}" in s.puts[0][2]
        # 10 s tokens renewed at half their life while the device has links.
        await trio.sleep(26)
        assert [round(p[0]) for p in s.puts] == [0, 5, 10, 15, 20, 25]
        assert h.router.tokens is not None and len(h.router.tokens.schedule) == 1
        # Links gone: no more renewals, and the identity needs a new token.
        for link in (tx, rx):
            link.detach(None, True)
        dev.poke()
        await trio.sleep(20)
        assert len(s.puts) == 6 and len(h.router.tokens.schedule) == 0
        again = attach(dev, "dev1", session=session)
        await answered(dev, again)
        assert len(s.puts) == 7


async def test_no_token_while_the_clock_is_unset(monkeypatch, caplog) -> None:
    """Before NTP (a Pi without RTC) the attach is refused and nothing is put; once the
    clock is set the next attach gets its token, without a restart."""
    async with harness(monkeypatch, credentials=store()) as h:
        assert h.router.tokens is not None
        set_clock = h.router.tokens.clock
        h.router.tokens.clock = lambda: 1_000.0
        dev = await h.device()
        session = dev.engine.begin()
        early = attach(dev, "dev1", session=session)
        ev = await refused(dev, early)
        assert ev.error.condition == "amqp:unauthorized-access"
        assert h.script.puts == []
        assert "no token for dev1: not issuing SAS tokens: the system clock reads 1970-" in (
            caplog.text
        )
        h.router.tokens.clock = set_clock
        later = attach(dev, "dev1", session=session)
        await answered(dev, later)
        assert [p[1] for p in h.script.puts] == [audience("dev1")]


async def test_failed_renewal_retried_with_backoff(monkeypatch, autojump_clock) -> None:
    failures: list[str] = []

    class Observer(NullObserver):
        def on_token_renewal_failure(self, identity: str) -> None:
            failures.append(identity)

    observer = Observer()
    async with harness(monkeypatch, credentials=store(), observer=observer) as h:
        dev = await h.device()
        tx = attach(dev, "dev1")
        await answered(dev, tx)
        s = h.script
        s.status = 500
        await s.wait_for(lambda: len(s.puts) == 3, timeout=30)
        s.status = 200
        await s.wait_for(lambda: len(s.puts) == 4, timeout=30)
        # Renewal due at 5 s fails; retries come sooner than the expiry (10 s).
        assert [p[0] for p in s.puts] == [0, 5, 7.5, 8.75]
        assert [p[3] for p in s.puts] == [200, 500, 500, 200]
        assert failures == ["dev1", "dev1"] and h.router.tokens.renewal_failures == 2
        await s.wait_for(lambda: len(s.puts) == 5, timeout=30)
        # The new token's se is floored to 18 s: renewed half-way through 9.25 s.
        assert s.puts[4][0] == 8.75 + 9.25 / 2
        assert tx.state is LinkState.ATTACHED


async def test_token_expired_unrenewed_is_dropped(monkeypatch, autojump_clock, caplog) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device()
        session = dev.engine.begin()
        tx = attach(dev, "dev1", session=session)
        await answered(dev, tx)
        h.script.status = 401
        await trio.sleep(11)
        assert "the token for dev1 expired before it could be renewed" in caplog.text
        assert len(h.router.tokens.schedule) == 0
        # The next attach needs a fresh token; the hub refuses it: so is the attach.
        rx = attach(dev, "dev1", receiver=True, session=session)
        ev = await refused(dev, rx)
        assert ev.error.condition == "amqp:unauthorized-access"
        assert "the hub refused the gateway's token for dev1 (status 401" in ev.error.description


async def test_upstream_loss_drops_tokens_and_the_next_attach_puts_again(monkeypatch) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device()
        session = dev.engine.begin()
        tx = attach(dev, "dev1", session=session)
        await answered(dev, tx)
        first_hub = h.hub
        await first_hub.close_abruptly()
        ev = await refused(dev, tx)
        assert ev.error.condition == "amqp:connection:forced"
        await dev.wait_for(lambda: len(h.router.tokens.schedule) == 0)
        again = attach(dev, "dev1", session=session)
        await answered(dev, again)
        assert h.hub is not first_hub and len(h.script.puts) == 2


# ------------------------------------------------------------------ local authentication


async def test_address_checked_per_identity(monkeypatch, caplog) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device(peer="10.0.0.1")
        session = dev.engine.begin()
        ok = attach(dev, "dev4", session=session)
        bad = attach(dev, "dev2", session=session)
        await answered(dev, ok)
        ev = await refused(dev, bad)
        assert ev.error.condition == "amqp:unauthorized-access"
        assert ev.error.description == (
            "local authentication failed: dev2: address 10.0.0.1 not in allowed_addresses"
        )
        assert [p[1] for p in h.script.puts] == [audience("dev4")]
        assert "(10.0.0.1:4242): attach for dev2 refused: local authentication failed" in caplog.text


async def test_sasl_plain_local_password(monkeypatch, caplog) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        wrong = await h.device(sasl=SaslClient("PLAIN", username="dev3@sas.hub", password="nope"))
        ev = await wrong.next(ConnectionError)
        assert "SASL authentication failed (outcome code 1)" in ev.error.description
        assert "SASL PLAIN login as dev3 refused: dev3: wrong password" in caplog.text

        right = await h.device(sasl=SaslClient("PLAIN", username="dev3@sas.hub", password=PASSWORD))
        tx = attach(right, "dev3")
        await answered(right, tx)
        assert [p[1] for p in h.script.puts] == [audience("dev3")]
        # Without the password (another connection, ANONYMOUS) the same identity is refused.
        anon = await h.device()
        ev = await refused(anon, attach(anon, "dev3"))
        assert ev.error.description == "local authentication failed: dev3: no password given"
        for record in caplog.records:
            assert PASSWORD not in record.getMessage() and "nope" not in record.getMessage()


async def test_own_sas_token_as_plain_password_is_put_as_given(monkeypatch) -> None:
    token = "SharedAccessSignature sr=hub.example%2Fdevices%2Fdev1&sig=abc%3D&se=1"
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device(sasl=SaslClient("PLAIN", username="dev1@sas.hub", password=token))
        tx = attach(dev, "dev1")
        await answered(dev, tx)
        assert [(p[1], p[2]) for p in h.script.puts] == [(audience("dev1"), token)]


async def test_x509_identity_gets_no_token_on_a_pooled_connection(monkeypatch) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device()
        ev = await refused(dev, attach(dev, "dev5"))
        assert ev.error.condition == "amqp:unauthorized-access"
        assert h.script.puts == []


async def test_module_identity(monkeypatch) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device()
        session = dev.engine.begin()
        link = session.attach("m", "sender", Source(),
                              Target(address="/devices/dev6/modules/m1/messages/events"))  # fmt: skip
        dev.poke()
        ev = await answered(dev, link)
        assert ev.attach.target is not None
        assert [p[1] for p in h.script.puts] == [audience("dev6") + "/modules/m1"]
        # The device-level identity is a different one: no entry, no token.
        ev = await refused(dev, attach(dev, "dev6", session=session))
        assert ev.error.condition == "amqp:unauthorized-access"


async def test_no_entry_passes_through_as_before(monkeypatch) -> None:
    async with harness(monkeypatch, credentials=store()) as h:
        dev = await h.device()
        ev = await refused(dev, attach(dev, "other"))
        assert ev.error.description == "no valid token for devices/other was put on this connection"
        assert h.script.puts == []


# ----------------------------------------------------------------------------- cbs modes


async def test_cbs_route_injects_only_for_devices_without_cbs_links(monkeypatch) -> None:
    async with harness(monkeypatch, credentials=store(), max_devices=1, cbs="route") as h:
        dev = await h.device()
        session = dev.engine.begin()
        tx = attach(dev, "dev1", session=session)
        await answered(dev, tx)
        assert [p[1] for p in h.script.puts] == [audience("dev1")]
        # A device with CBS links of its own manages its tokens: passed through untouched.
        own = await h.device()
        s2 = own.engine.begin()
        cbs = s2.attach("cbs-rx", "receiver", Source(address="$cbs"), Target(address="r"))
        own.poke()
        await answered(own, cbs)
        tx2 = attach(own, "dev1", session=s2)
        await answered(own, tx2)
        assert len(h.script.puts) == 1
        assert h.script.attaches.count("$cbs") == 3  # the gateway's pair, then the device's link


async def test_cbs_proxy_on_dedicated_connections_served_locally(monkeypatch) -> None:
    async with harness(monkeypatch, max_devices=1, cbs="proxy") as h:
        dev = await h.device()
        session = dev.engine.begin()
        link = session.attach("cbs-rx", "receiver", Source(address="$cbs"), Target(address="r"))
        dev.poke()
        await answered(dev, link)
        assert h.hubs == []  # answered by the gateway, no hub connection needed


def test_cbs_route_needs_dedicated_connections() -> None:
    text = CONFIG.format(hub=HUB, max_devices=5, cbs="\n    cbs: route")
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "gw.yaml")
    assert "connectors[0].cbs" in str(info.value)
    assert "max_devices_per_connection: 1" in str(info.value)
    for max_devices, cbs, proxied in ((1, "", False), (5, "", True), (1, "proxy", True),
                                      (1, "route", False)):  # fmt: skip
        line = f"\n    cbs: {cbs}" if cbs else ""
        config = parse_config_text(CONFIG.format(hub=HUB, max_devices=max_devices, cbs=line), "x")
        assert config.connectors[0].cbs_proxied is proxied


# ------------------------------------------------------------------------------ SASL gate


class ChunkStream(trio.abc.Stream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def send_all(self, data: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def sasl_init(user: str, password: str) -> bytes:
    init = SaslInit("PLAIN", b"\0" + user.encode() + b"\0" + password.encode(), HUB)
    return encode_frame(init, 0, b"", FRAME_SASL)


@pytest.mark.parametrize("split", ["whole", "bytewise"])
async def test_sasl_gate_holds_the_init_until_checked(split: str) -> None:
    data = SASL_HEADER + sasl_init("dev3@sas.hub", PASSWORD) + b"AMQP\x00\x01\x00\x00"
    chunks = [data] if split == "whole" else [data[i : i + 1] for i in range(len(data))]
    released: list[bytes] = []
    checked: list[tuple[str, str, int]] = []
    frames: list[bytes] = []

    async def check(user: str, password: str, frame: bytes) -> None:
        checked.append((user, password, sum(len(b) for b in released)))
        frames.append(frame)

    gate = amqp_listener.SaslPlainGate(ChunkStream(chunks), check)
    while chunk := await gate.receive_some(65536):
        released.append(chunk)
    assert b"".join(released) == data
    assert released[0] == SASL_HEADER  # the header at once: mechanisms must go out first
    # The check ran after the header and before the init was released.
    assert checked == [("dev3@sas.hub", PASSWORD, 8)]
    assert frames == [sasl_init("dev3@sas.hub", PASSWORD)]  # the frame as received


async def test_sasl_gate_passes_other_streams_untouched() -> None:
    async def check(user: str, password: str, frame: bytes) -> None:
        raise AssertionError("no PLAIN login here")

    for data in (b"AMQP\x00\x01\x00\x00garbage", b"GET / HTTP/1.1\r\n"):
        gate = amqp_listener.SaslPlainGate(ChunkStream([data[:3], data[3:]]), check)
        got = b""
        while chunk := await gate.receive_some(65536):
            got += chunk
        assert got == data


async def test_router_without_credentials_judges_no_login(monkeypatch) -> None:
    async with harness(monkeypatch) as h:
        assert h.router.tokens is None
        dev = await h.device(sasl=SaslClient("PLAIN", username="dev3@sas.hub", password="x"))
        await dev.wait_for(lambda: dev.engine.is_open)
