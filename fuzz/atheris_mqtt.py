"""Fuzz target for the MQTT codec: arbitrary bytes may only raise MQTTProtocolError.

Run by hand:

    pip install atheris
    python fuzz/atheris_mqtt.py [CORPUS_DIR] -atheris_runs=1000000

Without atheris installed it falls back to a plain random-bytes loop
(`python fuzz/atheris_mqtt.py --random 100000`), which finds less but needs nothing.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

try:
    import atheris
except ImportError:  # the fallback below needs nothing extra
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from gateway.mqtt import MQTT_3_1_1, MQTT_5, MQTTProtocolError, PacketReader, RelayState
else:
    from gateway.mqtt import MQTT_3_1_1, MQTT_5, MQTTProtocolError, PacketReader, RelayState

LEVELS = (None, MQTT_3_1_1, MQTT_5)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    # The first byte picks the session's protocol level and how the rest is split.
    level = LEVELS[data[0] % 3]
    chunk = 1 + (data[0] >> 2)
    body = data[1:]
    reader = PacketReader(1 << 16, protocol_level=level)
    state = RelayState()
    try:
        for i in range(0, len(body), chunk):
            reader.feed(body[i : i + chunk])
            while (packet := reader.next_packet()) is not None:
                repr(packet)
                getattr(packet, "properties", None)
                getattr(packet, "topic_alias", None)
                for check in (state.client_packet, state.server_packet):
                    try:
                        check(packet)
                    except MQTTProtocolError:
                        pass
    except MQTTProtocolError:
        pass


def random_loop(runs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for n in range(runs):
        size = rng.randrange(0, 512)
        test_one_input(bytes(rng.randrange(256) for _ in range(size)))
        if n and n % 10000 == 0:
            print(f"{n} inputs, no escapes", flush=True)
    print(f"{runs} random inputs: only MQTTProtocolError raised")


def main() -> None:
    if atheris is None or "--random" in sys.argv:
        runs = int(sys.argv[sys.argv.index("--random") + 1]) if "--random" in sys.argv else 100_000
        if atheris is None:
            print("atheris is not installed; running the random-bytes fallback", file=sys.stderr)
        random_loop(runs)
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
