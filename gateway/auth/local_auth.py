"""How a device proves itself to the gateway before the gateway acts for it.

Holding a device's hub key must not let any host on the LAN impersonate that
device, so each credentials entry names its local proof:

- a local password (AMQP SASL PLAIN password or MQTT CONNECT password), stored
  as a self-describing scrypt hash ``scrypt$N$r$p$salt_b64$hash_b64`` and
  compared in constant time;
- ``allowed_addresses``: the source addresses (CIDRs) the device connects from;
- ``trust: network``: no proof at all, an explicit choice logged at startup.

A password and addresses may be combined; then both must hold.
Pure functions and values: no I/O, no clocks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from gateway.logsafe import shown_plain

SCRYPT_PREFIX = "scrypt"
# Interactive-login strength (about 40 ms and 16 MiB here): devices reconnect
# rarely and a successful check is cached per store, see CredentialStore.
DEFAULT_SCRYPT_N = 2**14
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds accepted from a config file, so a crafted hash cannot make each
# device connect cost seconds of CPU or gigabytes of memory.
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_R = 32
MAX_SCRYPT_P = 16
MAX_SCRYPT_MEMORY = 1024 * 1024 * 1024

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class PasswordHashError(ValueError):
    """A password hash string that is not ``scrypt$N$r$p$salt_b64$hash_b64``."""


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed scrypt password hash."""

    n: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        return f"{SCRYPT_PREFIX}${self.n}${self.r}${self.p}${salt}${digest}"

    @property
    def memory(self) -> int:
        """Bytes scrypt needs for these parameters (128 * N * r, plus p blocks)."""
        return 128 * self.r * (self.n + self.p + 2)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PasswordHashError(f"password hash: {what} is not valid base64") from None


def parse_password_hash(text: str) -> PasswordHash:
    """Parse ``scrypt$N$r$p$salt_b64$hash_b64``; PasswordHashError says what is wrong
    (never quoting the hash itself)."""
    parts = text.strip().split("$")
    if len(parts) != 6 or parts[0] != SCRYPT_PREFIX:
        raise PasswordHashError(
            "password hash must look like scrypt$N$r$p$salt$hash "
            "(make one with: iot-gateway credentials hash-password)"
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise PasswordHashError("password hash: N, r and p must be integers") from None
    if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N:
        raise PasswordHashError(f"password hash: N must be a power of 2 from 2 to {MAX_SCRYPT_N}")
    if not 1 <= r <= MAX_SCRYPT_R:
        raise PasswordHashError(f"password hash: r must be 1..{MAX_SCRYPT_R}")
    if not 1 <= p <= MAX_SCRYPT_P:
        raise PasswordHashError(f"password hash: p must be 1..{MAX_SCRYPT_P}")
    salt = _b64(parts[4], "salt")
    digest = _b64(parts[5], "hash")
    if len(salt) < 8:
        raise PasswordHashError("password hash: salt must be at least 8 bytes")
    if len(digest) < 16:
        raise PasswordHashError("password hash: hash must be at least 16 bytes")
    parsed = PasswordHash(n, r, p, salt, digest)
    if parsed.memory > MAX_SCRYPT_MEMORY:
        raise PasswordHashError("password hash: N * r needs more than 1 GiB of memory")
    return parsed


def _as_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _scrypt(password: bytes, params: PasswordHash) -> bytes:
    return hashlib.scrypt(
        password,
        salt=params.salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.memory + 1024 * 1024,
        dklen=len(params.digest),
    )


def hash_password(
    password: str | bytes,
    *,
    n: int = DEFAULT_SCRYPT_N,
    r: int = DEFAULT_SCRYPT_R,
    p: int = DEFAULT_SCRYPT_P,
    salt: bytes | None = None,
) -> str:
    """A new ``scrypt$N$r$p$salt_b64$hash_b64`` string for ``password`` (random salt)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    # Parsing the would-be result refuses parameters the config loader would refuse.
    params = parse_password_hash(PasswordHash(n, r, p, salt, b"\0" * HASH_BYTES).encode())
    return PasswordHash(n, r, p, salt, _scrypt(_as_bytes(password), params)).encode()


def verify_password(password: str | bytes, stored: PasswordHash | str) -> bool:
    """True if ``password`` matches; the comparison runs in constant time."""
    params = parse_password_hash(stored) if isinstance(stored, str) else stored
    candidate = _scrypt(_as_bytes(password), params)
    return hmac.compare_digest(candidate, params.digest)


# --- addresses ----------------------------------------------------------------------------------


def parse_peer_address(peer_ip: str) -> Address | None:
    """The address a connection came from (``[v6]`` brackets and a ``%zone`` dropped);
    None if it is not an IP address."""
    text = peer_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def address_allowed(peer_ip: str, networks: tuple[Network, ...] | list[Network]) -> bool:
    """True if ``peer_ip`` lies in one of ``networks``. An IPv4-mapped IPv6 peer
    (``::ffff:a.b.c.d``, how a dual-stack socket reports IPv4 clients) also
    matches as its IPv4 address."""
    address = parse_peer_address(peer_ip)
    if address is None:
        return False
    candidates: list[Address] = [address]
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks)


# --- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalAuthPolicy:
    """What a device must show the gateway: a password, a source address, or nothing."""

    password_hash: PasswordHash | None = None
    allowed_addresses: tuple[Network, ...] = ()
    trust_network: bool = False

    def describe(self) -> str:
        """A short operator-readable summary (no hash material)."""
        if self.trust_network:
            return "trust: network"
        parts: list[str] = []
        if self.password_hash is not None:
            parts.append("password")
        if self.allowed_addresses:
            parts.append("from " + ",".join(str(n) for n in self.allowed_addresses))
        return " + ".join(parts) or "none"


@dataclass(frozen=True, slots=True)
class LocalAuthResult:
    """The outcome of a local authentication; ``reason`` is safe to log (no secrets)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def authenticate(
    policy: LocalAuthPolicy,
    identity: str,
    peer_ip: str,
    password: str | bytes | None,
    *,
    verify: bool = True,
) -> LocalAuthResult:
    """Check ``policy`` for a device connecting from ``peer_ip`` with ``password``.

    ``verify=False`` skips the scrypt computation and treats the password as
    already verified (used by a caller that cached a previous success).
    """
    identity = shown_plain(identity)  # the device's text, for the log
    if policy.trust_network:
        return LocalAuthResult(True, f"{identity}: accepted from {peer_ip} (trust: network)")
    if policy.password_hash is None and not policy.allowed_addresses:
        return LocalAuthResult(False, f"{identity}: no local authentication configured")
    if policy.allowed_addresses and not address_allowed(peer_ip, policy.allowed_addresses):
        return LocalAuthResult(False, f"{identity}: address {peer_ip} not in allowed_addresses")
    if policy.password_hash is not None:
        if password is None or password in ("", b""):
            return LocalAuthResult(False, f"{identity}: no password given")
        if verify and not verify_password(password, policy.password_hash):
            return LocalAuthResult(False, f"{identity}: wrong password")
    return LocalAuthResult(True, f"{identity}: accepted from {peer_ip} ({policy.describe()})")
