"""Credentials the gateway fills in for MQTT devices that hold none of their own.

On a device's CONNECT, in this order:

1. The password is a SAS token (`SharedAccessSignature ...`): the device
   brought its own credentials; the CONNECT is relayed untouched.
2. No credentials entry for the client id (`dev` or `dev/mod`): relayed
   untouched; the hub decides.
3. The entry's local authentication (password, source address or
   `trust: network`) fails: the gateway answers CONNACK 4 "bad user name or
   password" (MQTT 5: 0x86) for a missing or wrong password, CONNACK 5 "not
   authorized" (0x87) for an address outside `allowed_addresses`, and logs why
   (never the password).
4. A provisioning client (user name `{idScope}/registrations/{regId}/...`,
   client id = the registration id) with a symmetric-key or group entry: the
   gateway signs the registration (`sr={idScope}/registrations/{regId}`,
   `skn=registration`) with the key it holds, the one DPS derives from the
   enrollment group key, and puts it in the CONNECT as the password; not
   renewed (a registration lasts seconds).
5. A symmetric-key or group entry: the gateway issues a SAS token for the hub
   named in the user name and puts it in the CONNECT as the password (the user
   name stays; every other byte is unchanged). The token is renewed before it
   expires, see `gateway.mqtt_relay.renewal`.
6. An X.509 entry: the upstream TLS connection presents that device's client
   certificate, and the CONNECT goes without a password, as IoT Hub expects.

The first password check of an entry runs scrypt (tens of milliseconds, 16 MiB),
so it runs in a worker thread, at most two at a time per listener; successes
are cached by the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from gateway.auth.credentials import CredentialError, CredentialStore, DeviceCredential
from gateway.auth.dps import registration_of
from gateway.auth.local_auth import address_allowed
from gateway.auth.tokens import IssuedToken, looks_like_sas_token
from gateway.mqtt import encode
from gateway.mqtt.constants import MQTT_5, ConnackCode
from gateway.mqtt.packets import Connect

__all__ = [
    "ClientCertProfile",
    "ConnectDecision",
    "MqttCredentials",
]

log = logging.getLogger("gateway.mqtt.credentials")

# scrypt runs at most this many at a time per listener (each ~40 ms of CPU, 16 MiB).
SCRYPT_CONCURRENCY = 2

Clock = Callable[[], float]


@dataclass(frozen=True)
class ClientCertProfile:
    """A connector's TLS profile with a device's client certificate put in.

    Duck-types `gateway.config.TlsProfile` for `gateway.net.tls`; the context
    cache keys on the certificate paths, so each X.509 entry gets one context.
    """

    ca_file: Any
    cert_file: Path
    key_file: Path
    server_name: str | None
    min_version: str
    ciphers: str | None

    @classmethod
    def for_entry(cls, profile: Any, entry: DeviceCredential) -> ClientCertProfile:
        assert entry.cert_file is not None and entry.key_file is not None
        return cls(
            ca_file=getattr(profile, "ca_file", None),
            cert_file=entry.cert_file,
            key_file=entry.key_file,
            server_name=getattr(profile, "server_name", None),
            min_version=str(getattr(profile, "min_version", None) or "1.2"),
            ciphers=getattr(profile, "ciphers", None),
        )


@dataclass(frozen=True)
class ConnectDecision:
    """What to do with a device's CONNECT.

    `refuse` set: answer the device with that CONNACK code and close
    (`close_reason`, `detail` for the log). Otherwise send `connect_raw`
    upstream, over `profile` if it is set (X.509), and, with `token`, keep
    renewing it for `entry`.
    """

    connect_raw: bytes
    entry: DeviceCredential | None = None
    token: IssuedToken | None = None
    profile: ClientCertProfile | None = None
    refuse: ConnackCode | None = None
    close_reason: str = ""
    detail: str = ""
    registration: bool = False  # a provisioning registration the gateway signed (no renewal)


# Close reasons of refusals decided here (fit for metric labels, like CloseReason).
LOCAL_AUTH_FAILED = "local_auth_failed"
LOCAL_ADDRESS_REFUSED = "local_address_refused"
CREDENTIAL_ERROR = "credential_error"  # e.g. the entry's env: variable vanished


def _refusal(
    entry: DeviceCredential, code: ConnackCode, reason: str, detail: str
) -> ConnectDecision:
    return ConnectDecision(b"", entry, refuse=code, close_reason=reason, detail=detail)


class MqttCredentials:
    """The credential store as one MQTT listener uses it.

    `clock` gives wall-clock Unix seconds, the time SAS token expiries are
    written in (`se`); sleeping until a renewal uses trio's clock.
    """

    def __init__(
        self,
        store: CredentialStore,
        *,
        clock: Clock = time.time,
        scrypt_limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self._limiter = scrypt_limiter or trio.CapacityLimiter(SCRYPT_CONCURRENCY)

    async def decide(
        self, connect: Connect, peer_ip: str, hub_host: str, profile: Any
    ) -> ConnectDecision:
        """Apply steps 1-6 of the module docstring to `connect` from `peer_ip`.

        `profile` is the connector's TLS profile (the base of an X.509 device's one)."""
        untouched = ConnectDecision(bytes(connect.raw))
        password = connect.password
        if looks_like_sas_token(password):
            return untouched
        entry = self.store.lookup_identity(connect.client_id)
        if entry is None:
            return untouched
        if entry.local.password_hash is None:
            result = self.store.authenticate_local(entry, peer_ip, password)  # no scrypt
        else:
            result = await trio.to_thread.run_sync(
                self.store.authenticate_local, entry, peer_ip, password, limiter=self._limiter
            )
        if not result.ok:
            policy = entry.local
            if policy.allowed_addresses and not address_allowed(peer_ip, policy.allowed_addresses):
                code, reason = ConnackCode.NOT_AUTHORIZED, LOCAL_ADDRESS_REFUSED
            else:
                code, reason = ConnackCode.BAD_USERNAME_OR_PASSWORD, LOCAL_AUTH_FAILED
            return _refusal(entry, code, reason, f"local authentication failed: {result.reason}")
        registration = registration_of(connect.username)
        if registration is not None:
            return self._registration_decision(connect, entry, registration[0])
        if not entry.uses_token:
            return ConnectDecision(
                encode.connect_with_password(connect, None),
                entry,
                profile=ClientCertProfile.for_entry(profile, entry),
            )
        if connect.username is None and connect.protocol_level != MQTT_5:
            return _refusal(
                entry,
                ConnackCode.BAD_USERNAME_OR_PASSWORD,
                LOCAL_AUTH_FAILED,
                "CONNECT has no user name ({hub}/{device}/?api-version=...), so it cannot "
                "carry the token the gateway holds for this device",
            )
        try:
            connect_raw, token = self.connect_with_token(connect, entry, hub_host)
        except CredentialError as exc:
            return _refusal(entry, ConnackCode.SERVER_UNAVAILABLE, CREDENTIAL_ERROR, str(exc))
        return ConnectDecision(connect_raw, entry, token)

    def _registration_decision(
        self, connect: Connect, entry: DeviceCredential, id_scope: str
    ) -> ConnectDecision:
        """A provisioning client's CONNECT: the registration token goes in the password.

        Not renewed: a registration lasts seconds, and DPS closes the session itself."""
        if entry.module_id is not None or not entry.uses_token:
            return _refusal(
                entry,
                ConnackCode.NOT_AUTHORIZED,
                CREDENTIAL_ERROR,
                "the gateway holds no symmetric device key to sign this registration with",
            )
        try:
            token = self.store.issue_registration_token(entry, id_scope, self.clock())
        except CredentialError as exc:
            return _refusal(entry, ConnackCode.SERVER_UNAVAILABLE, CREDENTIAL_ERROR, str(exc))
        raw = encode.connect_with_password(connect, token.token.encode("utf-8"))
        return ConnectDecision(raw, entry, registration=True)

    def connect_with_token(
        self, connect: Connect, entry: DeviceCredential, hub_host: str
    ) -> tuple[bytes, IssuedToken]:
        """`connect` with a freshly issued token for `entry` as its password."""
        token = self.store.issue_token(entry, hub_host, self.clock())
        return encode.connect_with_password(connect, token.token.encode("utf-8")), token

    def renewal_schedule(self) -> Any:
        return self.store.renewal_schedule()
