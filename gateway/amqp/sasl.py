"""SASL negotiation (spec 5.3), both ends, as small sans-I/O state holders.

The Connection reads SASL frames and asks these objects what to answer; they never
see bytes. The server offers MSSBCBS, ANONYMOUS and/or PLAIN and reports what the
peer authenticated as; it does not judge PLAIN passwords unless given an
``authenticate`` callback (the gateway forwards the password, a SAS token, to the
hub instead). MSSBCBS is the Azure stacks' name for "no credentials here, a token
follows over CBS" (uamqp-c, the AMQP layer of the Azure IoT C SDK, asks for nothing
else); it carries no initial response and is handled exactly as ANONYMOUS.
The client does ANONYMOUS, PLAIN and EXTERNAL. `SaslRelayClient` is the client
side of an exchange whose sasl-init is someone else's, relayed byte for byte
(a device's own login to the Device Provisioning Service); it sees bytes, as
it must forward the frame unchanged.

A server remembers how its negotiation went (`SaslServer.failure`) so the
caller can log one line naming both sides' mechanisms when it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.logsafe import shown

from .constants import SASL_AUTH, SASL_OK, SASL_SYS
from .errors import AMQPError, FramingError
from .events import SaslAuthenticated
from .framing import SASL_HEADER, FrameReader
from .performatives import SaslChallenge, SaslInit, SaslMechanisms, SaslOutcome, SaslResponse
from .types import Array, Symbol, as_symbols

__all__ = [
    "SaslServer",
    "SaslClient",
    "SaslDecision",
    "SaslRelayClient",
    "SERVER_MECHANISMS",
    "CLIENT_MECHANISMS",
    "CBS_MECHANISMS",
]

SERVER_MECHANISMS = ("MSSBCBS", "ANONYMOUS", "PLAIN")
#: Mechanisms that authenticate nobody at SASL time: the device puts tokens over CBS.
CBS_MECHANISMS = frozenset({"MSSBCBS", "ANONYMOUS"})
CLIENT_MECHANISMS = ("ANONYMOUS", "PLAIN", "EXTERNAL")

UNAUTHORIZED = "amqp:unauthorized-access"

#: authenticate(mechanism, identity, password, hostname) -> accept? True/False, or the
#: sasl-outcome code to answer (0 ok, 1 auth, 2 sys, 3 sys-perm, 4 sys-temp).
Authenticator = Callable[[str, "str | None", "str | None", "str | None"], "bool | int"]


@dataclass(slots=True)
class SaslDecision:
    """What the server answers to a sasl-init."""

    outcome: SaslOutcome
    authenticated: SaslAuthenticated | None
    reason: str = ""


class SaslServer:
    """Server side: offers mechanisms, judges the sasl-init.

    ``required=False`` also accepts a client that skips SASL and sends the AMQP
    header directly.
    """

    def __init__(
        self,
        mechanisms: Iterable[str] = SERVER_MECHANISMS,
        *,
        required: bool = True,
        authenticate: Authenticator | None = None,
    ) -> None:
        mechs = tuple(m.upper() for m in mechanisms)
        if not mechs:
            raise ValueError("a SASL server needs at least one mechanism")
        for m in mechs:
            if m not in SERVER_MECHANISMS:
                raise ValueError(f"unsupported server SASL mechanism {m!r}")
        self.mechanisms = mechs
        self.required = required
        self._authenticate = authenticate
        #: the sasl-server-mechanisms frame went out (the client's turn to choose).
        self.offered = False
        #: the mechanism the client asked for (None until its sasl-init arrives).
        self.requested: str | None = None
        #: why the negotiation failed ("" while it has not).
        self.failure = ""

    def mechanisms_frame(self) -> SaslMechanisms:
        self.offered = True
        return SaslMechanisms(Array(0xB3, [Symbol(m) for m in self.mechanisms]))

    def on_init(self, init: SaslInit) -> SaslDecision:
        mechanism = str(init.mechanism)
        self.requested = mechanism
        hostname = init.hostname
        if mechanism not in self.mechanisms:
            return self._refuse("the mechanism asked for is not offered")
        identity: str | None = None
        password: str | None = None
        authzid: str | None = None
        if mechanism == "PLAIN":
            parsed = _parse_plain(init.initial_response)
            if parsed is None:
                return self._refuse("malformed PLAIN initial response")
            authzid, identity, password = parsed
        if self._authenticate is not None:
            verdict = self._authenticate(mechanism, identity, password, hostname)
            if verdict is False:
                # The authenticator logs its own refusals: no summary of ours for them.
                reason = f"{mechanism} authentication failed"
                return SaslDecision(SaslOutcome(SASL_AUTH), None, reason)
            if type(verdict) is int and verdict != SASL_OK:
                # An outcome code: the caller judged (and logged) it, e.g. a relayed login.
                return SaslDecision(
                    SaslOutcome(verdict), None, f"{mechanism} authentication failed ({verdict})"
                )
        event = SaslAuthenticated(mechanism, identity, password, authzid, hostname)
        return SaslDecision(SaslOutcome(SASL_OK), event)

    def on_response(self, response: SaslResponse) -> SaslDecision:
        # None of our mechanisms sends a challenge, so a response is out of turn.
        return self._refuse("unexpected sasl-response")

    def on_malformed(self, description: str) -> SaslDecision:
        """A SASL frame from the client that cannot be read (or is not a SASL
        frame): refused with outcome ``auth`` like any failed negotiation."""
        return self._refuse(f"bad SASL frame: {description:.200}")

    def _refuse(self, reason: str) -> SaslDecision:
        self.failure = reason
        return SaslDecision(SaslOutcome(SASL_AUTH), None, reason)

    def failure_summary(self, ended: bool = True) -> str | None:
        """One line on a failed negotiation, naming both sides' mechanisms; None
        when it succeeded, never started, or (``ended`` False) is still under way.
        A client that closes once it has seen our mechanisms without choosing one
        found none it could use (uamqp-c does this when MSSBCBS is missing)."""
        offered = ", ".join(self.mechanisms)
        if self.failure:
            asked = shown(self.requested) if self.requested is not None else "none"
            return f"{self.failure} (client asked for {asked}; offered {offered})"
        if ended and self.offered and self.requested is None:
            return (
                "the client closed without choosing a mechanism, so none of ours "
                f"suits it (offered {offered})"
            )
        return None


def _parse_plain(response: bytes | None) -> tuple[str | None, str, str] | None:
    """RFC 4616: [authzid] NUL authcid NUL passwd, UTF-8."""
    if response is None:
        return None
    parts = bytes(response).split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return None
    return (authzid or None), authcid, passwd


@dataclass(slots=True)
class SaslClient:
    """Client side: one mechanism, chosen up front.

    ``SaslClient("PLAIN", username=..., password=...)``, ``SaslClient("ANONYMOUS")``,
    ``SaslClient("EXTERNAL")`` (the identity comes from the TLS client certificate).
    """

    mechanism: str = "ANONYMOUS"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    authzid: str | None = None
    #: sasl-init hostname; defaults to the Connection's hostname.
    hostname: str | None = None

    def __post_init__(self) -> None:
        self.mechanism = self.mechanism.upper()
        if self.mechanism not in CLIENT_MECHANISMS:
            raise ValueError(f"unsupported client SASL mechanism {self.mechanism!r}")
        if self.mechanism == "PLAIN" and (self.username is None or self.password is None):
            raise ValueError("SASL PLAIN needs a username and a password")

    @classmethod
    def anonymous(cls) -> SaslClient:
        return cls("ANONYMOUS")

    @classmethod
    def plain(cls, username: str, password: str, authzid: str | None = None) -> SaslClient:
        return cls("PLAIN", username, password, authzid)

    @classmethod
    def external(cls, authzid: str | None = None) -> SaslClient:
        return cls("EXTERNAL", authzid=authzid)

    def on_mechanisms(self, frame: SaslMechanisms, hostname: str | None) -> SaslInit:
        offered = [str(m) for m in as_symbols(frame.sasl_server_mechanisms)]
        if self.mechanism not in offered:
            raise AMQPError(
                f"SASL mechanism {self.mechanism} not offered by the server "
                f"(offered: {', '.join(offered) or 'none'})",
                UNAUTHORIZED,
            )
        if self.mechanism == "PLAIN":
            assert self.username is not None and self.password is not None
            response = b"\x00".join(
                ((self.authzid or "").encode(), self.username.encode(), self.password.encode())
            )
        elif self.mechanism == "EXTERNAL":
            response = (self.authzid or "").encode()
        else:
            # RFC 4505 trace information; proton sends the user name or "anonymous".
            response = b"anonymous"
        return SaslInit(Symbol(self.mechanism), response, self.hostname or hostname)

    def on_challenge(self, frame: SaslChallenge) -> SaslResponse:
        # None of our mechanisms has a challenge step; answer empty as EXTERNAL allows.
        return SaslResponse(b"")

    def authenticated(self, hostname: str | None = None) -> SaslAuthenticated:
        return SaslAuthenticated(
            self.mechanism, self.username, None, self.authzid, self.hostname or hostname
        )


class SaslRelayClient:
    """Client side of a SASL exchange that forwards another peer's sasl-init verbatim.

    ``start()`` gives the SASL protocol header to send; feed the server's bytes to
    ``receive_data``, which returns bytes to send (the sasl-init frame, once the
    server's mechanisms arrived). ``outcome`` is the server's sasl-outcome code
    once it came (or SASL_SYS when the exchange cannot go on: the server did not
    offer the mechanism, or challenged); ``rest`` holds the bytes that followed it.
    Raises FramingError on bytes that are not a SASL exchange.
    """

    MAX_FRAME = 65536

    def __init__(self, init_frame: bytes, mechanism: str) -> None:
        self.init_frame = bytes(init_frame)
        self.mechanism = mechanism
        self.outcome: int | None = None
        self.description = ""
        self.rest = b""
        self._buf = bytearray()
        self._header = False

    @staticmethod
    def start() -> bytes:
        return SASL_HEADER

    def receive_data(self, data: bytes) -> bytes:
        if self.outcome is not None:
            self.rest += data
            return b""
        self._buf += data
        out = bytearray()
        if not self._header:
            if len(self._buf) < 8:
                if bytes(self._buf) != SASL_HEADER[: len(self._buf)]:
                    raise FramingError(f"not a SASL protocol header: {bytes(self._buf)!r}")
                return b""
            if bytes(self._buf[:8]) != SASL_HEADER:
                raise FramingError(f"server answered {bytes(self._buf[:8])!r}, not a SASL header")
            del self._buf[:8]
            self._header = True
        while len(self._buf) >= 8 and self.outcome is None:
            size = int.from_bytes(self._buf[:4], "big")
            if size < 8 or size > self.MAX_FRAME:
                raise FramingError(f"SASL frame of {size} bytes")
            if len(self._buf) < size:
                break
            reader = FrameReader(self.MAX_FRAME)
            reader.feed(bytes(self._buf[:size]))
            del self._buf[:size]
            frame = reader.next_frame()
            perf = frame.performative if frame is not None else None
            if type(perf) is SaslMechanisms:
                offered = [str(m) for m in as_symbols(perf.sasl_server_mechanisms)]
                if self.mechanism not in offered:
                    self.outcome = SASL_SYS
                    self.description = f"server offers {', '.join(offered) or 'nothing'}"
                    break
                out += self.init_frame
            elif type(perf) is SaslOutcome:
                self.outcome = int(perf.code or 0)
                self.description = f"sasl-outcome {self.outcome}"
            elif type(perf) is SaslChallenge:
                self.outcome = SASL_SYS  # PLAIN has no challenge step
                self.description = "unexpected sasl-challenge"
            elif perf is not None:
                raise FramingError(f"unexpected {type(perf).__name__} in a SASL exchange")
        if self.outcome is not None:
            self.rest = bytes(self._buf)
            self._buf.clear()
        return bytes(out)
