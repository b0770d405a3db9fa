from __future__ import annotations

from gw_helpers import (
    HUB_HOST,
    Device,
    data_message,
    gateway_config,
    in_thread,
    running_gateway,
)


async def test_cbs_then_d2c(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def device_run():
            with Device(gw.url) as dev:
                reply = dev.authenticate("dev1", keys["dev1"])
                assert reply.properties["status-code"] == 200
                assert reply.correlation_id == 0
                sender = dev.conn.create_sender(f"amqps://{HUB_HOST}/devices/dev1/messages/events")
                msgs = [data_message(b"m%d" % i, id=f"id-{i}") for i in range(10)]
                for m in msgs:
                    sender.send(m)
                return [m.encode() for m in msgs]

        sent = await in_thread(device_run)
    got = [r.raw for r in hub.recorder.d2c]
    assert got == sent
