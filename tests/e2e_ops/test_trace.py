"""``run --trace amqp,mqtt``: every frame and packet logged, no token, password or body."""

from __future__ import annotations

import signal
from urllib.parse import quote_plus

import trio

from tests.e2e_amqp.gw_helpers import Device, data_message, device_uri, in_thread, sas_token
from tests.mqtt.paho_device import PahoDevice
from tests.mqtt.test_relay_hubsim import sas_token as mqtt_sas_token
from tests.mqtt.test_relay_hubsim import username

from .helpers import EVENTS, MQTT_EVENTS, GatewayProcess, gateway_yaml

AMQP_BODY = b"amqp-body-must-not-be-traced"
MQTT_BODY = b"mqtt-payload-must-not-be-traced"


def signature_of(token: str) -> str:
    return token.split("sig=", 1)[1].split("&", 1)[0]


async def test_trace_shows_frames_and_packets_but_no_secret(hub, keys, tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(hub, admin=False))
    gw = GatewayProcess(path, "--trace", "amqp,mqtt")
    amqp_token = sas_token(device_uri("dev1"), keys["dev1"])
    mqtt_token = mqtt_sas_token("dev2", keys["dev2"])
    try:
        await gw.started()

        def amqp_device() -> None:
            dev = Device(f"amqp://127.0.0.1:{gw.ports['amqp']}")
            try:
                reply = dev.put_token(device_uri("dev1"), amqp_token)  # CBS put-token
                assert reply.properties["status-code"] == 200
                dev.conn.create_sender(EVENTS % "dev1").send(data_message(AMQP_BODY))
            finally:
                dev.close()

        await in_thread(amqp_device)
        mqtt = PahoDevice("dev2", username=username("dev2"), password=mqtt_token)
        try:
            assert await mqtt.connect(gw.ports["mqtt"]) == 0  # SAS token as the password
            await mqtt.publish(MQTT_EVENTS.format("dev2"), MQTT_BODY, qos=1)
            await mqtt.disconnect()
        finally:
            await trio.to_thread.run_sync(mqtt.close)
        await trio.to_thread.run_sync(hub.recorder.wait_for, lambda: len(hub.recorder.d2c) == 2, 10)
        await gw.await_line(r"mqtt \S+ .*closed: device_disconnect")
        gw.signal(signal.SIGTERM)
        assert await gw.wait_exit() == 0
    finally:
        gw.close()
    output = gw.output
    # The trace is there: AMQP performatives both ways and the MQTT packets.
    for marker in ("@sasl-init", "@attach", "@transfer", "@disposition", "CONNECT", "PUBLISH",
                   "PUBACK", "password=<redacted>", "payload=<"):  # fmt: skip
        assert marker in output, marker
    # Nothing secret and no content.
    for secret in (amqp_token, mqtt_token, signature_of(amqp_token), signature_of(mqtt_token),
                   quote_plus(signature_of(amqp_token)), keys["dev1"], keys["dev2"]):  # fmt: skip
        assert secret not in output
    assert "SharedAccessSignature sr" not in output.replace("sig=<redacted>", "")
    assert AMQP_BODY.decode() not in output and MQTT_BODY.decode() not in output
