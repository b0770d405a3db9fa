from __future__ import annotations

import json

from gateway.ops.health import Readiness
from gateway.ops.registry import ConnectionInfo, LinkInfo, Registry


def _device(cid: str = "c1") -> ConnectionInfo:
    return ConnectionInfo(
        id=cid, kind="device", endpoint="amqp", protocol="amqp", remote="10.0.0.5:40000"
    )


def test_connections_and_links_snapshot_is_plain_json() -> None:
    reg = Registry()
    conn = reg.add_connection(_device())
    conn.device_ids.add("dev1")
    conn.count_in(100)
    conn.count_in(50)
    conn.count_out(7)
    up = reg.add_connection(
        ConnectionInfo(
            id="u1", kind="upstream", endpoint="iothub", protocol="amqp", remote="hub:5671"
        )
    )
    reg.add_link(LinkInfo(id="l1", connection_id="c1", name="sender-link", role="sender",
                          address="devices/dev1/messages/events", route="devices/", direction="in",
                          upstream_link_id="l2"))  # fmt: skip
    reg.add_link(LinkInfo(id="l2", connection_id="u1", name="sender-link-1", role="sender",
                          address="devices/dev1/messages/events", route="devices/", direction="in"))  # fmt: skip
    snap = json.loads(json.dumps(reg.snapshot()))
    c1 = next(c for c in snap["connections"] if c["id"] == "c1")
    assert c1["device_ids"] == ["dev1"]
    assert (c1["messages_in"], c1["bytes_in"], c1["messages_out"], c1["bytes_out"]) == (
        2,
        150,
        1,
        7,
    )
    assert c1["links"] == 1
    assert {lk["id"] for lk in snap["links"]} == {"l1", "l2"}
    assert snap["connectors"][0]["name"] == "iothub" and snap["connectors"][0]["connections"] == 1
    assert reg.counts() == {"device_connections": 1, "upstream_connections": 1, "links": 2}
    assert up.state == "open"


def test_removing_a_connection_removes_its_links() -> None:
    reg = Registry()
    reg.add_connection(_device())
    reg.add_link(LinkInfo(id="l1", connection_id="c1", name="a", role="sender", address="x"))
    reg.add_link(LinkInfo(id="l2", connection_id="c1", name="b", role="receiver", address="y"))
    assert reg.remove_link("l2") is not None
    assert reg.remove_link("l2") is None
    reg.remove_connection("c1")
    assert reg.links() == [] and reg.connections() == []
    assert reg.remove_connection("c1") is None
    assert reg._links_by_connection == {}  # nothing left behind


def test_upstream_connection_count_follows_connections() -> None:
    reg = Registry()
    for i in range(3):
        reg.add_connection(
            ConnectionInfo(
                id=f"u{i}", kind="upstream", endpoint="hub", protocol="amqp", remote="h:1"
            )
        )
    reg.remove_connection("u0")
    assert reg.connectors()[0]["connections"] == 2


def test_connector_listener_and_routes() -> None:
    reg = Registry()
    reg.register_connector("iothub", protocol="amqp", target="hub:5671", on_demand=False)
    reg.set_connector_state("iothub", "backoff", "connection refused; retry in 2s")
    assert reg.connector_state("iothub") == "backoff"
    assert reg.connector_state("nope") is None
    reg.set_listener_bound("amqp", [("127.0.0.1", 5672), ("::1", 5672)])
    assert reg.listeners()[0]["addresses"] == ["127.0.0.1:5672", "[::1]:5672"]
    assert reg.listener_bound("amqp")
    reg.set_listener_unbound("amqp")
    assert not reg.listener_bound("amqp")
    routes = [{"prefix": "$cbs", "direction": "both", "connector": "iothub"}]
    reg.set_routes(routes)
    routes[0]["prefix"] = "changed"  # the registry keeps its own copy
    assert reg.routes()[0]["prefix"] == "$cbs"


def test_snapshots_never_carry_a_signature() -> None:
    reg = Registry()
    reg.register_connector("iothub")
    reg.set_connector_state(
        "iothub", "down", "put-token failed for SharedAccessSignature sr=a&sig=TOPSECRET&se=1"
    )
    reg.add_connection(_device())
    reg.add_link(
        LinkInfo(
            id="l1", connection_id="c1", name="x", role="sender", address="weird?sig=TOPSECRET"
        )
    )
    assert "TOPSECRET" not in json.dumps(reg.snapshot())


def test_readiness_listeners_connectors_and_drain() -> None:
    reg = Registry()
    ready = Readiness(reg, listeners=["amqp", "mqtt"], required_connectors=["iothub"])
    ok, reason = ready()
    assert not ok and "amqp" in reason and "mqtt" in reason
    reg.set_listener_bound("amqp", [("0.0.0.0", 5672)])
    reg.set_listener_bound("mqtt", [("0.0.0.0", 1883)])
    ok, reason = ready()
    assert not ok and reason == "connector not connected: iothub (unknown)"
    reg.set_connector_state("iothub", "connected")
    assert ready() == (True, "ready")
    reg.set_connector_state("iothub", "backoff", "timeout")
    assert ready() == (False, "connector not connected: iothub (backoff)")
    reg.set_connector_state("iothub", "connected")
    ready.draining = True
    assert ready() == (False, "draining")


class _Obj:
    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


def test_readiness_from_config_requires_only_non_on_demand_connectors() -> None:
    config = _Obj(
        listeners=[_Obj(name="amqp"), _Obj(name="mqtt")],
        connectors=[
            _Obj(name="ondemand", protocol="amqp", on_demand=True),
            _Obj(name="always", protocol="amqp", on_demand=False),
            _Obj(name="mqtt-hub", protocol="mqtt"),  # MQTT connectors have no on_demand
        ],
    )
    ready = Readiness.from_config(Registry(), config)
    assert ready.listeners == ["amqp", "mqtt"]
    assert ready.required_connectors == ["always"]
