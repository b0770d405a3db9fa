"""The bench's generated gateway configuration is one the gateway accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import main
from bench.gateway_proc import AmqpRoute, MqttRoute, gateway_config
from gateway.config import parse_config_text


@pytest.mark.parametrize(("option", "seconds"), [(None, 0.001), ("0", 0.0), ("2ms", 0.002)])
def test_ack_batching_reaches_every_connector(
    tmp_path: Path, option: str | None, seconds: float
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("")  # only its existence is checked when parsing
    text, ports = gateway_config(
        ca_file, amqp=AmqpRoute(5671), mqtt=MqttRoute(8883), ack_batching=option
    )
    config = parse_config_text(text, "bench.yaml")
    assert [c.ack_batching for c in config.connectors] == [seconds, seconds]
    assert sorted(ports) == ["amqp", "mqtt"]


def test_bad_ack_batching_is_refused_before_anything_starts(capsys) -> None:
    assert main(["--ack-batching", "soon"]) == 2
    assert "--ack-batching: invalid duration 'soon'" in capsys.readouterr().err
