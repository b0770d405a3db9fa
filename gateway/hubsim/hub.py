"""``HubSim``: the IoT Hub emulator's public API.

The servers run on an asyncio loop in a thread of their own; every API call is
marshalled onto that loop, so callers (plain threads, trio via
``trio.to_thread.run_sync``) never touch hub state directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .amqp_server import DEFAULT_MAX_MESSAGE_SIZE as AMQP_MAX_MESSAGE_SIZE
from .amqp_server import AmqpServer
from .certs import CertPair, HubCertificates
from .dps import DpsState
from .dps_amqp import DpsAmqpServer
from .dps_mqtt import DpsMqttServer
from .mqtt_server import DEFAULT_MAX_MESSAGE_SIZE as MQTT_MAX_MESSAGE_SIZE
from .mqtt_server import MqttServer
from .records import LinkRecord, Recorder
from .state import HubState
from .websocket import start_websocket_server

log = logging.getLogger("gateway.hubsim")
T = TypeVar("T")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class HubSim:
    """An IoT Hub stand-in: AMQP 1.0 (CBS, device nodes) and MQTT 3.1.1 over TLS.

    ``devices`` maps identities ("dev" or "dev/mod") to base64 keys. A port of 0
    binds an ephemeral port (read it back from ``amqp_port``/``mqtt_port`` after
    ``start()``); None disables that protocol. ``host`` is the bind address
    (``mqtt_host`` overrides it for MQTT). ``policies`` are shared access
    policies (name -> key) whose tokens (``skn``) the hub also accepts.
    ``ws_port`` (default None: off) serves both protocols over WebSockets at
    ``/$iothub/websocket`` as IoT Hub does on 443 (``ws_host`` defaults to ``host``).
    """

    def __init__(
        self,
        devices: dict[str, str],
        hub_host: str = "myhub.azure-devices.net",
        amqp_port: int | None = 0,
        mqtt_port: int | None = 0,
        cert: CertPair | None = None,
        require_client_cert: bool = False,
        token_skew: float = 300,
        *,
        host: str = "127.0.0.1",
        mqtt_host: str | None = None,
        policies: dict[str, str] | None = None,
        client_ca_pem: bytes | None = None,
        amqp_max_message_size: int = AMQP_MAX_MESSAGE_SIZE,
        mqtt_max_message_size: int = MQTT_MAX_MESSAGE_SIZE,
        amqp_idle_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
        dps_scope: str | None = None,
        dps_group_keys: dict[str, str] | None = None,
        dps_device_keys: dict[str, str] | None = None,
        dps_host: str | None = None,
        dps_amqp_port: int | None = 0,
        dps_mqtt_port: int | None = 0,
        dps_retry_after: int = 1,
        dps_host_name: str = "global.azure-devices-provisioning.net",
        ws_port: int | None = None,
        ws_host: str | None = None,
    ) -> None:
        self.hub_host = hub_host
        self.ws_port = ws_port
        self.ws_host = ws_host or host
        self._ws_server: asyncio.Server | None = None
        self.host = host
        self.mqtt_host = mqtt_host or host
        self.amqp_port = amqp_port
        self.mqtt_port = mqtt_port
        self.require_client_cert = require_client_cert
        self.recorder = Recorder()
        self.dps_host = dps_host or host
        self.dps_host_name = dps_host_name
        extra = (host, self.mqtt_host, self.dps_host, dps_host_name)
        self.certs = HubCertificates(hub_host, cert, client_ca_pem, extra)
        self.state = HubState(hub_host, devices, policies or {}, self.recorder, token_skew, clock)
        # The Device Provisioning Service (off unless a scope is given): assigns to this hub.
        self.dps: DpsState | None = None
        self.dps_amqp_port = dps_amqp_port if dps_scope else None
        self.dps_mqtt_port = dps_mqtt_port if dps_scope else None
        self._dps_amqp: DpsAmqpServer | None = None
        self._dps_mqtt: DpsMqttServer | None = None
        if dps_scope:
            self.dps = DpsState(
                dps_scope, hub_host, self.state.devices, self.recorder,
                group_keys=dps_group_keys, device_keys=dps_device_keys,
                retry_after=dps_retry_after, token_skew=token_skew, clock=clock,
            )
            self._dps_amqp = DpsAmqpServer(self.dps, f"hubsim-dps-{dps_scope}")
            self._dps_mqtt = DpsMqttServer(self.dps)
        self._amqp = AmqpServer(
            self.state, f"hubsim-{hub_host}", amqp_max_message_size, amqp_idle_timeout
        )
        self._mqtt = MqttServer(self.state, mqtt_max_message_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- certificates -------------------------------------------------------------------

    @property
    def ca_pem(self) -> bytes | None:
        return self.certs.ca_pem

    @property
    def ca_file(self) -> str | None:
        return self.certs.ca_file

    def issue_device_cert(self, identity: str) -> tuple[bytes, bytes]:
        """(certificate chain PEM, key PEM) with CN = identity, for X.509 device tests."""
        return self.certs.issue_device_cert(identity)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> HubSim:
        with self._lock:
            if self.running:
                return self
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_quiet_exceptions)
            thread = threading.Thread(target=_run_loop, args=(loop,), name="hubsim", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            try:
                asyncio.run_coroutine_threadsafe(self._start_servers(), loop).result(START_TIMEOUT)
            except BaseException:
                self._shutdown_loop()
                raise
            log.info(
                "hubsim %s listening: amqps %s:%s, mqtts %s:%s",
                self.hub_host, self.host, self.amqp_port, self.mqtt_host, self.mqtt_port,
            )
            return self

    async def _start_servers(self) -> None:
        ctx = self.certs.server_context(self.require_client_cert)
        if self.amqp_port is not None:
            self.amqp_port = await self._amqp.start(self.host, self.amqp_port, ctx)
        if self.mqtt_port is not None:
            self.mqtt_port = await self._mqtt.start(self.mqtt_host, self.mqtt_port, ctx)
        if self._dps_amqp is not None and self.dps_amqp_port is not None:
            self.dps_amqp_port = await self._dps_amqp.start(self.dps_host, self.dps_amqp_port, ctx)
        if self._dps_mqtt is not None and self.dps_mqtt_port is not None:
            self.dps_mqtt_port = await self._dps_mqtt.start(self.dps_host, self.dps_mqtt_port, ctx)
        if self.ws_port is not None:
            self._ws_server = await start_websocket_server(
                self.ws_host,
                self.ws_port,
                ctx,
                self._amqp if self.amqp_port is not None else None,
                self._mqtt if self.mqtt_port is not None else None,
            )
            self.ws_port = int(self._ws_server.sockets[0].getsockname()[1])

    async def _stop_servers(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            self._ws_server = None
        if self._dps_mqtt is not None:
            await self._dps_mqtt.stop()
        if self._dps_amqp is not None:
            await self._dps_amqp.stop()
        await self._mqtt.stop()
        await self._amqp.stop()

    def stop(self) -> None:
        """Close listeners and connections; idempotent and bounded in time."""
        with self._lock:
            if self._loop is None:
                return
            if self.running:
                fut = asyncio.run_coroutine_threadsafe(self._stop_servers(), self._loop)
                try:
                    fut.result(STOP_TIMEOUT)
                except (concurrent.futures.TimeoutError, RuntimeError):
                    log.warning("hubsim: servers did not stop within %.0f s", STOP_TIMEOUT)
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        if thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
        if thread is None or not thread.is_alive():
            loop.close()

    def close(self) -> None:
        self.stop()
        self.certs.cleanup()

    def __enter__(self) -> HubSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- marshalling ----------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return fn(*args)  # stopped: nothing else touches the state
        if threading.current_thread() is thread:
            return fn(*args)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    # -- service-side API -------------------------------------------------------------------

    def send_c2d(
        self,
        device_id: str,
        body: bytes,
        properties: dict[str, Any] | None = None,
        app_properties: dict[str, Any] | None = None,
    ) -> str:
        """Queue a cloud-to-device message; returns its message-id.

        ``properties``: message_id, correlation_id, content_type, content_encoding,
        user_id (bytes), ack ("positive"|"negative"|"full"). Each delivery attempt
        gets a fresh 16-byte lock token (the AMQP delivery tag), see
        ``recorder.dispositions``.
        """
        return self._call(self.state.enqueue_c2d, device_id, body, properties, app_properties)

    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        """Patch desired properties (null deletes); returns the new desired $version."""
        return self._call(self.state.update_desired, device_id, copy.deepcopy(patch))

    def twin(self, device_id: str) -> dict[str, Any]:
        return self._call(lambda: copy.deepcopy(self.state.twin(device_id).document()))

    def invoke_method(
        self, device_id: str, name: str, payload: bytes | dict[str, Any] | list[Any] | None, timeout: float = 10
    ) -> tuple[int, bytes]:
        """Call a direct method; returns (status, response payload bytes).

        404 when the device has no method subscription/link, 504 on timeout.
        """
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        fut: concurrent.futures.Future[tuple[int, bytes]] = concurrent.futures.Future()
        request_id = self._call(self.state.start_method, device_id, name, data, fut)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self._call(self.state.forget_method, request_id)
            return 504, b'{"message":"timed out waiting for the device"}'

    def open_amqp_links(self) -> list[LinkRecord]:
        """AMQP links attached at the hub right now (connection, address, role, name, identity)."""
        return self._call(self._amqp.open_links)

    def open_connections(self, protocol: str) -> int:
        """Connections open right now, counted by the server itself."""
        server = self._amqp if protocol == "amqp" else self._mqtt
        return self._call(lambda: len(server.connections))

    @property
    def amqp_reply_before_settle(self) -> bool:
        """True: $cbs and twin replies are written before the request's disposition
        (as proton-based servers do); False (default): settled first, as IoT Hub."""
        return self._amqp.reply_before_settle

    @amqp_reply_before_settle.setter
    def amqp_reply_before_settle(self, value: bool) -> None:
        self._amqp.reply_before_settle = value

    def disconnect_all(self) -> None:
        """Close every connection from the hub side (AMQP: close with amqp:connection:forced)."""
        self._call(self._close_all, True)

    def kill_connections(self) -> None:
        """Drop every connection abruptly (TCP reset), as a lost hub would."""
        self._call(self._close_all, False)

    def _close_all(self, graceful: bool) -> None:
        self._amqp.close_all(graceful)
        self._mqtt.close_all(graceful)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Let cancelled connection tasks finish their cleanup before the loop closes.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=1.0))


def _quiet_exceptions(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Failed TLS handshakes (tests refusing certificates, port scanners) are routine here.
    exc = context.get("exception")
    log.debug("hubsim loop: %s (%r)", context.get("message"), exc)
