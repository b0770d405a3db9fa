"""`iot-gateway hubsim` as a black box: our own proton and paho clients, forged and valid tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from proton import Delivery, Message, SSLDomain, ulong
from proton.reactor import LinkOption
from proton.utils import BlockingConnection, LinkDetached

from tests.waiting import FAILSAFE

from .amqp_devices import ProtonDevice, sample_messages
from .gateway_proc import _env, gateway_command, start_gateway, write_config
from .mqtt_peers import PahoClient

pytestmark = pytest.mark.timeout(600)

HUB = "myhub.azure-devices.net"
KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
WRONG_KEY = base64.b64encode(b"not the device key, not at all!!").decode()


def sas_token(device_id: str, key_b64: str, expiry: int) -> str:
    """Computed here, independently of the product, as IoT Hub documents it."""
    uri = urllib.parse.quote_plus(f"{HUB}/devices/{device_id}")
    signed = f"{uri}\n{expiry}".encode()
    sig = base64.b64encode(
        hmac.new(base64.b64decode(key_b64), signed, hashlib.sha256).digest()
    ).decode()
    return f"SharedAccessSignature sr={uri}&sig={urllib.parse.quote_plus(sig)}&se={expiry}"


@dataclass
class Hubsim:
    proc: subprocess.Popen[str]
    amqp_port: int
    mqtt_port: int
    ca_file: Path
    output: list[str]


@pytest.fixture(scope="module")
def hubsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hubsim]:
    tmp = tmp_path_factory.mktemp("hubsim")
    devices = tmp / "devices.json"
    devices.write_text(json.dumps({"dev1": KEY, "dev2": KEY, "nokey-amqp": KEY, "nokey-mqtt": KEY}))
    proc = subprocess.Popen(
        gateway_command(
            "hubsim", "--devices", str(devices), "--amqp", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"
        ),
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    lines: list[str] = []
    found: dict[str, str] = {}
    deadline = time.monotonic() + 15
    assert proc.stdout is not None
    while len(found) < 3:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("hubsim exited:\n" + "".join(lines))
        lines.append(line)
        for key, pattern in (
            ("amqp", r"amqps on [\d.]+:(\d+)"),
            ("mqtt", r"mqtts on [\d.]+:(\d+)"),
            ("ca", r"CA file (\S+)"),
        ):
            match = re.search(pattern, line)
            if match:
                found[key] = match.group(1)
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("hubsim did not report its ports:\n" + "".join(lines))
    sim = Hubsim(proc, int(found["amqp"]), int(found["mqtt"]), Path(found["ca"]), lines)
    try:
        yield sim
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=FAILSAFE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        assert rc == 0, f"hubsim exited {rc} on SIGTERM"


class _Target(LinkOption):
    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: object) -> None:
        link.target.address = self.address  # type: ignore[attr-defined]


def _amqp_client(sim: Hubsim) -> BlockingConnection:
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(str(sim.ca_file))
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    return BlockingConnection(
        f"amqps://127.0.0.1:{sim.amqp_port}",
        ssl_domain=domain,
        allowed_mechs="ANONYMOUS",
        virtual_host=HUB,
        timeout=FAILSAFE,
    )


def _put_token(conn: BlockingConnection, device_id: str, token: str, message_id: int) -> Message:
    snd = conn.create_sender("$cbs", name=f"cbs-sender-{message_id}")
    rcv = conn.create_receiver(
        "$cbs", name=f"cbs-receiver-{message_id}", credit=5, options=_Target("cbs")
    )
    request = Message(
        id=ulong(message_id),
        reply_to="cbs",
        properties={
            "operation": "put-token",
            "type": "servicebus.windows.net:sastoken",
            "name": f"{HUB}/devices/{device_id}",
        },
        body=token,
    )
    snd.send(request, error_states=[])
    reply = rcv.receive(timeout=FAILSAFE)
    if rcv.fetcher.unsettled:
        rcv.accept()
    return reply


def test_amqp_forged_token_gets_401(hubsim: Hubsim) -> None:
    conn = _amqp_client(hubsim)
    try:
        forged = sas_token("dev1", WRONG_KEY, int(time.time()) + 3600)
        reply = _put_token(conn, "dev1", forged, 1)
        assert reply.correlation_id == ulong(1)
        assert reply.properties["status-code"] == 401
    finally:
        conn.close()


def test_amqp_expired_token_is_refused(hubsim: Hubsim) -> None:
    conn = _amqp_client(hubsim)
    try:
        expired = sas_token("dev1", KEY, int(time.time()) - 3600)
        reply = _put_token(conn, "dev1", expired, 2)
        assert reply.properties["status-code"] in (401, 403)
    finally:
        conn.close()


def test_amqp_valid_token_200_then_d2c_accepted(hubsim: Hubsim) -> None:
    conn = _amqp_client(hubsim)
    try:
        valid = sas_token("dev1", KEY, int(time.time()) + 3600)
        reply = _put_token(conn, "dev1", valid, 3)
        assert reply.correlation_id == ulong(3)
        assert reply.properties["status-code"] == 200
        snd = conn.create_sender(f"amqps://{HUB}/devices/dev1/messages/events", name="telemetry")
        delivery = snd.send(Message(body=b"hello hub", properties={"k": "v"}))
        assert delivery.remote_state == Delivery.ACCEPTED
    finally:
        conn.close()


def test_amqp_attach_without_token_is_refused(hubsim: Hubsim) -> None:
    conn = _amqp_client(hubsim)
    try:
        with pytest.raises(LinkDetached) as info:
            snd = conn.create_sender(f"amqps://{HUB}/devices/dev2/messages/events", name="no-token")
            snd.send(Message(body="x"))
        assert info.value.condition == "amqp:unauthorized-access"
    finally:
        conn.close()


def _mqtt_device(hubsim: Hubsim, device_id: str, password: str) -> PahoClient:
    return PahoClient(
        device_id, username=f"{HUB}/{device_id}/?api-version=2021-04-12", password=password
    )


def test_mqtt_forged_token_refused(hubsim: Hubsim) -> None:
    dev = _mqtt_device(hubsim, "dev1", sas_token("dev1", WRONG_KEY, int(time.time()) + 3600))
    try:
        rc = dev.connect_tls(hubsim.mqtt_port, hubsim.ca_file, HUB)
        assert rc != 0 and rc.is_failure, f"forged token accepted: {rc}"
    finally:
        dev.close()


def test_mqtt_valid_token_connects_and_publishes(hubsim: Hubsim) -> None:
    dev = _mqtt_device(hubsim, "dev2", sas_token("dev2", KEY, int(time.time()) + 3600))
    try:
        rc = dev.connect_tls(hubsim.mqtt_port, hubsim.ca_file, HUB)
        assert rc == 0, rc
        dev.publish("devices/dev2/messages/events/a=b", b"hello", qos=1)
    finally:
        dev.close()


def test_devices_without_keys_through_the_gateway_holding_them(
    hubsim: Hubsim, tmp_path: Path
) -> None:
    """Issue 9's check: the gateway holds the keys; the hub verifies the tokens it issues."""
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"amqp-key: {KEY}\nmqtt-key: {KEY}\n")
    secrets.chmod(0o600)
    config = write_config(
        tmp_path,
        f"""\
gateway: {{id: acceptance-credentials}}
admin: {{listen: 127.0.0.1:0}}
tls_profiles:
  hub: {{ca_file: {hubsim.ca_file}, server_name: {HUB}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: iothub, protocol: amqp, host: 127.0.0.1, port: {hubsim.amqp_port}, tls_profile: hub}}
  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hubsim.mqtt_port}, tls_profile: hub}}
link_routes:
  - {{prefix: "$cbs", connector: iothub, direction: both}}
  - {{prefix: "devices/", connector: iothub, direction: both}}
mqtt_routes:
  - {{hub: "*", connector: iothub-mqtt}}
credentials:
  secrets_file: secrets.yaml
  devices:
    - {{id: nokey-amqp, key: amqp-key, trust: network}}
    - {{id: nokey-mqtt, key: mqtt-key, trust: network}}
""",
    )
    gw = start_gateway(config, listeners=("amqp", "mqtt"))
    try:
        with ProtonDevice(gw.port("amqp"), "nokey-amqp") as dev:
            snd = dev.sender("devices/nokey-amqp/messages/events", name="telemetry")
            dlv = dev.send_raw(snd, sample_messages(1)[0])
            dev.wait_settled([dlv])
            assert dlv.remote_state == Delivery.ACCEPTED
        mqtt_dev = PahoClient("nokey-mqtt", username=f"{HUB}/nokey-mqtt/?api-version=2021-04-12")
        try:
            assert mqtt_dev.connect_plain(gw.port("mqtt")) == 0
            mqtt_dev.publish("devices/nokey-mqtt/messages/events/", b"no key here", qos=1)
        finally:
            mqtt_dev.close()
        assert KEY not in gw.log()
    finally:
        gw.stop()
