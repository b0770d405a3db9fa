"""A paho-mqtt client wrapped for trio tests: blocking calls run in a worker thread.

paho is the independent device stack; its network loop runs in its own thread
(loop_start) and hands events to the test through thread-safe queues.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion

from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any = None


class PahoDevice:
    def __init__(
        self,
        client_id: str,
        *,
        protocol: int = paho.MQTTv311,
        keepalive: int = 60,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        ca_file: str | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = clean_session
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,  # tests decide when a device comes back
            **kwargs,
        )
        self.keepalive = keepalive
        if ca_file is not None:
            # Straight to the broker over TLS, verifying its certificate.
            self.client.tls_set(ca_certs=ca_file)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[Received] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_reason: Any = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack.put(reason)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put(
            Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.properties)
        )

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks.put(codes)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    # -- blocking API (call through trio.to_thread) -------------------------------------

    def _connect(
        self, port: int, will: tuple[str, bytes, int] | None, properties: Any, host: str
    ) -> Any:
        if will is not None:
            self.client.will_set(will[0], will[1], qos=will[2])
        kwargs = {"properties": properties} if properties is not None else {}
        self.client.connect(host, port, keepalive=self.keepalive, **kwargs)
        self.client.loop_start()
        return self.connack.get(timeout=WAIT)

    async def connect(
        self,
        port: int,
        *,
        will: tuple[str, bytes, int] | None = None,
        properties: Any = None,
        host: str = "127.0.0.1",
    ) -> Any:
        """Connect and return the CONNACK reason (a paho ReasonCode; 0/"Success" is good)."""
        return await trio.to_thread.run_sync(self._connect, port, will, properties, host)

    async def subscribe(self, topic: str, qos: Any = 1) -> Any:
        def run() -> Any:
            if isinstance(qos, paho.SubscribeOptions):
                result, _mid = self.client.subscribe(topic, options=qos)
            else:
                result, _mid = self.client.subscribe(topic, qos)
            assert result == paho.MQTT_ERR_SUCCESS
            return self.subacks.get(timeout=WAIT)

        return await trio.to_thread.run_sync(run)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, properties: Any = None
    ) -> None:
        def run() -> None:
            info = self.client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
            info.wait_for_publish(timeout=WAIT)
            assert info.is_published(), "publish not acknowledged"

        await trio.to_thread.run_sync(run)

    async def receive(self, timeout: float = WAIT) -> Received:
        return await trio.to_thread.run_sync(lambda: self.messages.get(timeout=timeout))

    async def wait_disconnected(self, timeout: float = WAIT) -> bool:
        return await trio.to_thread.run_sync(lambda: self.disconnected.wait(timeout))

    async def disconnect(self) -> None:
        def run() -> None:
            self.client.disconnect()
            self.disconnected.wait(WAIT)
            self.client.loop_stop()

        await trio.to_thread.run_sync(run)

    def close(self) -> None:
        """Tear down without DISCONNECT (abrupt loss) and stop the thread."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
