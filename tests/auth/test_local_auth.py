"""Local device authentication: scrypt hashes, constant-time checks, address matching."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from ipaddress import ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth import local_auth
from gateway.auth.local_auth import (
    LocalAuthPolicy,
    PasswordHashError,
    address_allowed,
    authenticate,
    hash_password,
    parse_password_hash,
    parse_peer_address,
    verify_password,
)

# Cheap parameters keep the tests fast; the format is the same.
FAST = {"n": 2**4, "r": 1, "p": 1}


def test_hash_format_is_self_describing_and_matches_hashlib() -> None:
    encoded = hash_password("s3cret", salt=b"0123456789abcdef")
    prefix, n, r, p, salt_b64, hash_b64 = encoded.split("$")
    assert (prefix, n, r, p) == ("scrypt", "16384", "8", "1")
    salt = base64.b64decode(salt_b64)
    assert salt == b"0123456789abcdef"
    # Independently recomputed with the documented parameters.
    expected = hashlib.scrypt(b"s3cret", salt=salt, n=16384, r=8, p=1, dklen=32)
    assert base64.b64decode(hash_b64) == expected
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)


def test_salts_are_random() -> None:
    first, second = hash_password("pw", **FAST), hash_password("pw", **FAST)
    assert first != second
    assert verify_password("pw", first) and verify_password("pw", second)


def test_verify_accepts_bytes_and_unicode() -> None:
    encoded = hash_password("pässwörd", **FAST)
    assert verify_password("pässwörd".encode(), encoded)
    assert verify_password("pässwörd", parse_password_hash(encoded))
    assert not verify_password(b"passwort", encoded)


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = hash_password("right", **FAST)
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(local_auth.hmac, "compare_digest", spy)
    assert verify_password("right", encoded)
    assert not verify_password("wrong", encoded)
    assert len(calls) == 2
    digest = parse_password_hash(encoded).digest
    assert all(b == digest and len(a) == len(digest) for a, b in calls)


SHAPE = (
    "password hash must look like scrypt$N$r$p$salt$hash "
    "(make one with: iot-gateway credentials hash-password)"
)
SALT = "c2FsdHNhbHQ="  # 8 bytes
HASH = "aGFzaGhhc2hoYXNoaGFzaA=="  # 16 bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plain", SHAPE),
        ("bcrypt$1$2$3$4$5", SHAPE),
        (f"scrypt$x$8$1${SALT}${HASH}", "password hash: N, r and p must be integers"),
        (f"scrypt$1000$8$1${SALT}${HASH}", "password hash: N must be a power of 2 from 2 to 1048576"),
        (f"scrypt$1$8$1${SALT}${HASH}", "password hash: N must be a power of 2 from 2 to 1048576"),
        (f"scrypt$2097152$8$1${SALT}${HASH}", "password hash: N must be a power of 2 from 2 to 1048576"),
        (f"scrypt$1024$0$1${SALT}${HASH}", "password hash: r must be 1..32"),
        (f"scrypt$1024$8$99${SALT}${HASH}", "password hash: p must be 1..16"),
        (f"scrypt$1024$8$17${SALT}${HASH}", "password hash: p must be 1..16"),
        (f"scrypt$1048576$32$1${SALT}${HASH}", "password hash: N * r needs more than 1 GiB of memory"),
        (f"scrypt$1024$8$1$!!${HASH}", "password hash: salt is not valid base64"),
        (f"scrypt$1024$8$1${SALT}$!!", "password hash: hash is not valid base64"),
        (f"scrypt$1024$8$1$c2FsdA==${HASH}", "password hash: salt must be at least 8 bytes"),
        (f"scrypt$1024$8$1${SALT}$aGFzaA==", "password hash: hash must be at least 16 bytes"),
    ],
)
def test_bad_hash_strings(text: str, message: str) -> None:
    with pytest.raises(PasswordHashError, match=f"^{re.escape(message)}$"):
        parse_password_hash(text)


@pytest.mark.parametrize("params", ["2$1$1", "4$1$16", "1048576$4$1", "16$32$1"])
def test_hash_parameters_at_their_limits(params: str) -> None:
    parsed = parse_password_hash(f"scrypt${params}${SALT}${HASH}")
    assert [parsed.n, parsed.r, parsed.p] == [int(x) for x in params.split("$")]


def test_verify_with_more_memory_than_openssl_allows_by_default() -> None:
    """N=2**16, r=8 needs 64 MiB, over OpenSSL's 32 MiB default: the limit is raised to fit."""
    encoded = hash_password("pw", n=2**16, r=8, p=1)
    assert verify_password("pw", encoded)


def test_hash_password_refuses_what_the_loader_refuses() -> None:
    with pytest.raises(PasswordHashError, match="N must be a power of 2"):
        hash_password("x", n=1000)


# --- addresses ----------------------------------------------------------------------------------


NETS = (ip_network("192.168.1.0/24"), ip_network("10.0.0.7"), ip_network("fd00:1::/64"))


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("192.168.1.1", True),
        ("192.168.1.255", True),
        ("192.168.2.1", False),
        ("10.0.0.7", True),
        ("10.0.0.8", False),
        ("::ffff:192.168.1.20", True),  # IPv4 peer on a dual-stack socket
        ("::ffff:10.0.0.8", False),
        ("fd00:1::1234", True),
        ("[fd00:1::1]", True),
        ("fd00:1::1%eth0", True),
        ("fd00:2::1", False),
        ("::1", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_allowed_addresses(peer: str, allowed: bool) -> None:
    assert address_allowed(peer, NETS) is allowed


def test_ipv4_network_never_matches_ipv6_peer() -> None:
    assert not address_allowed("::", (ip_network("0.0.0.0/0"),))
    assert address_allowed("::", (ip_network("::/0"),))
    assert address_allowed("203.0.113.9", (ip_network("0.0.0.0/0"),))
    assert address_allowed("::ffff:1.2.3.4", (ip_network("::ffff:0:0/96"),))
    assert parse_peer_address("[::1]") == parse_peer_address("::1%lo")
    # only a whole pair of brackets is dropped; the zone is everything after the first %
    assert parse_peer_address("[::1") is None and parse_peer_address("::1]") is None
    assert parse_peer_address("fe80::1%eth0%x") == ipaddress.IPv6Address("fe80::1")


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_address_matching_agrees_with_ipaddress(address: Any, prefix: int) -> None:
    prefix = min(prefix, address.max_prefixlen)
    network = ip_network(f"{address}/{prefix}", strict=False)
    assert address_allowed(str(address), (network,))
    if network.num_addresses < 2**address.max_prefixlen:
        try:
            outside = network.broadcast_address + 1
        except ipaddress.AddressValueError:
            outside = network.network_address - 1
        assert not address_allowed(str(outside), (network,))


# --- decisions ----------------------------------------------------------------------------------


def test_decisions_and_reasons() -> None:
    pw = parse_password_hash(hash_password("local-pw", **FAST))
    both = LocalAuthPolicy(password_hash=pw, allowed_addresses=(ip_network("192.168.1.0/24"),))
    cases = [
        (both, "192.168.1.5", "local-pw", True, "dev2: accepted from 192.168.1.5"),
        (both, "192.168.1.5", "Guess-123", False, "dev2: wrong password"),
        (both, "192.168.1.5", None, False, "dev2: no password given"),
        (both, "192.168.1.5", b"", False, "dev2: no password given"),
        (both, "192.168.1.5", "", False, "dev2: no password given"),
        (both, "10.1.1.1", "local-pw", False, "dev2: address 10.1.1.1 not in allowed_addresses"),
        (LocalAuthPolicy(trust_network=True), "10.1.1.1", None, True, "(trust: network)"),
        (LocalAuthPolicy(), "10.1.1.1", "x", False, "no local authentication configured"),
        (
            LocalAuthPolicy(allowed_addresses=(ip_network("10.0.0.0/8"),)),
            "10.1.1.1",
            None,
            True,
            "accepted from 10.1.1.1 (from 10.0.0.0/8)",
        ),
    ]
    for policy, peer, password, ok, reason in cases:
        result = authenticate(policy, "dev2", peer, password)
        assert (result.ok, bool(result)) == (ok, ok)
        assert reason in result.reason, (result.reason, reason)
        if isinstance(password, str) and password:
            assert password not in result.reason
    assert both.describe() == "password + from 192.168.1.0/24"
    assert LocalAuthPolicy().describe() == "none"
    assert "local-pw" not in repr(both) and pw.encode() not in repr(both)
