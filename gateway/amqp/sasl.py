"""SASL negotiation (spec 5.3), both ends, as small sans-I/O state holders.

The Connection reads SASL frames and asks these objects what to answer; they never
see bytes. The server offers MSSBCBS, ANONYMOUS and/or PLAIN and reports what the
peer authenticated as; it does not judge PLAIN passwords unless given an
``authenticate`` callback (the gateway forwards the password, a SAS token, to the
hub instead). MSSBCBS is the Azure stacks' name for "no credentials here, a token
follows over CBS" (uamqp-c, the AMQP layer of the Azure IoT C SDK, asks for nothing
else); it carries no initial response and is handled exactly as ANONYMOUS.
The client does ANONYMOUS, PLAIN and EXTERNAL.

A server remembers how its negotiation went (`SaslServer.failure`) so the
caller can log one line naming both sides' mechanisms when it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .constants import SASL_AUTH, SASL_OK
from .errors import AMQPError
from .events import SaslAuthenticated
from .performatives import SaslChallenge, SaslInit, SaslMechanisms, SaslOutcome, SaslResponse
from .types import Array, Symbol, as_symbols

__all__ = [
    "SaslServer",
    "SaslClient",
    "SaslDecision",
    "SERVER_MECHANISMS",
    "CLIENT_MECHANISMS",
    "CBS_MECHANISMS",
]

SERVER_MECHANISMS = ("MSSBCBS", "ANONYMOUS", "PLAIN")
#: Mechanisms that authenticate nobody at SASL time: the device puts tokens over CBS.
CBS_MECHANISMS = frozenset({"MSSBCBS", "ANONYMOUS"})
CLIENT_MECHANISMS = ("ANONYMOUS", "PLAIN", "EXTERNAL")

UNAUTHORIZED = "amqp:unauthorized-access"

#: authenticate(mechanism, identity, password, hostname) -> accept?
Authenticator = Callable[[str, "str | None", "str | None", "str | None"], bool]


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
            return self._refuse(f"mechanism {mechanism!r:.40} was not offered")
        identity: str | None = None
        password: str | None = None
        authzid: str | None = None
        if mechanism == "PLAIN":
            parsed = _parse_plain(init.initial_response)
            if parsed is None:
                return self._refuse("malformed PLAIN initial response")
            authzid, identity, password = parsed
        if self._authenticate is not None and not self._authenticate(
            mechanism, identity, password, hostname
        ):
            return self._refuse(f"{mechanism} authentication failed")
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
            asked = repr(self.requested)[:42] if self.requested is not None else "none"
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
