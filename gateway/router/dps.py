"""Device Provisioning Service devices on the AMQP side: one upstream connection each.

A provisioning client logs in with SASL PLAIN as ``{idScope}/registrations/{regId}``
with the registration's SAS token as password (the C SDK's and the Node SDK's
AMQP provisioning transports), then attaches a sender and a receiver on
``{idScope}/registrations/{regId}``. The login is per device, so it cannot go
over a shared hub connection:

1. At the device's sasl-init (held back by the listener's gate), the
   registration's address is matched against the link routes. No route, or a
   route whose connector is not ``sasl: relay``: SASL outcome ``auth`` and one
   log line.
2. Otherwise the gateway opens a connection of the device's own to that
   connector, sends the device's sasl-init frame there unchanged, and answers
   the device with the service's outcome code. The one exception: a device
   whose password is not a SAS token and for whose registration id the
   credential store holds a key (a device entry, or an enrollment group whose
   ``id_pattern`` matches) proves itself locally as for the hub, and the
   gateway signs the registration with that key (for a group, the key DPS
   derives: the same one).
3. After the device's open, its attaches to that registration's address go
   over that connection (link-routed, as ``max_devices_per_connection: 1``
   does); an attach to another registration's address is refused
   ``amqp:not-found``. When either side ends, the other is closed.

An unreachable connector gives SASL outcome ``sys-temp`` (the device retries).

Direction: above `device` and `gateway_tokens`, below `core`; the connection
of the device's own comes from the router's I/O (`ports.ConnectorIO`), and
what it needs of the router is declared here (`RelayRouter`).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from gateway.amqp.constants import SASL_AUTH, SASL_OK, SASL_SYS_TEMP
from gateway.amqp.framing import FRAME_SASL, FrameReader, encode_frame
from gateway.amqp.performatives import SaslInit
from gateway.amqp.sasl import SaslRelayClient
from gateway.amqp.types import Symbol
from gateway.auth.credentials import CredentialError
from gateway.auth.dps import registration_of, registration_resource
from gateway.auth.tokens import looks_like_sas_token
from gateway.logsafe import shown, source

from .device import DeviceConn, RelayedLogin, Verdict
from .gateway_tokens import GatewayTokens
from .observe import RouterObserver
from .ports import ConnectorIO
from .routes import RouteTable

log = logging.getLogger("gateway.router.dps")


class RelayRouter(Protocol):
    """What the provisioning relay needs of the router (`core.Router`)."""

    @property
    def config(self) -> Any: ...  # gateway.config.GatewayConfig
    @property
    def routes(self) -> RouteTable: ...
    @property
    def tokens(self) -> GatewayTokens | None: ...
    @property
    def observer(self) -> RouterObserver: ...
    @property
    def io(self) -> ConnectorIO: ...


def is_relay(connector: Any) -> bool:
    return getattr(connector, "protocol", "amqp") == "amqp" and getattr(connector, "sasl", "") == "relay"


class RegistrationRelay:
    """The router's provisioning-login relay (see the module docstring)."""

    def __init__(self, router: RelayRouter) -> None:
        self.router = router
        self.connectors = {c.name: c for c in router.config.connectors if is_relay(c)}

    # --------------------------------------------------------------- SASL time

    def route_for(self, scope: str, registration_id: str) -> Any | None:
        """The relay connector the registration's address routes to, or None."""
        match = self.router.routes.match(registration_resource(scope, registration_id), "in")
        if match is None:
            return None
        return self.connectors.get(match.route.connector)

    async def login(self, device: DeviceConn, username: str, password: str, frame: bytes) -> None:
        """The listener's gate: the device's PLAIN sasl-init, before the engine judges it."""
        registration = registration_of(username)
        if registration is None:
            return
        scope, reg_id = registration
        connector = self.route_for(scope, reg_id)
        if connector is None:
            self._refuse(device, username, SASL_AUTH, "no link route to a sasl: relay connector")
            return
        init = frame
        if not looks_like_sas_token(password):
            signed = await self._signed_init(device, username, password, frame, scope, reg_id)
            if signed is None:
                return
            init = signed
        io = self.router.io
        profile = self.router.config.tls_profile_for(connector)
        relay = SaslRelayClient(init, "PLAIN")
        try:
            stream = await io.relay_login(connector, profile, relay)
        except io.unavailable as exc:
            self._refuse(device, username, SASL_SYS_TEMP,
                         f"connector {connector.name} unreachable: {exc}")  # fmt: skip
            return
        kept = False
        try:
            assert relay.outcome is not None
            if relay.outcome != SASL_OK:
                self._refuse(device, username, relay.outcome,
                             f"connector {connector.name} answered {relay.description}")  # fmt: skip
                return
            device.relayed = RelayedLogin(connector, registration, stream)
            kept = True
        finally:
            # Refused, failed or cancelled (the device's handshake time ran out): not kept.
            if not kept:
                await io.close(stream)
        device.relay_verdict = Verdict(username, SASL_OK)
        log.info("device %s: registration %s of ID scope %s logged in at connector %s",
                 device.id, shown(reg_id), shown(scope), connector.name)  # fmt: skip

    async def _signed_init(self, device: DeviceConn, username: str, password: str, frame: bytes,
                           scope: str, reg_id: str) -> bytes | None:  # fmt: skip
        """The sasl-init with a registration token the gateway signs, if it holds a key for
        `reg_id` (after the device's local proof); the device's own frame otherwise."""
        tokens = self.router.tokens
        entry = tokens.store.lookup(reg_id) if tokens is not None else None
        if tokens is None or entry is None or not entry.uses_token:
            return frame
        result = await trio.to_thread.run_sync(
            tokens.store.authenticate_local, entry, device.peer[0], password or None
        )
        if not result.ok:
            self._refuse(device, username, SASL_AUTH, f"local authentication failed: {result.reason}")
            return None
        try:
            token = tokens.store.issue_registration_token(entry, scope, tokens.clock())
        except CredentialError as exc:
            self._refuse(device, username, SASL_AUTH, str(exc))
            return None
        response = b"\x00" + username.encode() + b"\x00" + token.token.encode()
        hostname = _init_hostname(frame)
        return encode_frame(SaslInit(Symbol("PLAIN"), response, hostname), frame_type=FRAME_SASL)

    def _refuse(self, device: DeviceConn, username: str, code: int, why: str) -> None:
        """Answer the device's login with `code`: one log line and one count."""
        device.relay_verdict = Verdict(username, code)
        self.router.observer.on_device_refused(device.listener, "registration")
        registration = registration_of(username)
        assert registration is not None
        log.warning("device %s (%s:%d): SASL login for registration %s of ID scope %s refused "
                    "(outcome %d): %s", device.id, device.peer[0], device.peer[1],
                    shown(registration[1]), shown(registration[0]), code, why,
                    extra=source(device.peer[0]))  # fmt: skip

    def verdict(self, device: DeviceConn, username: str) -> int:
        """The engine's SASL answer for a registration login (see `login`)."""
        v = device.relay_verdict
        device.relay_verdict = None
        if v is not None and v.username == username:
            return v.code
        # The gate did not run (a login the gate could not parse): judge the route only.
        registration = registration_of(username)
        assert registration is not None
        why = "no link route to a sasl: relay connector"
        if self.route_for(*registration) is not None:
            why = "the login could not be relayed"
        self._refuse(device, username, SASL_AUTH, why)
        return SASL_AUTH

    # ---------------------------------------------------------------- attaches

    def admits(self, device: DeviceConn, connector: str, address: str) -> str | None:
        """None if the device may attach `address` over relay `connector`, else why not."""
        login = device.relayed
        if login is None:
            return "the registration node is reachable only on a connection that logged in for it"
        if login.connector.name != connector or registration_of(address) != login.registration:
            return f"this connection logged in for registration {shown(login.registration[1])}"
        return None

    def take_stream(self, device: DeviceConn) -> tuple[Any, Any] | None:
        """The relayed login's connection, once (the binding runs the upstream on it)."""
        login = device.relayed
        if login is None or login.stream is None:
            return None
        stream, login.stream = login.stream, None
        return login.connector, stream

    def device_gone(self, device: DeviceConn, nursery: trio.Nursery | None) -> None:
        """Close a relayed connection no attach used."""
        login = device.relayed
        if login is not None and login.stream is not None and nursery is not None:
            nursery.start_soon(self.router.io.close, login.stream)
            login.stream = None


def _init_hostname(frame: bytes) -> str | None:
    reader = FrameReader(len(frame) + 8)
    reader.feed(frame)
    parsed = reader.next_frame()
    perf = parsed.performative if parsed is not None else None
    return perf.hostname if isinstance(perf, SaslInit) else None

