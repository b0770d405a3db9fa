"""Credentials held by the gateway, end to end: paho devices -> relay -> hubsim.

The devices hold no hub credential at all (a local password, or nothing);
hubsim verifies the SAS token's signature and expiry, or the client
certificate, and its recorder says what it accepted. Keys and group-key
derivations are computed here with hmac, independently of gateway.auth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote_plus

import pytest
import trio

from gateway.auth.credentials import CredentialStore
from gateway.auth.local_auth import hash_password
from gateway.config import parse_config_text
from gateway.daemon import serve_mqtt_listener
from gateway.hubsim import HubSim
from gateway.mqtt_relay import CloseReason
from gateway.ops.trace import FrameTracer
from tests.waiting import FAILSAFE

from .paho_device import PahoDevice

HUB = "myhub.azure-devices.net"
EVENTS = "devices/{}/messages/events/"
WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)
LOCAL_PASSWORD = "lan-secret-Pa55"
WRONG_PASSWORD = "not-the-lan-secret"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def dps_device_key(group_key: str, device_id: str) -> str:
    """DPS symmetric-key enrollment groups: base64(HMAC-SHA256(group key, registration id))."""
    digest = hmac.new(base64.b64decode(group_key), device_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def username(device_id: str) -> str:
    return f"{HUB}/{device_id}/?api-version=2021-04-12"


class Observer:
    """The relay's observer hooks, recorded for assertions."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.renewal_failures: list[str] = []
        self.expiries: list[tuple[str, float | None]] = []
        self.changed = trio.Event()

    def on_packet(self, direction, packet_type, nbytes):
        pass

    def on_close(self, reason):
        self.closed.append(reason)
        self._wake()

    def on_token_renewal_failure(self, device):
        self.renewal_failures.append(device)
        self._wake()

    def on_token_expiry(self, device, seconds):
        self.expiries.append((device, seconds))

    def _wake(self):
        self.changed.set()
        self.changed = trio.Event()

    async def wait_closed(self, *reasons: str, timeout: float = WAIT) -> str:
        with trio.fail_after(timeout), _ShowClosesOnFailure(self.closed):
            while True:
                for reason in self.closed:
                    if reason in reasons:
                        return reason
                await self.changed.wait()


class _ShowClosesOnFailure:
    """Prints the close reasons seen so far when a wait fails (the assertion's context)."""

    def __init__(self, closed):
        self.closed = closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            print("closed so far:", self.closed)


class Keys:
    """The hub's registry and the gateway's secrets, made up per test."""

    def __init__(self) -> None:
        self.dev = {name: new_key() for name in ("dev1", "dev2", "dev3", "dev5")}
        self.group_key = new_key()
        self.sensor = dps_device_key(self.group_key, "sensor-7")

    def hub_devices(self) -> dict[str, str]:
        return {**self.dev, "sensor-7": self.sensor, "cam-1": new_key()}

    def all_secrets(self) -> list[str]:
        return [*self.dev.values(), self.group_key, self.sensor]


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def hub(keys: Keys):
    # token_skew 0: the hub refuses and closes on the token's exact expiry.
    sim = HubSim(keys.hub_devices(), hub_host=HUB, amqp_port=None, token_skew=0)
    with sim:
        yield sim
    sim.close()


def write_private(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


def credentials_yaml(
    tmp_path: Path, keys: Keys, hub: HubSim, *, token_ttl: str = "1h", renew_at: float = 0.8
) -> str:
    secrets = write_private(
        tmp_path / "secrets.yaml",
        "".join(f"{name}-key: {key}\n" for name, key in keys.dev.items())
        + f"fleet-key: {keys.group_key}\n",
    )
    chain, key_pem = hub.issue_device_cert("cam-1")
    cert_file = write_private(tmp_path / "cam-1.pem", chain)
    key_file = write_private(tmp_path / "cam-1.key", key_pem)
    password_hash = hash_password(LOCAL_PASSWORD)
    return f"""credentials:
  secrets_file: {secrets}
  token_ttl: {token_ttl}
  renew_at: {renew_at}
  devices:
    - {{id: dev1, key: dev1-key, local_password_hash: "{password_hash}"}}
    - {{id: dev2, key: dev2-key, trust: network}}
    - {{id: dev3, key: dev3-key, allowed_addresses: ["127.0.0.2/32"]}}
    - {{id: dev5, key: dev5-key, local_password_hash: "{password_hash}", allowed_addresses: ["127.0.0.1"]}}
    - {{id: cam-1, cert_file: {cert_file}, key_file: {key_file}, local_password_hash: "{password_hash}"}}
  groups:
    - {{id_pattern: "sensor-*", group_key: fleet-key, trust: network}}
"""


def gateway_config(hub: HubSim, credentials: str):
    return parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.mqtt_port}, tls_profile: hubsim}}
mqtt_routes:
  - {{hub: {HUB}, connector: iothub-mqtt}}
{credentials}""",
        "gateway.yaml",
    )


async def start_relay(nursery, hub: HubSim, credentials: str, **options):
    """(port, observer) of a relay with the given credentials section."""
    config = gateway_config(hub, credentials)
    store = CredentialStore.from_config(config.credentials)
    observer = Observer()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            config.listeners[0],
            config,
            task_status=task_status,
            observer=observer,
            credentials=store,
            **options,
        )

    bound = await nursery.start(serve)
    return bound[0][1], observer


@pytest.fixture
async def relay(nursery, hub, keys, tmp_path):
    # The packet trace is on: it must not show passwords or tokens either.
    tracer = FrameTracer(protocols=("mqtt",))
    return await start_relay(nursery, hub, credentials_yaml(tmp_path, keys, hub), tracer=tracer)


@pytest.fixture
async def devices():
    made: list[PahoDevice] = []

    def make(device_id: str, password: str | None = None, **kwargs) -> PahoDevice:
        device = PahoDevice(device_id, username=username(device_id), password=password, **kwargs)
        made.append(device)
        return device

    yield make
    for device in made:
        await trio.to_thread.run_sync(device.close)


async def wait_for(hub: HubSim, predicate, timeout: float = WAIT):
    return await trio.to_thread.run_sync(hub.recorder.wait_for, predicate, timeout)


def no_secrets_in(text: str, keys: Keys, extra: list[str] = ()) -> None:
    for secret in [*keys.all_secrets(), LOCAL_PASSWORD, WRONG_PASSWORD, *extra]:
        assert secret not in text
    assert "SharedAccessSignature" not in text
    assert "sig=" not in text


# -- a device with no hub credential of its own --------------------------------------------


async def test_local_password_device_gets_a_gateway_token_d2c_and_c2d(
    relay, hub, keys, devices, caplog
):
    caplog.set_level(logging.DEBUG)
    port, observer = relay
    device = devices("dev1", LOCAL_PASSWORD, clean_session=False)
    assert await device.connect(port) == 0
    auth = await wait_for(hub, lambda: hub.recorder.auth and hub.recorder.auth[0])
    assert (auth.device_id, auth.mechanism, auth.ok) == ("dev1", "sas", True)

    await device.publish(EVENTS.format("dev1") + "kind=reading", b"21.5", qos=1)
    await device.publish(EVENTS.format("dev1"), b"qos0", qos=0)
    await wait_for(hub, lambda: len(hub.recorder.d2c) == 2)
    assert [(r.device_id, r.body, r.qos) for r in hub.recorder.d2c] == [
        ("dev1", b"21.5", 1),
        ("dev1", b"qos0", 0),
    ]

    await device.subscribe("devices/dev1/messages/devicebound/#", qos=1)
    message_id = await trio.to_thread.run_sync(hub.send_c2d, "dev1", b"open-valve")
    msg = await device.receive()
    assert msg.payload == b"open-valve" and msg.qos == 1
    await wait_for(hub, lambda: hub.recorder.feedback)
    assert [(f.message_id, f.status) for f in hub.recorder.feedback] == [(message_id, "Success")]
    await device.disconnect()
    await observer.wait_closed(CloseReason.DEVICE_DISCONNECT)
    assert observer.expiries[0][0] == "dev1" and 3500 < observer.expiries[0][1] <= 3600
    no_secrets_in(caplog.text, keys)
    assert "token issued by the gateway (secrets_file:dev1-key" in caplog.text
    assert "<- CONNECT" in caplog.text and "password=<redacted>" in caplog.text  # traced


async def test_trust_network_device_without_password(relay, hub, devices):
    port, _ = relay
    device = devices("dev2")  # user name only, no password flag
    assert await device.connect(port) == 0
    await device.publish(EVENTS.format("dev2"), b"hello", qos=1)
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.device_id, record.body) == ("dev2", b"hello")


async def test_group_derived_key_is_accepted_by_the_hub(relay, hub, devices):
    port, _ = relay
    device = devices("sensor-7")
    assert await device.connect(port) == 0
    await device.publish(EVENTS.format("sensor-7"), b"from the fleet", qos=1)
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.device_id, record.body) == ("sensor-7", b"from the fleet")
    assert [(a.device_id, a.mechanism, a.ok) for a in hub.recorder.auth] == [
        ("sensor-7", "sas", True)
    ]


async def test_device_with_its_own_sas_token_passes_untouched(relay, hub, keys, devices):
    """An entry exists for dev2, but a device that brings a token keeps it: this one is
    forged, and the hub (not the gateway) refuses it."""
    port, observer = relay
    forged = hub_token("dev2", new_key())
    device = devices("dev2", forged)
    assert await device.connect(port) == "Not authorized"
    await observer.wait_closed(CloseReason.UPSTREAM_REFUSED)
    auth = await wait_for(hub, lambda: hub.recorder.auth and hub.recorder.auth[0])
    assert (auth.device_id, auth.ok, auth.code) == ("dev2", False, 5)


async def test_device_without_entry_passes_untouched(relay, hub, devices):
    port, observer = relay
    device = devices("dev9", "some-password")
    assert await device.connect(port) == "Not authorized"  # hub: not a SAS token, unknown device
    await observer.wait_closed(CloseReason.UPSTREAM_REFUSED)
    auth = await wait_for(hub, lambda: hub.recorder.auth and hub.recorder.auth[0])
    assert (auth.device_id, auth.ok) == ("dev9", False)


# -- local authentication refusals -----------------------------------------------------------


@pytest.mark.parametrize("password", [WRONG_PASSWORD, None])
async def test_wrong_local_password_refused_with_connack_4(
    relay, hub, keys, devices, caplog, password
):
    caplog.set_level(logging.DEBUG)
    port, observer = relay
    device = devices("dev1", password)
    assert await device.connect(port) == "Bad user name or password"
    assert await observer.wait_closed(CloseReason.LOCAL_AUTH_FAILED)
    assert hub.recorder.auth == []  # the hub never saw it
    refusal = [r for r in caplog.records if "local authentication failed" in r.getMessage()]
    assert len(refusal) == 1 and refusal[0].levelno == logging.WARNING
    expected = "wrong password" if password else "no password given"
    assert f"dev1: {expected}" in refusal[0].getMessage()
    no_secrets_in(caplog.text, keys)


async def test_device_from_a_disallowed_address_refused_with_connack_5(
    relay, hub, devices, caplog
):
    port, observer = relay
    device = devices("dev3")  # allowed only from 127.0.0.2; paho connects from 127.0.0.1
    assert await device.connect(port) == "Not authorized"
    assert await observer.wait_closed(CloseReason.LOCAL_ADDRESS_REFUSED)
    assert hub.recorder.auth == []
    assert "dev3: address 127.0.0.1 not in allowed_addresses" in caplog.text


async def test_device_from_an_allowed_address_accepted(relay, hub, devices):
    port, _ = relay
    device = devices("dev3")
    result = await trio.to_thread.run_sync(_connect_from, device, port, "127.0.0.2")
    assert result == 0
    await device.publish(EVENTS.format("dev3"), b"from .2", qos=1)
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.device_id, record.body) == ("dev3", b"from .2")


async def test_password_and_address_both_required(relay, hub, devices):
    port, observer = relay
    good = devices("dev5", LOCAL_PASSWORD)
    assert await good.connect(port) == 0
    await good.disconnect()
    bad = devices("dev5", WRONG_PASSWORD)
    assert await bad.connect(port) == "Bad user name or password"
    await observer.wait_closed(CloseReason.LOCAL_AUTH_FAILED)


def _connect_from(device: PahoDevice, port: int, source: str):
    device.client.connect("127.0.0.1", port, keepalive=device.keepalive, bind_address=source)
    device.client.loop_start()
    return device.connack.get(timeout=WAIT)


# -- X.509 ------------------------------------------------------------------------------------


async def test_x509_device_gets_its_client_certificate_upstream(relay, hub, devices, caplog):
    caplog.set_level(logging.DEBUG)
    port, _ = relay
    device = devices("cam-1", LOCAL_PASSWORD)
    assert await device.connect(port) == 0
    await device.publish(EVENTS.format("cam-1"), b"frame", qos=1)
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.device_id, record.body) == ("cam-1", b"frame")
    # The hub saw no password (method x509: certificate CN = client id).
    assert [(a.device_id, a.mechanism, a.ok) for a in hub.recorder.auth] == [
        ("cam-1", "x509", True)
    ]
    assert LOCAL_PASSWORD not in caplog.text
    assert "client certificate held by the gateway" in caplog.text


async def test_x509_device_with_wrong_local_password_refused(relay, hub, devices):
    port, observer = relay
    device = devices("cam-1", WRONG_PASSWORD)
    assert await device.connect(port) == "Bad user name or password"
    await observer.wait_closed(CloseReason.LOCAL_AUTH_FAILED)
    assert hub.recorder.auth == []


def hub_token(device_id: str, key: str) -> str:
    expiry = int(time.time()) + 3600
    sr = quote_plus(f"{HUB}/devices/{device_id}")
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return (
        f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(sig).decode())}"
        f"&se={expiry}"
    )


# -- the clock -------------------------------------------------------------------------------


async def test_no_gateway_token_while_the_clock_is_unset(nursery, hub, keys, devices, tmp_path):
    """A Pi without RTC before NTP: the relay refuses with CONNACK 3 (server unavailable,
    so the device retries) instead of signing a token with a 1970 expiry; once the clock
    is set the same relay goes on, no restart."""
    now = [1_000.0]
    port, observer = await start_relay(
        nursery, hub, credentials_yaml(tmp_path, keys, hub), clock=lambda: now[0]
    )
    early = devices("dev2")
    assert str(await early.connect(port)) == "Server unavailable"
    await observer.wait_closed(CloseReason.CREDENTIAL_ERROR)
    assert hub.recorder.auth == []  # nothing was signed, nothing reached the hub
    now[0] = time.time()
    device = devices("dev2")
    assert await device.connect(port) == 0
    auth = await wait_for(hub, lambda: hub.recorder.auth and hub.recorder.auth[0])
    assert (auth.device_id, auth.mechanism, auth.ok) == ("dev2", "sas", True)
