"""The iot-gateway command line, in-process (main([...])) and as `python -m gateway`."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import __version__, cli
from gateway.cli import main
from tests.waiting import FAILSAFE

EXAMPLE_ROUTES = {
    "iothub-amqp.yaml": [
        r"prefix\s+\$cbs\s+both\s+iothub\s+myhub\.azure-devices\.net:5671",
        r"prefix\s+devices/\s+both\s+iothub\s+myhub\.azure-devices\.net:5671",
    ],
    "iothub-mqtt.yaml": [r"\*\s+iothub-mqtt\s+myhub\.azure-devices\.net:8883"],
    "iothub-both.yaml": [
        r"prefix\s+\$cbs\s+both\s+iothub\s+myhub\.azure-devices\.net:5671",
        r"prefix\s+devices/\s+both\s+iothub\s+myhub\.azure-devices\.net:5671",
        r"\*\s+iothub-mqtt\s+myhub\.azure-devices\.net:8883",
    ],
}

# The four bad configs: (file, line, key path).
BAD_CONFIGS = [
    ("bad-unknown-connector.yaml", 13, "link_routes[1].connector", "no connector named 'iothub2'"),
    ("bad-duration.yaml", 8, "listeners[0].idle_timeout", "invalid duration '30 seconds'"),
    ("bad-missing-ca.yaml", 4, "tls_profiles.azure.ca_file", "file not found: "),
    ("bad-yaml-syntax.yaml", 3, "yaml", "expected ',' or ']'"),
]

SAS_ARGS = [
    "sas",
    "--host",
    "myhub.azure-devices.net",
    "--device-id",
    "dev1",
    "--key",
    "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    "--expiry",
    "1700000000",
]
SAS_TOKEN = (
    "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1"
    "&sig=wosmA3uJK9T0mdB5CIYn%2BsAVA2ODflnucuvNO5S6mbM%3D&se=1700000000"
)


@pytest.fixture(autouse=True)
def _in_repo_root(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Paths in expected messages are relative to the checkout, as an operator would type them.
    monkeypatch.chdir(repo_root)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- check -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLE_ROUTES))
def test_check_examples(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out, err = run_cli(capsys, "check", "-c", f"config/{name}")
    assert code == 0
    # Only the warnings about the examples' placeholders (the hub name, the ID scope).
    assert err and all(": warning: " in line and "placeholder" in line for line in err.splitlines())
    assert out.startswith(f"config/{name}: OK\n")
    for route in EXAMPLE_ROUTES[name]:
        assert re.search(route, out), (route, out)


@pytest.mark.parametrize(("name", "line", "key", "message"), BAD_CONFIGS)
def test_check_bad_config(
    capsys: pytest.CaptureFixture[str], name: str, line: int, key: str, message: str
) -> None:
    code, out, err = run_cli(capsys, "check", "-c", f"tests/data/{name}")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tests/data/{name}:{line}: {key}: {message}")


def test_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "check", "-c", str(tmp_path / "none.yaml"))
    assert code == 2 and "cannot read config file" in err


# --- run ---------------------------------------------------------------------------------------


def test_run_bad_config_exits_2_before_starting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.daemon

    def must_not_start(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("daemon started with a bad config")

    monkeypatch.setattr(gateway.daemon, "run", must_not_start)
    code, out, err = run_cli(capsys, "run", "-c", "tests/data/bad-unknown-connector.yaml")
    assert code == 2 and out == ""
    assert err.startswith("tests/data/bad-unknown-connector.yaml:13: link_routes[1].connector: ")


def test_run_passes_config_trace_and_log_level(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_root_logger: None,
) -> None:
    import gateway.daemon

    calls: list[tuple[Any, tuple[str, ...]]] = []

    def fake_run(config: Any, *, trace: tuple[str, ...] = ()) -> int:
        calls.append((config, trace))
        return 0

    monkeypatch.setattr(gateway.daemon, "run", fake_run)
    # The example's placeholder hub is allowed explicitly (see tests/test_config_report.py).
    example = ["run", "-c", "config/iothub-amqp.yaml", "--allow-placeholders"]
    assert main([*example, "--trace", "mqtt,amqp,mqtt"]) == 0
    assert calls[-1][0].connectors[0].name == "iothub"
    assert calls[-1][1] == ("mqtt", "amqp")
    assert logging.getLogger().level == logging.INFO  # log.level from the file

    assert main([*example, "--log-level", "debug"]) == 0
    assert calls[-1][1] == ()  # log.trace from the file
    assert logging.getLogger().level == logging.DEBUG

    code, _, err = run_cli(capsys, *example, "--trace", "http")
    assert code == 2 and "unknown protocol 'http'" in err


def test_run_runtime_error_exits_1(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_root_logger: None,
) -> None:
    import gateway.daemon

    def broken(config: Any, *, trace: tuple[str, ...] = ()) -> int:
        raise OSError("address in use")

    monkeypatch.setattr(gateway.daemon, "run", broken)
    assert main(["run", "-c", "config/iothub-amqp.yaml", "--allow-placeholders"]) == 1
    assert "address in use" in capsys.readouterr().err


# --- sas, version, usage -----------------------------------------------------------------------


def test_sas_vector(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, *SAS_ARGS)
    assert code == 0
    assert out.splitlines()[-1] == SAS_TOKEN


def test_sas_module_policy_and_ttl(capsys: pytest.CaptureFixture[str]) -> None:
    args = SAS_ARGS[:-2] + ["--ttl", "1h", "--module-id", "mod1", "--policy", "device"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    token = out.splitlines()[-1]
    assert "sr=myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1&" in token
    assert token.endswith("&skn=device")
    expiry = int(re.search(r"&se=(\d+)", token).group(1))  # type: ignore[union-attr]
    import time

    assert abs(expiry - (time.time() + 3600)) < 60


def test_sas_key_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    args = list(SAS_ARGS)
    args[args.index("--key") + 1] = "-"
    monkeypatch.setattr(sys, "stdin", io.StringIO("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n"))
    code, out, _ = run_cli(capsys, *args)
    assert (code, out.splitlines()[-1]) == (0, SAS_TOKEN)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (SAS_ARGS[:-2], "one of the arguments --ttl --expiry is required"),
        (SAS_ARGS + ["--ttl", "1h"], "not allowed with argument"),
        (SAS_ARGS[:-2] + ["--ttl", "soon"], "invalid duration"),
        (SAS_ARGS[:-2] + ["--ttl", "0s"], "greater than 0"),
        (["sas", "--host", "h", "--device-id", "d", "--key", "***", "--expiry", "1"], "base64"),
    ],
)
def test_sas_usage_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "" and message in err


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "version") == (0, f"iot-gateway {__version__}\n", "")
    code, out, _ = run_cli(capsys, "--version")
    assert (code, out) == (0, f"iot-gateway {__version__}\n")
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("run", "check", "sas", "version", "hubsim", "demo", "status"):
        assert command in out
    assert (
        run_cli(
            capsys,
        )[0]
        == 2
    )
    assert run_cli(capsys, "frobnicate")[0] == 2
    assert run_cli(capsys, "check")[0] == 2  # -c is required


def test_delegated_subcommands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fake_status_cmd.py").write_text(
        "def main(argv):\n    print('args', argv)\n    return 3\n"
    )
    (tmp_path / "fake_needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.DELEGATED, "status", ("fake_status_cmd", "status"))
    monkeypatch.setitem(cli.DELEGATED, "demo", ("gateway.no_such_module", "demo"))
    monkeypatch.setitem(cli.DELEGATED, "hubsim", ("fake_needs_dep", "hubsim"))

    assert run_cli(capsys, "status", "--admin", "http://127.0.0.1:1", "-v") == (
        3,
        "args ['--admin', 'http://127.0.0.1:1', '-v']\n",
        "",
    )
    code, _, err = run_cli(capsys, "demo", "--keep-running")
    assert code == 1 and "not available" in err
    code, _, err = run_cli(capsys, "hubsim")
    assert code == 1 and "no_such_dependency_xyz" in err


# --- as a separate process ---------------------------------------------------------------------


def _subprocess_env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    return env


def test_python_m_gateway(repo_root: Path) -> None:
    env = _subprocess_env(repo_root)
    check = [sys.executable, "-m", "gateway", "check", "-c", "config/iothub-amqp.yaml"]
    done = subprocess.run(check, cwd=repo_root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "$cbs" in done.stdout and "devices/" in done.stdout
    bad = [sys.executable, "-m", "gateway", "check", "-c", "tests/data/bad-duration.yaml"]
    done = subprocess.run(bad, cwd=repo_root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tests/data/bad-duration.yaml:8: listeners[0].idle_timeout: invalid duration "
        "'30 seconds': use a number with a unit, e.g. 500ms, 30s, 2m, 1h"
    ]
    sas = [sys.executable, "-m", "gateway", *SAS_ARGS]
    done = subprocess.run(sas, cwd=repo_root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == SAS_TOKEN


async def test_run_stops_on_sigterm(repo_root: Path, write_config: Callable[..., Path]) -> None:
    # Loopback and ephemeral ports only, so this holds for the full daemon too.
    config = write_config(
        """
        gateway: {id: cli-test}
        admin: {listen: "127.0.0.1:0"}
        log: {format: json}
        listeners:
          - {name: cli-test-amqp, protocol: amqp, bind: "127.0.0.1:0"}
        connectors:
          - {name: cli-test-hub, protocol: amqp, host: 127.0.0.1, port: 1, allow_plaintext: true}
        link_routes:
          - {prefix: "$cbs", connector: cli-test-hub}
        """
    )
    command = [sys.executable, "-m", "gateway", "run", "-c", str(config)]
    process = await trio.lowlevel.open_process(
        command,
        cwd=repo_root,
        env=_subprocess_env(repo_root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    output = b""
    try:
        assert process.stderr is not None
        with trio.fail_after(FAILSAFE):
            while b"cli-test-amqp" not in output:
                chunk = await process.stderr.receive_some()
                assert chunk, f"gateway exited early: {output.decode(errors='replace')}"
                output += chunk
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(FAILSAFE):
            code = await process.wait()
        assert code == 0, output.decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
