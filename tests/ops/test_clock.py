"""A clock that is obviously unset (a Pi without RTC, before NTP): no SAS token is issued,
/readyz says why, one log line says so, and all of it ends without a restart once the
clock is set. The clock is injected; the systemd unit waits for time-sync.target."""

from __future__ import annotations

import base64
import calendar
import http.client
import logging
import time
from pathlib import Path

import pytest
import trio
from pydantic import SecretStr

from gateway import daemon as daemon_module
from gateway.auth import clock
from gateway.auth.credentials import (
    ClockNotSetError,
    CredentialError,
    CredentialStore,
    DeviceCredential,
)
from gateway.auth.local_auth import LocalAuthPolicy
from gateway.config import parse_config_text
from gateway.ops.health import Readiness
from gateway.ops.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = SecretStr(base64.b64encode(bytes(range(32))).decode())
UNSET = 1_000.0  # 1970: how a Pi without RTC wakes up
SET = clock.BUILD_EPOCH + 86_400.0


def test_build_date_is_a_date_no_correct_clock_precedes() -> None:
    assert clock.BUILD_EPOCH == calendar.timegm(time.strptime(clock.BUILD_DATE, "%Y-%m-%d"))
    # The machine running the tests has a set clock; the constant must not be ahead of it.
    assert clock.clock_is_set(time.time())
    assert not clock.clock_is_set(clock.BUILD_EPOCH - 1) and clock.clock_is_set(clock.BUILD_EPOCH)
    problem = clock.clock_problem(UNSET)
    assert problem is not None and "reads 1970-01-01T00:16:40Z" in problem
    assert clock.BUILD_DATE in problem
    assert clock.clock_problem(SET) is None


def test_the_unit_waits_for_time_sync() -> None:
    text = (REPO_ROOT / "systemd" / "iot-gateway.service").read_text()
    # Repeated keys (Wants=, After=) accumulate in systemd; read every occurrence.
    values: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif "=" in line and not line.startswith("#") and section == "[Unit]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).extend(value.split())
    assert "time-sync.target" in values["After"]
    assert "time-sync.target" in values["Wants"]


def store() -> CredentialStore:
    dev = DeviceCredential("dev1", None, "key", LocalAuthPolicy(trust_network=True), "test",
                           "devices[0]", key=KEY)  # fmt: skip
    return CredentialStore([dev], token_ttl=3600)


def test_no_token_while_the_clock_is_unset() -> None:
    credentials = store()
    entry = credentials.lookup("dev1")
    assert entry is not None
    for issue in (
        lambda now: credentials.issue_token(entry, "hub.example", now),
        lambda now: credentials.issue_registration_token(entry, "0ne00TEST", now),
    ):
        with pytest.raises(ClockNotSetError) as caught:
            issue(UNSET)
        assert isinstance(caught.value, CredentialError)  # every caller already handles it
        assert "not issuing SAS tokens" in str(caught.value) and KEY.get_secret_value() not in str(
            caught.value
        )
        issued = issue(SET)
        assert issued.expires_at == int(SET + 3600)


def test_readiness_follows_the_clock_without_a_restart() -> None:
    now = [UNSET]
    registry = Registry()
    readiness = Readiness(registry, clock=lambda: now[0])
    ready, reason = readiness()
    assert not ready and reason.startswith("clock not set: the system clock reads 1970-")
    assert "not issuing SAS tokens" in reason
    now[0] = SET
    assert readiness() == (True, "ready")
    readiness.draining = True
    assert readiness() == (False, "draining")


CONFIG = """
gateway: {id: gw-clock}
admin: {listen: "127.0.0.1:0"}
listeners:
  - {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}
connectors:
  - {name: iothub, protocol: amqp, host: 127.0.0.1, port: 1, allow_plaintext: true}
link_routes:
  - {prefix: "devices/", connector: iothub}
"""


async def readyz(port: int) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/readyz")
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(get)


async def test_the_daemon_waits_for_the_clock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.daemon")
    now = [UNSET]
    config = parse_config_text(CONFIG, "<test>")
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, clock=lambda: now[0])
        await nursery.start(gw.run)
        port = gw.admin_addresses[0][1]
        status, body = await readyz(port)
        assert status == 503 and body.startswith("clock not set: the system clock reads 1970-")
        # The router's gateway-held tokens read the same clock.
        assert gw.router.tokens is not None and gw.router.tokens.clock() == UNSET
        now[0] = SET
        with trio.fail_after(30):  # progress: the clock loop sees the new time
            while (await readyz(port))[0] != 200:
                await trio.sleep(0.05)
        with trio.fail_after(30):
            while "the system clock is set" not in caplog.text:
                await trio.sleep(0.05)
        gw.request_stop()
    unset_lines = [r for r in caplog.records if "before this build's date" in r.getMessage()]
    assert len(unset_lines) == 1 and unset_lines[0].levelno == logging.WARNING
    assert "not issuing SAS tokens and not ready until it is set" in unset_lines[0].getMessage()
