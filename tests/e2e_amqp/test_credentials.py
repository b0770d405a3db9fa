"""Gateway-held credentials on the AMQP path, end to end: proton devices with no
key of their own -> gateway (plaintext) -> hubsim (TLS, verifies SAS signatures
and expiry, detaches an identity's links when its token expires).

Expected keys and tokens are computed here with hmac, independently of the
gateway's own SAS and DPS code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from gw_helpers import (
    HUB_HOST,
    TIMEOUT,
    Device,
    RunningGateway,
    data_message,
    device_uri,
    in_thread,
    new_key,
    sas_token,
)
from proton import ConnectionException
from proton.utils import LinkDetached

from gateway.auth.credentials import CredentialStore
from gateway.auth.local_auth import hash_password
from gateway.config import GatewayConfig, parse_config_text
from gateway.hubsim import HubSim
from gateway.net.amqp_listener import serve_amqp_listener
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.ops.registry import Registry
from gateway.ops.router_observer import OpsObserver
from gateway.router.core import Router

EVENTS = "amqps://" + HUB_HOST + "/devices/%s/messages/events"
DEVICEBOUND = "/devices/%s/messages/devicebound"
LOCAL_PASSWORD = "correct horse battery"
GROUP_KEY = new_key()


def dps_key(group_key: str, device_id: str) -> str:
    digest = hmac.new(base64.b64decode(group_key), device_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


KEYS = {f"dev{i}": new_key() for i in range(1, 6)}
KEYS["sensor-7"] = dps_key(GROUP_KEY, "sensor-7")
WRONG_KEY = new_key()  # what the gateway holds for dev4: the hub knows another key
PASSWORD_HASH = hash_password(LOCAL_PASSWORD, n=2**10)


@pytest.fixture
def hub() -> Iterator[HubSim]:
    # No clock skew allowance: a token is dead at its expiry, and the hub then
    # detaches the identity's links, so a missed renewal shows.
    sim = HubSim(KEYS, hub_host=HUB_HOST, mqtt_port=None, token_skew=0)
    with sim:
        yield sim
    sim.close()


def credentials_config(hub: HubSim, tmp_path: Path, *, max_devices: int = 100,
                       cbs: str | None = None, token_ttl: str = "1h",
                       renew_at: float = 0.8) -> GatewayConfig:  # fmt: skip
    secrets = tmp_path / "secrets.yaml"
    names = {f"{d}-key": k for d, k in KEYS.items() if d.startswith("dev")}
    names["dev4-key"] = WRONG_KEY
    names["fleet-key"] = GROUP_KEY
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{n}: {k}\n" for n, k in names.items()))
    cbs_line = f"\n    cbs: {cbs}" if cbs else ""
    text = f"""
gateway: {{id: gw-test}}
admin: {{enabled: false}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
connectors:
  - name: iothub
    protocol: amqp
    host: 127.0.0.1
    port: {hub.amqp_port}
    tls_profile: hub
    connect_timeout: 5s
    reconnect: {{initial: 0.2s, max: 1s}}
    pool: {{max_connections: 4, max_devices_per_connection: {max_devices}}}{cbs_line}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
credentials:
  secrets_file: {secrets}
  token_ttl: {token_ttl}
  renew_at: {renew_at}
  devices:
    - {{id: dev1, key: dev1-key, trust: network}}
    - {{id: dev2, key: dev2-key, local_password_hash: "{PASSWORD_HASH}"}}
    - {{id: dev3, key: dev3-key, allowed_addresses: ["127.0.0.2/32"]}}
    - {{id: dev4, key: dev4-key, trust: network}}
    - {{id: dev5, key: dev5-key, allowed_addresses: ["127.0.0.1/32"]}}
  groups:
    - {{id_pattern: "sensor-*", group_key: fleet-key, trust: network}}
"""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return parse_config_text(text, str(path))


@asynccontextmanager
async def gateway(config: GatewayConfig, observer: Any = None) -> AsyncIterator[RunningGateway]:
    store = CredentialStore.from_config(config.credentials)
    async with trio.open_nursery() as nursery:
        router = Router(config, connector_io=AmqpConnectorIO(), observer=observer,
                        credentials=store)
        await nursery.start(router.run)
        bound = await nursery.start(serve_amqp_listener, config.listeners[0], config, router)
        try:
            yield RunningGateway(router, bound[0][1], config)
        finally:
            nursery.cancel_scope.cancel()


def d2c_and_c2d(url: str, hub: HubSim, device_id: str, **device_kw: Any) -> bytes:
    """A device that does no CBS: D2C (accepted by the hub), then one C2D."""
    dev = Device(url, **device_kw)
    try:
        sender = dev.conn.create_sender(EVENTS % device_id)
        rx = dev.conn.create_receiver(DEVICEBOUND % device_id, credit=1)
        for i in range(3):
            sender.send(data_message(b"%s-%d" % (device_id.encode(), i)))
        hub.send_c2d(device_id, b"c2d for " + device_id.encode())
        msg = rx.receive(timeout=TIMEOUT)
        rx.accept()
        dev.sync()
        return bytes(msg.body)
    finally:
        dev.close()


def gateway_put(hub: HubSim, device_id: str) -> list[Any]:
    return [c for c in hub.recorder.cbs if c.device_id == device_id]


@pytest.mark.parametrize(
    ("max_devices", "cbs"),
    [(100, None), (1, "route"), (1, "proxy")],
    ids=["pooled", "dedicated-route", "dedicated-proxy"],
)
async def test_device_without_credentials_trust_network(hub, tmp_path, max_devices, cbs) -> None:
    config = credentials_config(hub, tmp_path, max_devices=max_devices, cbs=cbs)
    async with gateway(config) as gw:
        body = await in_thread(d2c_and_c2d, gw.url, hub, "dev1")
    assert body == b"c2d for dev1"
    assert [r.body for r in hub.recorder.d2c_for("dev1")] == [b"dev1-0", b"dev1-1", b"dev1-2"]
    puts = gateway_put(hub, "dev1")
    # One token, put by the gateway over its own CBS link pair before the attaches.
    assert [(c.audience, c.status) for c in puts] == [(device_uri("dev1"), 200)]
    assert str(puts[0].message_id).startswith("gw-test:")
    assert str(puts[0].reply_to).startswith("cbs-gw-test-")
    assert [d.outcome for d in hub.recorder.dispositions] == ["accepted"]


async def test_device_from_an_allowed_address(hub, tmp_path) -> None:
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:
        body = await in_thread(d2c_and_c2d, gw.url, hub, "dev5")
    assert body == b"c2d for dev5"
    assert len(hub.recorder.d2c_for("dev5")) == 3
    assert [c.status for c in gateway_put(hub, "dev5")] == [200]


async def test_group_derived_key_accepted_by_the_hub(hub, tmp_path) -> None:
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:
        body = await in_thread(d2c_and_c2d, gw.url, hub, "sensor-7")
    assert body == b"c2d for sensor-7"
    assert [(c.audience, c.status) for c in gateway_put(hub, "sensor-7")] == [
        (device_uri("sensor-7"), 200)
    ]


async def test_sasl_plain_with_the_local_password(hub, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:
        body = await in_thread(d2c_and_c2d, gw.url, hub, "dev2", mechs="PLAIN",
                               user="dev2@sas.myhub", password=LOCAL_PASSWORD)  # fmt: skip
    assert body == b"c2d for dev2"
    assert [c.status for c in gateway_put(hub, "dev2")] == [200]
    assert "SASL PLAIN login: dev2: accepted from 127.0.0.1 (password)" in caplog.text


async def test_wrong_local_password_refused_at_sasl(hub, tmp_path, caplog) -> None:
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:

        def connect() -> str:
            with pytest.raises(ConnectionException) as info:
                Device(gw.url, mechs="PLAIN", user="dev2@sas.myhub", password="not it")
            return str(info.value)

        text = await in_thread(connect)
    assert "amqp:unauthorized-access" in text and "Authentication failed" in text
    assert "SASL PLAIN login as dev2 refused: dev2: wrong password" in caplog.text
    assert hub.recorder.cbs == [] and hub.recorder.connections["amqp"].opened == 0


async def test_anonymous_device_needing_a_password_refused(hub, tmp_path, caplog) -> None:
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:

        def attach() -> str:
            with Device(gw.url) as dev:
                with pytest.raises(LinkDetached) as info:
                    dev.conn.create_sender(EVENTS % "dev2")
                return str(info.value)

        text = await in_thread(attach)
    assert "amqp:unauthorized-access" in text and "no password given" in text
    assert "connect with SASL PLAIN dev2@sas.<hub> and its local password" in caplog.text
    assert hub.recorder.cbs == []


async def test_device_from_a_disallowed_address_refused(hub, tmp_path, caplog) -> None:
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:

        def attach() -> str:
            with Device(gw.url) as dev:
                with pytest.raises(LinkDetached) as info:
                    dev.conn.create_sender(EVENTS % "dev3")
                # The refusal is per identity: a trusted one still works on this connection.
                dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"still fine"))
                return str(info.value)

        text = await in_thread(attach)
    assert "amqp:unauthorized-access" in text
    assert "address 127.0.0.1 not in allowed_addresses" in text
    assert "attach for dev3 refused: local authentication failed" in caplog.text
    assert [c.device_id for c in hub.recorder.cbs] == ["dev1"]
    assert [r.body for r in hub.recorder.d2c] == [b"still fine"]


async def test_own_sas_token_over_sasl_plain_passes_through(hub, tmp_path) -> None:
    # The gateway holds a key for dev4 that the hub does not accept: success
    # proves the device's own token was used (put over CBS, connector ANONYMOUS).
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:
        token = sas_token(device_uri("dev4"), KEYS["dev4"])
        body = await in_thread(d2c_and_c2d, gw.url, hub, "dev4", mechs="PLAIN",
                               user="dev4@sas.myhub", password=token)  # fmt: skip
    assert body == b"c2d for dev4"
    assert [c.status for c in gateway_put(hub, "dev4")] == [200]
    assert not any(a.mechanism == "PLAIN" for a in hub.recorder.auth)


async def test_own_cbs_put_token_is_not_replaced(hub, tmp_path) -> None:
    config = credentials_config(hub, tmp_path)
    async with gateway(config) as gw:

        def run() -> None:
            with Device(gw.url) as dev:
                reply = dev.authenticate("dev4", KEYS["dev4"])
                assert reply.properties["status-code"] == 200 and reply.correlation_id == 0
                dev.conn.create_sender(EVENTS % "dev4").send(data_message(b"own token"))

        await in_thread(run)
    assert [c.status for c in gateway_put(hub, "dev4")] == [200]
    assert [r.body for r in hub.recorder.d2c_for("dev4")] == [b"own token"]


async def test_short_tokens_renewed_during_a_stream(hub, tmp_path, caplog) -> None:
    """4 s tokens renewed at half their life during a 20 s stream of D2C and C2D:
    nothing lost, no link detached (hubsim detaches an identity at expiry)."""
    caplog.set_level(logging.DEBUG, logger="gateway")
    config = credentials_config(hub, tmp_path, token_ttl="4s", renew_at=0.5)
    registry = Registry()
    async with gateway(config, observer=OpsObserver(None, registry)) as gw:

        def stream() -> tuple[int, list[bytes], list[bytes]]:
            dev = Device(gw.url, mechs="PLAIN", user="dev2@sas.myhub", password=LOCAL_PASSWORD)
            try:
                sender = dev.conn.create_sender(EVENTS % "dev2")
                rx = dev.conn.create_receiver(DEVICEBOUND % "dev2", credit=10)
                sent, c2d_sent, c2d_got = 0, [], []
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    sender.send(data_message(b"m%d" % sent))  # blocks until accepted
                    sent += 1
                    if sent % 20 == 0:
                        body = b"c%d" % len(c2d_sent)
                        hub.send_c2d("dev2", body)
                        c2d_sent.append(body)
                        msg = rx.receive(timeout=TIMEOUT)
                        c2d_got.append(bytes(msg.body))
                        rx.accept()
                    time.sleep(0.1)  # pacing the stream, not synchronisation
                dev.sync()
                return sent, c2d_sent, c2d_got
            finally:
                dev.close()

        sent, c2d_sent, c2d_got = await in_thread(stream)
        api = json.dumps([registry.snapshot(), gw.router.tokens.describe()], default=str)
    assert sent > 50 and c2d_got == c2d_sent and len(c2d_sent) >= 2
    assert [r.body for r in hub.recorder.d2c_for("dev2")] == [b"m%d" % i for i in range(sent)]
    assert all(d.outcome == "accepted" for d in hub.recorder.dispositions)
    assert [e for e in hub.recorder.events if e[0] == "token-expired"] == []
    puts = gateway_put(hub, "dev2")
    assert len(puts) >= 8 and all(c.status == 200 for c in puts)
    assert len({c.connection for c in puts}) == 1  # renewed on the same connection
    # Secrets stay out of the logs and of what the admin API serves.
    secrets = [KEYS["dev2"], LOCAL_PASSWORD, "SharedAccessSignature", "sig="]
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("gateway.hubsim"))
    assert "renewed" in ours
    for secret in secrets:
        assert secret not in ours
        assert secret not in api
