"""`iot-gateway run` behind a firewall that opens 443 only, through an HTTP proxy.

Peers we did not write: mosquitto's own WebSocket listener (TLS) as the MQTT hub,
Debian's tinyproxy as the proxy (with and without Basic auth), paho clients as
devices and as an observer connected to mosquitto directly. The errors a user
sees for the common mistakes are read from the log and ``/api/connectors``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.waiting import FAILSAFE

from .bad_hub import BadHub
from .conftest import Pki
from .gateway_proc import start_gateway, wait_until, write_config
from .mqtt_peers import MOSQUITTO, PahoClient, free_port

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed"),
    pytest.mark.skipif(not Path(TINYPROXY).exists(), reason="tinyproxy is not installed"),
]

HUB = "myhub.azure-devices.net"
TOKEN = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig=abc%3D&se=4102444800"
USERNAME = f"{HUB}/dev1/?api-version=2021-04-12"


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _wait_listening(proc: subprocess.Popen[bytes], ports: list[int], log_path: Path) -> bool:
    deadline = time.monotonic() + 15
    pending = list(ports)
    while pending and time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.05)
    return not pending


@dataclass
class WsBroker:
    process: Process
    tls_port: int
    ws_port: int


def start_mosquitto_websockets(directory: Path, pki: Pki) -> WsBroker:
    """mosquitto with a TLS listener (for the observer) and a WebSocket TLS listener.

    mosquitto 2.0.11 refuses to start with a websockets listener only, and
    cannot bind port 0 itself: ports are picked here, retried if taken.
    """
    log_path = directory / "mosquitto-ws.log"
    for _ in range(5):
        tls_port, ws_port = free_port(), free_port()
        tls = f"certfile {pki.cert_file}\nkeyfile {pki.key_file}\n"
        conf = directory / "mosquitto-ws.conf"
        conf.write_text(
            f"listener {tls_port} 127.0.0.1\n{tls}"
            f"listener {ws_port} 127.0.0.1\nprotocol websockets\n{tls}"
            "allow_anonymous true\npersistence false\nlog_dest stdout\nlog_type all\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        log = open(log_path, "wb")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if _wait_listening(proc, [tls_port, ws_port], log_path):
            return WsBroker(Process(proc, ws_port, log_path), tls_port, ws_port)
        Process(proc, 0, log_path).stop()
    raise RuntimeError("mosquitto did not start:\n" + log_path.read_text(errors="replace"))


def start_tinyproxy(
    directory: Path, connect_ports: list[int], auth: tuple[str, str] | None = None
) -> Process:
    log_path = directory / "tinyproxy.log"
    for _ in range(5):
        port = free_port()
        lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 60", "LogLevel Connect",
                 "Allow 127.0.0.1", "DisableViaHeader Yes"]  # fmt: skip
        lines += [f"ConnectPort {p}" for p in connect_ports]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf = directory / f"tinyproxy-{port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if _wait_listening(proc, [port], log_path):
            return Process(proc, port, log_path)
        Process(proc, 0, log_path).stop()
    raise RuntimeError("tinyproxy did not start:\n" + log_path.read_text(errors="replace"))


def gateway_yaml(pki: Pki, ws_port: int, proxy: str) -> str:
    return f"""\
gateway: {{id: acceptance-gw-firewall}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: text}}
tls_profiles:
  hub:
    ca_file: {pki.ca_file}
    server_name: {pki.server_name}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - name: hub-ws
    protocol: mqtt
    host: 127.0.0.1
    port: {ws_port}
    transport: websockets
    tls_profile: hub
    connect_timeout: 10s
    proxy: {proxy}
mqtt_routes:
  - {{hub: "*", connector: hub-ws}}
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[WsBroker]:
    started = start_mosquitto_websockets(tmp_path_factory.mktemp("mosquitto-ws"), pki)
    yield started
    started.process.stop()


def test_mqtt_over_websockets_through_tinyproxy_with_auth(
    broker: WsBroker, pki: Pki, tmp_path: Path
) -> None:
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret\n")
    proxy = start_tinyproxy(tmp_path, [broker.ws_port], auth=("gw", "s3cret"))
    observer = PahoClient("observer")
    gw = None
    device = None
    try:
        assert observer.connect_tls(broker.tls_port, pki.ca_file, pki.server_name) == 0
        assert observer.subscribe("devices/#", qos=1) == [1]
        proxy_yaml = (
            f"{{url: 'http://127.0.0.1:{proxy.port}', username: gw, password_file: '{secret}'}}"
        )
        gw = start_gateway(
            write_config(tmp_path, gateway_yaml(pki, broker.ws_port, proxy_yaml)),
            listeners=("mqtt",),
        )
        device = PahoClient("dev1", username=USERNAME, password=TOKEN)
        assert device.connect_plain(gw.port("mqtt")) == 0
        assert device.subscribe("devices/dev1/messages/devicebound/#", qos=1) == [1]
        payloads = [bytes(range(256)), b'{"t": 21.5}', b"x" * 200_000]
        for i, payload in enumerate(payloads):
            device.publish("devices/dev1/messages/events/", payload, qos=i % 2)
        seen = observer.receive_n(len(payloads), timeout=FAILSAFE)
        assert [(m.topic, m.payload) for m in seen] == [
            ("devices/dev1/messages/events/", p) for p in payloads
        ]
        # Cloud to device, back through the WebSocket and the proxy.
        observer.publish("devices/dev1/messages/devicebound/%24.mid=1", b"c2d", qos=1)
        got = device.receive(timeout=FAILSAFE)
        assert (got.topic, got.payload) == ("devices/dev1/messages/devicebound/%24.mid=1", b"c2d")
        assert f"CONNECT 127.0.0.1:{broker.ws_port}" in proxy.log()
        assert "s3cret" not in gw.log()
    finally:
        if device is not None:
            device.close()
        observer.close()
        if gw is not None:
            gw.stop()
        proxy.stop()


def _connector_failure(gw: object, name: str = "hub-ws") -> dict[str, str]:
    def failed() -> dict[str, str] | None:
        status, body, _ = gw.http_get("/api/connectors")  # type: ignore[attr-defined]
        assert status == 200, body
        for connector in json.loads(body):
            if connector["name"] == name and connector["skipped"]:
                return connector["skipped"][0]
        return None

    return wait_until(failed, timeout=FAILSAFE, what="a failed connect in /api/connectors")


@pytest.mark.parametrize(
    ("auth", "allowed_port", "reason", "words"),
    [
        (("gw", "s3cret"), None, "proxy_auth_required", "407 Proxy Authentication Required"),
        (None, 443, "proxy_refused", "403 Access violation"),
    ],
    ids=["proxy-needs-auth", "proxy-blocks-port"],
)
def test_proxy_refusal_is_a_connector_error(
    broker: WsBroker,
    pki: Pki,
    tmp_path: Path,
    auth: tuple[str, str] | None,
    allowed_port: int | None,
    reason: str,
    words: str,
) -> None:
    proxy = start_tinyproxy(tmp_path, [allowed_port or broker.ws_port], auth=auth)
    gw = None
    device = None
    try:
        gw = start_gateway(
            write_config(
                tmp_path,
                gateway_yaml(pki, broker.ws_port, f"{{url: 'http://127.0.0.1:{proxy.port}'}}"),
            ),
            listeners=("mqtt",),
        )
        device = PahoClient("dev1", username=USERNAME, password=TOKEN)
        rc = device.connect_plain(gw.port("mqtt"), timeout=FAILSAFE)
        assert rc != 0  # refused (server unavailable), the gateway carries on
        failure = _connector_failure(gw)
        assert failure["reason"] == reason
        assert words in failure["detail"]
        assert words in gw.log()
        assert gw.proc.poll() is None
    finally:
        if device is not None:
            device.close()
        if gw is not None:
            gw.stop()
        proxy.stop()


def two_hubs_yaml(pki: Pki, bad_port: int, good_port: int) -> str:
    return f"""\
gateway: {{id: acceptance-gw-bad-hub}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: text}}
tls_profiles:
  hub:
    ca_file: {pki.ca_file}
    server_name: {pki.server_name}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: bad, protocol: mqtt, host: 127.0.0.1, port: {bad_port}, transport: websockets,
     tls_profile: hub, connect_timeout: 10s}}
  - {{name: good, protocol: mqtt, host: 127.0.0.1, port: {good_port}, transport: websockets,
     tls_profile: hub, connect_timeout: 10s}}
mqtt_routes:
  - {{hub: bad.example, connector: bad}}
  - {{hub: "*", connector: good}}
"""


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (
            "text",
            "the hub sent a WebSocket text message (only binary is expected); closed with 1003",
        ),
        # The frame's first bytes are already no MQTT: the relay stops there, before the
        # WebSocket size limit (1009, covered in tests/net/test_websocket_stream.py).
        ("oversized", "closed: upstream_protocol_error (reserved packet type 0)"),
        ("close", "the hub closed the WebSocket (1011 INTERNAL_ERROR): going down"),
        ("garbage", "invalid answer from the hub"),
        ("refuse", "refused: HTTP 403: Forbidden by policy"),
    ],
)
def test_bad_hub_is_one_connector_error(
    broker: WsBroker, pki: Pki, tmp_path: Path, mode: str, words: str
) -> None:
    bad = BadHub(mode, pki.cert_file, pki.key_file)
    observer = PahoClient("observer-bad-hub")
    gw = None
    victim = None
    bystander = None
    try:
        assert observer.connect_tls(broker.tls_port, pki.ca_file, pki.server_name) == 0
        assert observer.subscribe("devices/dev2/#", qos=1) == [1]
        gw = start_gateway(
            write_config(tmp_path, two_hubs_yaml(pki, bad.port, broker.ws_port)),
            listeners=("mqtt",),
        )
        bystander = PahoClient("dev2", username=USERNAME.replace("dev1", "dev2"), password=TOKEN)
        assert bystander.connect_plain(gw.port("mqtt")) == 0
        victim = PahoClient("dev1", username="bad.example/dev1/?api-version=2021-04-12",
                            password=TOKEN)  # fmt: skip
        victim.client.connect("127.0.0.1", gw.port("mqtt"), keepalive=30)
        victim.client.loop_start()
        # The victim is refused or dropped; the line naming the cause is in the log.
        wait_until(lambda: words in gw.log(), timeout=FAILSAFE, what=f"{words!r} in the gateway log")
        assert victim.connacks.empty() or victim.connacks.get(timeout=1) != 0
        # The other hub's device carries on.
        bystander.publish("devices/dev2/messages/events/", b"unaffected", qos=1)
        got = observer.receive(timeout=FAILSAFE)
        assert (got.topic, got.payload) == ("devices/dev2/messages/events/", b"unaffected")
        assert gw.proc.poll() is None
        # Per failed attempt (paho retries) the dial's line and the session's closing
        # line name the cause: no flood.
        log = gw.log()
        attempts = log.count("client 'dev1' closed")
        assert 1 <= log.count(words) <= 2 * max(attempts, 1)
    finally:
        for client in (victim, bystander, observer):
            if client is not None:
                client.close()
        if gw is not None:
            gw.stop()
        bad.close()


def amqp_ws_yaml(pki_ca: str, ws_port: int, proxy: str) -> str:
    return f"""\
gateway: {{id: acceptance-gw-amqp-ws}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: text}}
tls_profiles:
  hub: {{ca_file: "{pki_ca}", server_name: {AMQP_HUB}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0", sasl: [anonymous]}}
connectors:
  - name: iothub
    protocol: amqp
    host: 127.0.0.1
    port: {ws_port}
    transport: websockets
    tls_profile: hub
    connect_timeout: 10s
    reconnect: {{initial: 0.5s, max: 2s}}
    proxy: {proxy}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
"""


AMQP_HUB = "myhub.azure-devices.net"


def _sas(device_id: str, key: str) -> str:
    import base64
    import hashlib
    import hmac
    from urllib.parse import quote_plus

    expiry = int(time.time()) + 3600
    sr = quote_plus(f"{AMQP_HUB}/devices/{device_id}")
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(sig).decode())}&se={expiry}"


def test_amqp_pool_over_websockets_through_tinyproxy(tmp_path: Path) -> None:
    """AMQP through `iot-gateway run`: the pool's hub connection is a WebSocket through
    tinyproxy; without credentials the 407 is the connector's state in /api/connectors,
    with them the device's messages reach the hub."""
    import base64

    from gateway.hubsim import HubSim

    from .amqp_devices import ProtonDevice

    key = base64.b64encode(os.urandom(32)).decode()
    hub = HubSim({"dev1": key}, hub_host=AMQP_HUB, mqtt_port=None, ws_port=0)
    hub.start()
    proxy = start_tinyproxy(tmp_path, [hub.ws_port or 0], auth=("gw", "s3cret"))
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret\n")
    gw = None
    try:
        # No credentials: the device's put-token is answered, the connector reports 407.
        gw = start_gateway(
            write_config(
                tmp_path,
                amqp_ws_yaml(
                    hub.ca_file or "", hub.ws_port or 0, f"{{url: 'http://127.0.0.1:{proxy.port}'}}"
                ),  # fmt: skip
                "no-auth.yaml",
            ),
            listeners=("amqp",),
        )
        with ProtonDevice(gw.port("amqp"), "dev1") as device:
            reply, _ = device.put_token(_sas("dev1", key))
            assert reply.properties["status-code"] != 200

        failure = _connector_failure(gw, "iothub")
        assert failure["reason"] == "proxy_auth_required"
        assert "HTTP/1.0 407 Proxy Authentication Required" in failure["detail"]
        gw.stop()
        # With credentials: through the proxy, over WebSockets, to the hub.
        proxy_yaml = (
            f"{{url: 'http://127.0.0.1:{proxy.port}', username: gw, password_file: '{secret}'}}"
        )
        gw = start_gateway(
            write_config(
                tmp_path, amqp_ws_yaml(hub.ca_file or "", hub.ws_port or 0, proxy_yaml), "auth.yaml"
            ),
            listeners=("amqp",),
        )
        with ProtonDevice(gw.port("amqp"), "dev1") as device:
            reply, _ = device.put_token(_sas("dev1", key))
            assert reply.properties["status-code"] == 200
            sender = device.conn.create_sender("devices/dev1/messages/events")
            from proton import Message

            message = Message(body=b"over websockets via tinyproxy")
            message.inferred = True
            sender.send(message)
        record = hub.recorder.wait_for(lambda: hub.recorder.d2c and hub.recorder.d2c[-1], 30)
        assert record.device_id == "dev1" and record.raw == message.encode()
        assert "s3cret" not in gw.log()
    finally:
        if gw is not None:
            gw.stop()
        proxy.stop()
        hub.close()


def test_proxy_from_the_environment(
    broker: WsBroker, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`proxy: env`: HTTPS_PROXY with credentials in the URL, NO_PROXY not covering the hub."""
    proxy = start_tinyproxy(tmp_path, [broker.ws_port], auth=("gw", "s3cret"))
    monkeypatch.setenv("HTTPS_PROXY", f"http://gw:s3cret@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost,.corp.example")
    observer = PahoClient("observer-env")
    gw = None
    device = None
    try:
        assert observer.connect_tls(broker.tls_port, pki.ca_file, pki.server_name) == 0
        assert observer.subscribe("devices/dev1/#", qos=1) == [1]
        gw = start_gateway(
            write_config(tmp_path, gateway_yaml(pki, broker.ws_port, "env")), listeners=("mqtt",)
        )
        device = PahoClient("dev1", username=USERNAME, password=TOKEN)
        assert device.connect_plain(gw.port("mqtt")) == 0
        device.publish("devices/dev1/messages/events/", b"via HTTPS_PROXY", qos=1)
        got = observer.receive(timeout=FAILSAFE)
        assert (got.topic, got.payload) == ("devices/dev1/messages/events/", b"via HTTPS_PROXY")
        assert f"CONNECT 127.0.0.1:{broker.ws_port}" in proxy.log()
        assert "s3cret" not in gw.log()
    finally:
        if device is not None:
            device.close()
        observer.close()
        if gw is not None:
            gw.stop()
        proxy.stop()
