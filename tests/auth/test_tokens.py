"""Issued tokens verify as the hub verifies them; the renewal schedule's arithmetic."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from urllib.parse import quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.sas import parse_sas_token, verify_sas_token
from gateway.auth.tokens import (
    IssuedToken,
    RenewalSchedule,
    issue_device_token,
    issue_registration_token,
    looks_like_sas_token,
)

from .conftest import DEV1_KEY, DEV2_KEY, HUB

NOW = 1_700_000_000.25


def independent_sig(key_b64: str, resource: str, expiry: int) -> str:
    message = f"{quote_plus(resource)}\n{expiry}".encode()
    digest = hmac.new(base64.b64decode(key_b64), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@pytest.mark.parametrize("module_id", [None, "mod1"])
def test_issued_token_verifies(module_id: str | None) -> None:
    issued = issue_device_token(DEV1_KEY, HUB, "dev1", module_id, NOW, 3600)
    audience = f"{HUB}/devices/dev1" + (f"/modules/{module_id}" if module_id else "")
    assert issued.audience == audience
    assert issued.issued_at == NOW and issued.expires_at == 1_700_003_600
    assert verify_sas_token(issued.token, DEV1_KEY, NOW, audience)
    assert verify_sas_token(issued.token, DEV1_KEY, issued.expires_at - 0.001, audience)
    assert not verify_sas_token(issued.token, DEV1_KEY, issued.expires_at, audience)
    assert not verify_sas_token(issued.token, DEV2_KEY, NOW, audience)
    assert not verify_sas_token(issued.token, DEV1_KEY, NOW, f"{HUB}/devices/dev2")
    parsed = parse_sas_token(issued.token)
    assert parsed.signature == independent_sig(DEV1_KEY, audience, issued.expires_at)
    assert parsed.skn is None


def test_issued_token_stays_out_of_repr() -> None:
    issued = issue_device_token(DEV1_KEY, HUB, "dev1", None, NOW, 60)
    text = repr(issued) + str(issued)
    assert "SharedAccessSignature" not in text and parse_sas_token(issued.token).sig not in text
    assert "expires_at=1700000060" in text and issued.lifetime == pytest.approx(59.75)


def test_expiry_is_whole_seconds_and_never_later_than_ttl() -> None:
    issued = issue_device_token(DEV1_KEY, HUB, "dev1", None, 100.9, 5)
    assert issued.expires_at == 105
    assert isinstance(IssuedToken, type)


def test_looks_like_sas_token() -> None:
    token = issue_device_token(DEV1_KEY, HUB, "dev1", None, NOW, 60).token
    assert looks_like_sas_token(token) and looks_like_sas_token(token.encode())
    for password in (None, "", b"", "local-password", b"SharedAccess"):
        assert not looks_like_sas_token(password)


# --- the schedule ---------------------------------------------------------------------------


def test_renew_at_fraction_of_lifetime() -> None:
    sched: RenewalSchedule[str] = RenewalSchedule(3600, 0.8)
    assert sched.next_deadline() is None and sched.due(0) == [] and len(sched) == 0
    assert sched.add("a", 1000, 4600) == pytest.approx(1000 + 2880)
    assert sched.add("b", 1500) == pytest.approx(1500 + 2880)  # default lifetime = ttl
    assert sched.expires_at("b") == 5100
    assert sched.next_deadline() == pytest.approx(3880)
    assert sched.soonest_expiry() == 4600
    assert sched.due(3879.9) == []
    assert sched.due(3880) == ["a"]
    assert sched.in_progress("a")
    # While "a" is being renewed, its deadline is its expiry, so "b" comes first.
    assert sched.next_deadline() == pytest.approx(4380)
    assert sched.due(3880) == []  # not handed out twice
    sched.add("a", 3881, 7481)
    assert not sched.in_progress("a")
    assert sched.renew_time("a") == pytest.approx(3881 + 2880)
    assert sched.due(10_000) == ["b", "a"]  # soonest first
    sched.remove("a")
    sched.remove("a")
    assert list(sched) == ["b"] and "a" not in sched and "b" in sched


def test_failed_renewal_backs_off_but_stays_before_expiry() -> None:
    sched: RenewalSchedule[str] = RenewalSchedule(
        3600, 0.8, retry_interval=5, max_retry_interval=60
    )
    sched.add("d", 0, 3600)
    now = 2880.0
    assert sched.due(now) == ["d"]
    delays = []
    for _ in range(6):
        retry = sched.failed("d", now)
        assert retry is not None
        delays.append(retry - now)
        now = retry
        assert sched.next_deadline() == pytest.approx(retry)
        assert sched.due(now) == ["d"]
    assert delays == pytest.approx([5, 10, 20, 40, 60, 60])
    assert sched.failures("d") == 6
    # Close to the expiry, retries are at most halfway to it.
    sched.add("e", 0, 100)
    assert sched.due(80) == ["e"]
    assert sched.failed("e", 96) == pytest.approx(98)
    assert sched.due(98) == ["e"]
    assert sched.failed("e", 99.9) == pytest.approx(100.4)  # never closer than 0.5 s
    assert sched.expired(99.9) == [] and sched.expired(100) == ["e"]
    assert sched.failed("gone", 1) is None


def test_success_resets_failures() -> None:
    sched: RenewalSchedule[str] = RenewalSchedule(10, 0.5)
    sched.add("k", 0, 10)
    sched.due(5)
    sched.failed("k", 5)
    sched.add("k", 6, 16)
    assert sched.failures("k") == 0 and sched.renew_time("k") == pytest.approx(11)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": 0}, "ttl must be greater than 0"),
        ({"ttl": 10, "renew_at": 1.0}, "renew_at must be between 0 and 1 (exclusive)"),
        ({"ttl": 10, "renew_at": 0}, "renew_at must be between 0 and 1 (exclusive)"),
        ({"ttl": 10, "retry_interval": 0}, "retry_interval must be > 0 and <= max_retry_interval"),
        ({"ttl": 10, "retry_interval": 90, "max_retry_interval": 60},
         "retry_interval must be > 0 and <= max_retry_interval"),
    ],
)
def test_bad_schedule_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RenewalSchedule(**kwargs)  # type: ignore[arg-type]


def test_schedule_settings_at_their_limits() -> None:
    """Short lifetimes and retries under a second, and retry == max, are all valid."""
    sched: RenewalSchedule[str] = RenewalSchedule(0.5, retry_interval=0.5, max_retry_interval=0.5)
    assert sched.add("k", 0) == pytest.approx(0.4)
    RenewalSchedule(10, retry_interval=60, max_retry_interval=60)


def test_schedule_questions_about_unknown_keys() -> None:
    sched: RenewalSchedule[str] = RenewalSchedule(100)
    assert sched.renew_time("nope") is None and sched.expires_at("nope") is None
    assert sched.failures("nope") == 0 and sched.in_progress("nope") is False
    assert sched.soonest_expiry() is None and sched.failed("nope", 1) is None
    sched.add("k", 0)
    sched.due(80)
    assert sched.in_progress("k") is True
    sched.failed("k", 81)
    assert sched.in_progress("k") is False


def test_due_keeps_insertion_order_among_equal_times() -> None:
    sched: RenewalSchedule[str] = RenewalSchedule(100)
    sched.add("b", 0)
    sched.add("a", 0)
    sched.add("c", -10)
    assert sched.due(80) == ["c", "b", "a"]


def test_retry_at_the_moment_of_expiry_uses_the_full_backoff() -> None:
    """With no time left there is no halfway point to pull the retry forward to."""
    sched: RenewalSchedule[str] = RenewalSchedule(100)
    sched.add("k", 0, 100)
    sched.due(80)
    assert sched.failed("k", 100) == pytest.approx(105)


def test_registration_token_fields() -> None:
    issued = issue_registration_token(DEV1_KEY, "0ne00A", "reg-1", NOW, 60)
    assert issued.audience == "0ne00A/registrations/reg-1"
    assert issued.issued_at == NOW and issued.expires_at == int(NOW) + 60
    assert parse_sas_token(issued.token).se == issued.expires_at


@settings(max_examples=200, deadline=None)
@given(
    issued=st.floats(min_value=0, max_value=2e9),
    lifetime=st.floats(min_value=0, max_value=1e6),
    renew_at=st.floats(min_value=0.01, max_value=0.99),
)
def test_renewal_always_falls_inside_the_lifetime(
    issued: float, lifetime: float, renew_at: float
) -> None:
    sched: RenewalSchedule[int] = RenewalSchedule(3600, renew_at)
    renew = sched.add(1, issued, issued + lifetime)
    assert issued <= renew <= issued + lifetime
    assert sched.next_deadline() == renew


@pytest.mark.parametrize(("ttl", "renew_at"), [(5, 0.8), (5, 0.5), (7, 0.9), (60, 0.8)])
def test_short_ttl_stream_always_holds_a_valid_token(ttl: float, renew_at: float) -> None:
    """Drive the schedule like a relay does for 30 s of 3 devices joining at odd times:
    sleep until next_deadline, renew what is due. At every step each device holds a
    token the hub would accept."""
    sched: RenewalSchedule[str] = RenewalSchedule(ttl, renew_at)
    tokens: dict[str, IssuedToken] = {}
    start = NOW
    joins = {"dev1": 0.0, "dev2": 0.37, "dev3": 2.9}
    for name, offset in joins.items():
        issued = issue_device_token(DEV1_KEY, HUB, name, None, start + offset, ttl)
        tokens[name] = issued
        sched.add(name, issued.issued_at, issued.expires_at)
    now, renewals, steps = start, 0, 0
    while now < start + 30:
        deadline = sched.next_deadline()
        assert deadline is not None
        steps += 1
        assert steps < 1000  # a deadline in the past would loop here
        # Probe the gap before the deadline: every token must still be valid.
        for probe in (now, (now + deadline) / 2, deadline - 1e-6):
            for name, issued in tokens.items():
                if probe >= start + joins[name]:
                    assert verify_sas_token(issued.token, DEV1_KEY, probe, f"{HUB}/devices/{name}")
        assert deadline > now - 1e-9
        now = deadline
        for name in sched.due(now):
            issued = issue_device_token(DEV1_KEY, HUB, name, None, now, ttl)
            tokens[name] = issued
            sched.add(name, issued.issued_at, issued.expires_at)
            renewals += 1
        assert sched.expired(now) == []
    assert renewals >= 3 * int(30 // ttl)
