"""The admin API on the LAN: /api/* needs the bearer token of admin.token_file (required
when admin.listen is not loopback); /healthz, /readyz and /metrics stay open; refusals
are logged once per source address; `iot-gateway status` sends the token."""

from __future__ import annotations

import http.client
import io
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import daemon as daemon_module
from gateway.config import ConfigError, load_config, parse_config_text
from gateway.config.admin_token import is_loopback
from gateway.ops import status
from gateway.ops.admin import serve_admin
from gateway.ops.health import Readiness
from gateway.ops.metrics import Metrics
from gateway.ops.registry import Registry

TOKEN = "c2VjcmV0LWFkbWluLXRva2VuLWZvci10ZXN0cw"


def token_file(directory: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = directory / "admin-token"
    path.write_text(text)
    path.chmod(mode)
    return path


def parse(text: str, directory: Path) -> Any:
    return parse_config_text(text, str(directory / "gateway.yaml"))


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:9090", '"[::]:9090"', "192.168.1.5:9090",
                                    "gw.local:9090"])  # fmt: skip
def test_a_non_loopback_admin_endpoint_needs_a_token_file(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"admin: {{listen: {listen}}}\n", tmp_path)
    [line] = caught.value.errors
    assert line.startswith(f"{tmp_path / 'gateway.yaml'}:1: admin.listen: ")
    assert "set admin.token_file" in line


@pytest.mark.parametrize("listen", ["127.0.0.1:9090", "127.3.4.5:0", '"[::1]:9090"',
                                    "localhost:9090"])  # fmt: skip
def test_loopback_needs_no_token(tmp_path: Path, listen: str) -> None:
    assert parse(f"admin: {{listen: {listen}}}\n", tmp_path).admin.token is None


def test_a_disabled_admin_endpoint_needs_no_token(tmp_path: Path) -> None:
    assert parse("admin: {listen: 0.0.0.0:9090, enabled: false}\n", tmp_path).admin.token is None


def test_the_token_is_read_relative_to_the_config(tmp_path: Path) -> None:
    token_file(tmp_path)
    config = parse("admin: {listen: 0.0.0.0:9090, token_file: admin-token}\n", tmp_path)
    assert config.admin.token.get_secret_value() == TOKEN
    assert config.admin.token_file == tmp_path / "admin-token"
    assert TOKEN not in repr(config) and TOKEN not in config.model_dump_json()


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        (TOKEN, 0o644, "is accessible by group or others (mode 0644); refusing to use it"),
        (TOKEN, 0o604, "is accessible by group or others (mode 0604)"),
        (TOKEN, 0o660, "is accessible by group or others (mode 0660)"),
        ("short\n", 0o600, "at least 16 printable characters"),
        ("two words-of-a-token-here\n", 0o600, "one word"),
        ("", 0o600, "at least 16"),
    ],
)
def test_bad_token_files(tmp_path: Path, text: str, mode: int, message: str) -> None:
    token_file(tmp_path, text, mode)
    with pytest.raises(ConfigError) as caught:
        parse("admin: {listen: 0.0.0.0:9090, token_file: admin-token}\n", tmp_path)
    [line] = caught.value.errors
    assert ":1: admin.token_file: " in line and message in line
    assert TOKEN not in line


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admin.token_file: file not found"):
        parse("admin: {listen: 0.0.0.0:9090, token_file: nowhere}\n", tmp_path)


def test_group_read_by_the_gateways_own_group_is_allowed(tmp_path: Path) -> None:
    # How Kubernetes mounts a Secret with fsGroup: root-owned, group = the pod's, 0440.
    path = token_file(tmp_path, mode=0o440)
    os.chown(path, -1, os.getegid())
    config = parse("admin: {listen: 0.0.0.0:9090, token_file: admin-token}\n", tmp_path)
    assert config.admin.token is not None


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("10.0.0.1") and not is_loopback("gateway.local")


# -- the admin server ---------------------------------------------------------------


class Admin:
    def __init__(self, port: int) -> None:
        self.port = port

    async def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        def request() -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            finally:
                conn.close()

        with trio.fail_after(30):
            return await trio.to_thread.run_sync(request)


async def start_admin(nursery: trio.Nursery, token: Any) -> Admin:
    registry = Registry()
    registry.set_routes([{"kind": "link", "prefix": "devices/", "connector": "iothub"}])
    readiness = Readiness(registry)
    addresses = await nursery.start(
        lambda task_status: serve_admin(("127.0.0.1", 0), registry, Metrics(process_metrics=False),
                                        readiness, api_token=lambda: token,
                                        task_status=task_status)  # fmt: skip
    )
    return Admin(addresses[0][1])


async def test_api_needs_the_token_and_health_metrics_stay_open() -> None:
    async with trio.open_nursery() as nursery:
        admin = await start_admin(nursery, TOKEN)
        status_code, headers, body = await admin.get("/api/routes")
        assert status_code == 401 and b"devices/" not in body
        assert headers["www-authenticate"].startswith("Bearer")
        assert (await admin.get("/api/routes", "wrong-token-of-the-same-size-xx"))[0] == 401
        assert (await admin.get("/api/routes", TOKEN[:-1]))[0] == 401
        assert (await admin.get("/api/connections", "Basic " + TOKEN))[0] == 401
        status_code, _, body = await admin.get("/api/routes", TOKEN)
        assert status_code == 200 and b"devices/" in body
        for path in ("/api/connections", "/api/links", "/api/connectors", "/api/listeners",
                     "/api/credentials"):  # fmt: skip
            assert (await admin.get(path))[0] == 401, path
            assert (await admin.get(path, TOKEN))[0] == 200, path
        assert (await admin.get("/api/nothing"))[0] == 401  # no probing for paths either
        assert (await admin.get("/healthz"))[0] == 200
        assert (await admin.get("/readyz"))[0] == 200
        status_code, _, body = await admin.get("/metrics")
        assert status_code == 200 and b"# HELP" in body
        nursery.cancel_scope.cancel()


async def test_no_token_configured_means_none_required() -> None:
    async with trio.open_nursery() as nursery:
        admin = await start_admin(nursery, None)
        assert (await admin.get("/api/routes"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_refusals_are_logged_once_per_source(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ops.admin")
    async with trio.open_nursery() as nursery:
        admin = await start_admin(nursery, TOKEN)
        for _ in range(5):
            assert (await admin.get("/api/connections", "nope-nope-nope-nope"))[0] == 401
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "/api/connections from 127.0.0.1: wrong bearer token (401)" in lines[0]
    assert "nope" not in caplog.text and TOKEN not in caplog.text


def test_refusal_lines_resume_with_a_count_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.ops.admin import _Refusals

    caplog.set_level(logging.WARNING, logger="gateway.ops.admin")
    refusals = _Refusals(interval=60.0)
    for now in (0.0, 1.0, 2.0, 59.0):
        refusals.refused("10.0.0.9", "/api/links", "no bearer token", now)
    refusals.refused("10.0.0.8", "/api/links", "no bearer token", 3.0)
    refusals.refused("10.0.0.9", "/api/links", "no bearer token", 61.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "from 10.0.0.9" in lines[0] and "more refused" not in lines[0]
    assert "from 10.0.0.8" in lines[1]
    assert "from 10.0.0.9" in lines[2] and "(3 more refused since the last line)" in lines[2]


# -- the daemon and `iot-gateway status` ------------------------------------------------


DAEMON_CONFIG = """
gateway: {id: gw-admin-token}
admin: {listen: "127.0.0.1:0", token_file: admin-token}
listeners:
  - {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}
connectors:
  - {name: iothub, protocol: amqp, host: 127.0.0.1, port: 1, allow_plaintext: true}
link_routes:
  - {prefix: "devices/", connector: iothub}
"""


async def test_daemon_and_status_use_the_configured_token(tmp_path: Path) -> None:
    token_file(tmp_path)
    (tmp_path / "gateway.yaml").write_text(DAEMON_CONFIG)
    config = load_config(tmp_path / "gateway.yaml")
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config)
        await nursery.start(gw.run)
        port = gw.admin_addresses[0][1]
        admin = Admin(port)
        assert (await admin.get("/api/routes"))[0] == 401
        assert (await admin.get("/api/routes", TOKEN))[0] == 200
        assert (await admin.get("/readyz"))[0] == 200
        # status -c: the admin address and the token both come from the file.
        (tmp_path / "gateway.yaml").write_text(
            DAEMON_CONFIG.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"', 1)
        )
        out = io.StringIO()
        argv = ["-c", str(tmp_path / "gateway.yaml"), "--routes"]
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=out))
        assert code == 0 and out.getvalue().splitlines()[0] == "Routes"
        out = io.StringIO()
        argv = ["-c", str(tmp_path / "gateway.yaml"), "--rate-window", "0"]
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=out))
        assert code == 0, out.getvalue()
        # --admin without a token: refused, and told why.
        argv = ["--admin", f"127.0.0.1:{port}", "--routes"]
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=io.StringIO()))
        assert code == 1
        argv = ["--admin", f"127.0.0.1:{port}", "--token-file", str(tmp_path / "admin-token"),
                "--routes"]  # fmt: skip
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=io.StringIO()))
        assert code == 0
        # A rotated token applies at the next reload (SIGHUP), without a restart.
        token_file(tmp_path, "rotated-token-0123456789abcdef\n")
        assert await gw.reload()
        assert (await admin.get("/api/routes", TOKEN))[0] == 401
        assert (await admin.get("/api/routes", "rotated-token-0123456789abcdef"))[0] == 200
        gw.request_stop()
