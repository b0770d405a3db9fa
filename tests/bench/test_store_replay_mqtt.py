"""`python -m bench.store_replay_mqtt` runs (a tiny backlog): bench/RESULTS.md's MQTT
replay figures come from it."""

from __future__ import annotations

import re

from bench import store_replay_mqtt


def test_replay_smoke(capsys) -> None:
    assert store_replay_mqtt.main(["--messages", "200", "--devices", "2", "--quick"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"200 x 256 B, 2 devices, .* replayed in .* msg/s .*; 200 at hubsim", out)
