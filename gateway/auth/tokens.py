"""SAS tokens the gateway issues for devices, and when to renew them.

Pure: the caller passes ``now`` (Unix seconds) everywhere; nothing here reads a
clock, sleeps or does I/O. A relay keeps one :class:`RenewalSchedule`, asks
``next_deadline()`` how long it may sleep, and at that time asks ``due(now)``
which tokens to issue again.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.auth.dps import registration_resource
from gateway.auth.sas import SAS_PREFIX, device_resource_uri, generate_sas_token

K = TypeVar("K", bound=Hashable)

DEFAULT_RETRY_INTERVAL = 5.0
MAX_RETRY_INTERVAL = 60.0
MIN_RETRY_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A SAS token issued by the gateway. The token is replayable, so it is kept out of repr."""

    token: str = field(repr=False)
    audience: str  # the resource URI it is valid for: {host}/devices/{id}[/modules/{mid}]
    issued_at: float
    expires_at: int  # the token's ``se``

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at


def issue_device_token(
    key_b64: str,
    hub_host: str,
    device_id: str,
    module_id: str | None,
    now: float,
    ttl: float,
) -> IssuedToken:
    """A device (or module) token for ``hub_host`` valid until ``floor(now + ttl)``."""
    audience = device_resource_uri(hub_host, device_id, module_id)
    expires_at = math.floor(now + ttl)
    return IssuedToken(generate_sas_token(audience, key_b64, expires_at), audience, now, expires_at)


def issue_registration_token(
    key_b64: str, id_scope: str, registration_id: str, now: float, ttl: float
) -> IssuedToken:
    """A Device Provisioning Service registration token, as the SDKs make it:
    ``sr={idScope}/registrations/{regId}`` (encoded), ``skn=registration``."""
    audience = registration_resource(id_scope, registration_id)
    expires_at = math.floor(now + ttl)
    token = generate_sas_token(audience, key_b64, expires_at, policy_name="registration")
    return IssuedToken(token, audience, now, expires_at)


def looks_like_sas_token(password: str | bytes | None) -> bool:
    """True if a device's password is a SAS token of its own (passed through untouched)
    rather than a local password."""
    if password is None:
        return False
    prefix = SAS_PREFIX.encode("ascii") if isinstance(password, bytes) else SAS_PREFIX
    return password.startswith(prefix)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Entry:
    issued_at: float
    expires_at: float
    renew_time: float
    next_time: float  # renew_time, or a retry time after a failure
    in_flight: bool = False
    failures: int = 0


class RenewalSchedule(Generic[K]):
    """When each held token must be renewed: at ``renew_at`` of its lifetime.

    ``due(now)`` returns the keys whose time has come and marks them in
    progress, so ``next_deadline()`` moves on to the next one; the caller then
    reports ``add(key, ...)`` with the new token or ``failed(key, now)``, which
    schedules a retry (5 s, doubling up to 60 s, and never later than halfway to
    the expiry while there is time left). A key in progress still has a
    deadline: its expiry, after which ``expired(now)`` lists it.
    """

    def __init__(
        self,
        ttl: float,
        renew_at: float = 0.8,
        *,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        max_retry_interval: float = MAX_RETRY_INTERVAL,
    ) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be greater than 0")
        if not 0 < renew_at < 1:
            raise ValueError("renew_at must be between 0 and 1 (exclusive)")
        if not 0 < retry_interval <= max_retry_interval:
            raise ValueError("retry_interval must be > 0 and <= max_retry_interval")
        self.ttl = float(ttl)
        self.renew_at = float(renew_at)
        self.retry_interval = float(retry_interval)
        self.max_retry_interval = float(max_retry_interval)
        self._entries: dict[K, _Entry] = {}

    # -- bookkeeping -------------------------------------------------------------------

    def add(self, key: K, issued_at: float, expires_at: float | None = None) -> float:
        """Record a (re)issued token; returns when it should be renewed.

        Without ``expires_at`` the token is taken to live ``ttl`` seconds."""
        if expires_at is None:
            expires_at = issued_at + self.ttl
        renew_time = issued_at + max(0.0, expires_at - issued_at) * self.renew_at
        self._entries[key] = _Entry(issued_at, float(expires_at), renew_time, renew_time)
        return renew_time

    def remove(self, key: K) -> None:
        """Forget ``key`` (its device left); unknown keys are ignored."""
        self._entries.pop(key, None)

    def failed(self, key: K, now: float) -> float | None:
        """A renewal of ``key`` failed; returns when to try again (None if the key
        was removed meanwhile)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.failures += 1
        entry.in_flight = False
        delay = min(self.retry_interval * 2 ** (entry.failures - 1), self.max_retry_interval)
        remaining = entry.expires_at - now
        if remaining > 0:
            delay = min(delay, max(remaining / 2, MIN_RETRY_INTERVAL))
        entry.next_time = now + delay
        return entry.next_time

    # -- questions ----------------------------------------------------------------------

    def due(self, now: float) -> list[K]:
        """Keys to renew now, soonest first; each is marked in progress."""
        ready = [
            (entry.next_time, key)
            for key, entry in self._entries.items()
            if not entry.in_flight and entry.next_time <= now
        ]
        ready.sort(key=lambda item: item[0])
        for _, key in ready:
            self._entries[key].in_flight = True
        return [key for _, key in ready]

    def expired(self, now: float) -> list[K]:
        """Keys whose token has expired by ``now`` (the hub no longer accepts it)."""
        return [key for key, entry in self._entries.items() if entry.expires_at <= now]

    def next_deadline(self) -> float | None:
        """The earliest time something is due (a renewal, a retry, or an expiry of a
        token whose renewal is in progress); None when nothing is held."""
        times = [
            entry.expires_at if entry.in_flight else entry.next_time
            for entry in self._entries.values()
        ]
        return min(times, default=None)

    def renew_time(self, key: K) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.next_time

    def expires_at(self, key: K) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.expires_at

    def soonest_expiry(self) -> float | None:
        """The earliest expiry of any held token (for the seconds-to-expiry metric)."""
        return min((entry.expires_at for entry in self._entries.values()), default=None)

    def in_progress(self, key: K) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.in_flight

    def failures(self, key: K) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else entry.failures

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))
