"""MQTT peers for black-box tests: a mosquitto TLS upstream, paho clients, a raw socket client."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from tests.waiting import FAILSAFE

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A port the kernel just handed out; mosquitto cannot bind port 0 itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mosquitto:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_mosquitto(
    directory: Path, cert_file: Path, key_file: Path, attempts: int = 5
) -> Mosquitto:
    for _ in range(attempts):
        port = free_port()
        conf = directory / "mosquitto.conf"
        log_path = directory / "mosquitto.log"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            f"certfile {cert_file}\n"
            f"keyfile {key_file}\n"
            "tls_version tlsv1.2\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type all\n" + ("user root\n" if os.geteuid() == 0 else "")
            # As root, mosquitto would switch to its own user, which cannot read our temp files.
        )
        log = open(log_path, "wb")  # the child owns it from here
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return Mosquitto(proc, port, log_path)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise RuntimeError("mosquitto did not start:\n" + log_path.read_text(errors="replace"))


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: list[tuple[str, str]] | None = None


class PahoClient:
    """A paho-mqtt 3.1.1 client run by its own network thread; events land in queues."""

    def __init__(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        will: tuple[str, bytes, int] | None = None,
        clean_session: bool = True,
        protocol: int = paho.MQTTv311,
    ) -> None:
        self.protocol = protocol
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session if protocol != paho.MQTTv5 else None,
            protocol=protocol,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=will[2])
        self.keepalive = keepalive
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connacks: queue.Queue[Any] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.published: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connacks.put(reason_code)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.disconnects.put(reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        user = list(getattr(props, "UserProperty", []) or []) if props is not None else None
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), user))

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        self.subacks.put(list(reason_codes))

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        with self._lock:
            event = self.published.setdefault(mid, threading.Event())
        event.set()

    def connect_plain(self, port: int, timeout: float = FAILSAFE, clean_start: bool = True) -> Any:
        if self.protocol == paho.MQTTv5:
            self.client.connect(
                "127.0.0.1", port, keepalive=self.keepalive, clean_start=clean_start
            )
        else:
            self.client.connect("127.0.0.1", port, keepalive=self.keepalive)
        self.client.loop_start()
        return self.connacks.get(timeout=timeout)

    def connect_tls(self, port: int, ca_file: Path, server_name: str, timeout: float = FAILSAFE) -> Any:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.check_hostname = False  # we dial 127.0.0.1; the chain is still verified
        self.client.tls_set_context(context)
        return self.connect_plain(port, timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = FAILSAFE) -> list[Any]:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=timeout)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = FAILSAFE,
        properties: Any = None,
    ) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0:
            info.wait_for_publish(timeout)
            return
        with self._lock:
            event = self.published.setdefault(info.mid, threading.Event())
        assert event.wait(timeout), f"no PUBACK for {topic}"

    def receive(self, timeout: float = FAILSAFE) -> Received:
        return self.messages.get(timeout=timeout)

    def receive_n(self, count: int, timeout: float = FAILSAFE) -> list[Received]:
        deadline = time.monotonic() + timeout
        return [
            self.messages.get(timeout=max(0.01, deadline - time.monotonic())) for _ in range(count)
        ]

    def drop(self) -> None:
        """Lose the connection abruptly: no DISCONNECT packet."""
        sock = self.client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.client.loop_stop()

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass
        self.client.loop_stop()


# --- a raw MQTT 3.1.1 client for timing-sensitive checks ----------------------


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int, username: str | None = None) -> bytes:
    flags = 0x02 | (0x80 if username is not None else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    return bytes([0x10]) + _remaining_length(len(body)) + body


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


def raw_connect(port: int, client_id: str, keepalive: int, timeout: float = FAILSAFE) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(connect_packet(client_id, keepalive))
    connack = recv_exact(sock, 4)
    assert connack[:2] == b"\x20\x02" and connack[3] == 0, connack
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
