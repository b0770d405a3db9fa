"""The credential store: which devices the gateway holds credentials for, and using them.

Built once from the validated ``credentials:`` section (and again on reload);
afterwards pure: no I/O, no clocks (``now`` is passed in), safe to share.
The relays use it like this::

    store = CredentialStore.from_config(config.credentials, env=os.environ)
    entry = store.lookup(device_id, module_id)      # None: pass the device's own credentials
    if entry is not None:
        result = store.authenticate_local(entry, peer_ip, password)   # may run scrypt
        if not result.ok: refuse, log result.reason
        token = store.issue_token(entry, hub_host, now)               # entry.uses_token
        schedule.add(key, token.issued_at, token.expires_at)

A device's own SAS token (``looks_like_sas_token(password)``) is never
replaced: no entry applies to it. Secrets stay ``SecretStr`` values and out of
every repr, log line and description.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr

from gateway.auth.clock import clock_problem
from gateway.auth.dps import derive_device_key
from gateway.auth.local_auth import LocalAuthPolicy, LocalAuthResult, authenticate
from gateway.auth.tokens import (
    IssuedToken,
    RenewalSchedule,
    issue_device_token,
    issue_registration_token,
)

if TYPE_CHECKING:
    from gateway.config.credentials import (
        CredentialsSection,
        KeyRef,
        LocalAuthFields,
    )

CredentialKind = Literal["key", "x509", "group"]

DEFAULT_TOKEN_TTL = 3600.0
DEFAULT_RENEW_AT = 0.8
# Remembered successful password checks (one small digest per identity), so a
# reconnecting device does not cost an scrypt computation every time.
_VERIFIED_CACHE_LIMIT = 10_000


class CredentialError(Exception):
    """A credential cannot be built or used (missing environment variable, no key for a
    token, ...). The message names entries and variables, never secrets."""


class ClockNotSetError(CredentialError):
    """No token is issued while the wall clock is obviously unset (`gateway.auth.clock`):
    its expiry would be wrong. Temporary: issuing resumes once the clock is set."""


def _check_clock(now: float) -> None:
    problem = clock_problem(now)
    if problem is not None:
        raise ClockNotSetError(f"not issuing SAS tokens: {problem}")


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """What the gateway holds for one device or module identity."""

    device_id: str
    module_id: str | None
    kind: CredentialKind
    local: LocalAuthPolicy
    source: str  # where the credential comes from, safe to show: "env:DEV4_KEY", "group sensor-*"
    entry: str  # the config entry: "devices[2]" or "groups[0]"
    key: SecretStr | None = field(default=None, repr=False, compare=False)
    cert_file: Path | None = None
    key_file: Path | None = None
    # The entry opted in to store-and-forward (config: store_and_forward: true).
    store_and_forward: bool = False

    @property
    def identity(self) -> str:
        """``dev1`` or ``dev4/mod1`` (the MQTT client id form)."""
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"

    @property
    def uses_token(self) -> bool:
        """True for symmetric-key identities (SAS tokens); False for X.509 ones, whose
        certificate goes on the upstream TLS connection instead."""
        return self.kind != "x509"


@dataclass(frozen=True, slots=True)
class _Group:
    pattern: str
    key: SecretStr = field(repr=False)
    local: LocalAuthPolicy
    source: str
    entry: str
    store_and_forward: bool = False

    def matches(self, device_id: str) -> bool:
        return fnmatch.fnmatchcase(device_id, self.pattern)


def _policy(fields: LocalAuthFields) -> LocalAuthPolicy:
    return LocalAuthPolicy(
        password_hash=fields.password_hash,
        allowed_addresses=tuple(fields.allowed_addresses),
        trust_network=fields.trust == "network",
    )


def _key_value(ref: KeyRef | None, env: Mapping[str, str], where: str) -> SecretStr:
    if ref is None:
        raise CredentialError(f"credentials.{where}: key was not resolved")
    if ref.source == "env":
        name = ref.name or ""
        value = env.get(name)
        if value is None:
            raise CredentialError(f"credentials.{where}: environment variable {name} is not set")
        return SecretStr(value.strip())
    if ref.value is None:
        raise CredentialError(f"credentials.{where}: key was not resolved")
    return ref.value


class CredentialStore:
    """Device credentials by identity: exact entries first, then groups in order."""

    def __init__(
        self,
        devices: list[DeviceCredential] | None = None,
        groups: list[_Group] | None = None,
        *,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        renew_at: float = DEFAULT_RENEW_AT,
    ) -> None:
        self._devices = {(d.device_id, d.module_id): d for d in devices or ()}
        self._groups = list(groups or ())
        self.token_ttl = float(token_ttl)
        self.renew_at = float(renew_at)
        self._verified: dict[str, bytes] = {}
        self._cache_key = os.urandom(32)

    @classmethod
    def from_config(
        cls, section: CredentialsSection | None, env: Mapping[str, str] | None = None
    ) -> CredentialStore:
        """Build the store from a validated section (None -> an empty store).

        ``env`` (default: the process environment) supplies ``env:VAR`` keys;
        CredentialError if one is missing."""
        if section is None:
            return cls()
        env = os.environ if env is None else env
        devices: list[DeviceCredential] = []
        for i, device in enumerate(section.devices):
            where = f"devices[{i}]"
            local = _policy(device)
            if device.key is not None:
                ref = device.key_ref
                devices.append(
                    DeviceCredential(
                        device.device_id,
                        device.module_id,
                        "key",
                        local,
                        ref.describe() if ref else "key",
                        where,
                        key=_key_value(ref, env, f"{where}.key"),
                        store_and_forward=device.store_and_forward,
                    )
                )
            else:
                devices.append(
                    DeviceCredential(
                        device.device_id,
                        device.module_id,
                        "x509",
                        local,
                        f"cert {device.cert_file}",
                        where,
                        cert_file=device.cert_file,
                        key_file=device.key_file,
                        store_and_forward=device.store_and_forward,
                    )
                )
        groups: list[_Group] = []
        for i, group in enumerate(section.groups):
            where = f"groups[{i}]"
            ref = group.key_ref
            groups.append(
                _Group(
                    group.id_pattern,
                    _key_value(ref, env, f"{where}.group_key"),
                    _policy(group),
                    ref.describe() if ref else "group_key",
                    where,
                    store_and_forward=group.store_and_forward,
                )
            )
        return cls(devices, groups, token_ttl=section.token_ttl, renew_at=section.renew_at)

    # -- lookup ---------------------------------------------------------------------------

    def lookup(self, device_id: str, module_id: str | None = None) -> DeviceCredential | None:
        """The credential for this identity, or None (the device's own credentials pass
        through untouched). Groups apply to device identities, not modules."""
        found = self._devices.get((device_id, module_id or None))
        if found is not None or module_id:
            return found
        for group in self._groups:
            if group.matches(device_id):
                derived = derive_device_key(group.key.get_secret_value(), device_id)
                return DeviceCredential(
                    device_id,
                    None,
                    "group",
                    group.local,
                    f"group {group.pattern} ({group.source})",
                    group.entry,
                    key=SecretStr(derived),
                    store_and_forward=group.store_and_forward,
                )
        return None

    def lookup_identity(self, identity: str) -> DeviceCredential | None:
        """Lookup by ``dev1`` or ``dev4/mod1`` (an MQTT client id)."""
        device_id, sep, module_id = identity.partition("/")
        if sep and (not module_id or "/" in module_id):
            return None
        return self.lookup(device_id, module_id or None)

    # -- local authentication ---------------------------------------------------------------

    def authenticate_local(
        self, entry: DeviceCredential, peer_ip: str, password: str | bytes | None
    ) -> LocalAuthResult:
        """May the device connecting from ``peer_ip`` with ``password`` use ``entry``?

        On a first password check this runs scrypt (tens of milliseconds of CPU):
        async callers run it in a worker thread. ``reason`` is safe to log."""
        policy = entry.local
        if policy.password_hash is None or password is None or password in ("", b""):
            return authenticate(policy, entry.identity, peer_ip, password)
        digest = self._password_digest(entry, password)
        cached = self._verified.get(entry.identity)
        if cached is not None and hmac.compare_digest(cached, digest):
            return authenticate(policy, entry.identity, peer_ip, password, verify=False)
        result = authenticate(policy, entry.identity, peer_ip, password)
        if result.ok:
            if len(self._verified) >= _VERIFIED_CACHE_LIMIT:
                self._verified.clear()
            self._verified[entry.identity] = digest
        return result

    def _password_digest(self, entry: DeviceCredential, password: str | bytes) -> bytes:
        raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        stored = entry.local.password_hash
        salt = stored.salt if stored is not None else b""
        return hmac.new(self._cache_key, salt + b"\0" + raw, hashlib.sha256).digest()

    # -- tokens ---------------------------------------------------------------------------

    def issue_token(self, entry: DeviceCredential, hub_host: str, now: float) -> IssuedToken:
        """A fresh SAS token for ``entry`` on ``hub_host``, valid ``token_ttl`` from ``now``."""
        if entry.key is None:
            raise CredentialError(
                f"{entry.identity} authenticates with an X.509 certificate, not a SAS token"
            )
        _check_clock(now)
        return issue_device_token(
            entry.key.get_secret_value(),
            hub_host,
            entry.device_id,
            entry.module_id,
            now,
            self.token_ttl,
        )

    def issue_registration_token(
        self, entry: DeviceCredential, id_scope: str, now: float
    ) -> IssuedToken:
        """A registration token for ``entry`` (a device identity) in DPS scope ``id_scope``:
        signed with the key DPS derives for it, which for a group entry is the same
        derived key the gateway holds."""
        if entry.key is None or entry.module_id is not None:
            raise CredentialError(
                f"{entry.identity} has no symmetric device key to sign a registration with"
            )
        _check_clock(now)
        return issue_registration_token(
            entry.key.get_secret_value(), id_scope, entry.device_id, now, self.token_ttl
        )

    def renewal_schedule(self) -> RenewalSchedule[Any]:
        """An empty schedule with this store's TTL and renewal point."""
        return RenewalSchedule(self.token_ttl, self.renew_at)

    # -- for operators ----------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """One plain dict per entry (for ``credentials list`` and the admin API); never
        a secret: ``id``, ``kind``, ``source``, ``local_auth``, ``entry``."""
        rows: list[dict[str, Any]] = []
        for device in self._devices.values():
            rows.append(
                {
                    "id": device.identity,
                    "kind": device.kind,
                    "source": device.source,
                    "local_auth": device.local.describe(),
                    "entry": device.entry,
                    "store_and_forward": device.store_and_forward,
                }
            )
        for group in self._groups:
            rows.append(
                {
                    "id": group.pattern,
                    "kind": "group",
                    "source": group.source,
                    "local_auth": group.local.describe(),
                    "entry": group.entry,
                    "store_and_forward": group.store_and_forward,
                }
            )
        return rows

    def warnings(self) -> list[str]:
        """Lines the daemon logs as warnings at startup (``trust: network`` entries)."""
        lines: list[str] = []
        for device in self._devices.values():
            if device.local.trust_network:
                lines.append(
                    f"credentials {device.entry}: {device.identity} has trust: network; any host "
                    "that can reach the gateway may act as this device"
                )
        for group in self._groups:
            if group.local.trust_network:
                lines.append(
                    f"credentials {group.entry}: devices matching {group.pattern!r} have "
                    "trust: network; any host that can reach the gateway may act as them"
                )
        return lines

    def __len__(self) -> int:
        return len(self._devices) + len(self._groups)

    def __repr__(self) -> str:
        return f"CredentialStore({len(self._devices)} devices, {len(self._groups)} groups)"
