"""IoT Hub's MQTT topic rules: which publishes and subscriptions a device may make."""

from __future__ import annotations

from dataclasses import dataclass

import gateway.hubsim.propbag as propbag

SUBSCRIPTION_LIMIT = 5


def device_prefix(identity: str) -> str:
    dev, _, mod = identity.partition("/")
    return f"devices/{dev}" + (f"/modules/{mod}" if mod else "")


@dataclass(frozen=True)
class Publish:
    kind: str  # d2c | twin_get | twin_patch | method_res
    bag: str = ""  # d2c: the property bag
    rid: str | None = None
    status: int | None = None


def _query(topic: str, head: str) -> dict[str, str | None] | None:
    """`{head}?k=v&...` (the `?` may follow a `/`) -> decoded query, else None."""
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :]
    if not rest.startswith("?"):
        return None
    return propbag.decode(rest[1:])


def classify_publish(topic: str, identity: str) -> Publish | None:
    events = f"{device_prefix(identity)}/messages/events"
    if topic == events:
        return Publish("d2c")
    if topic.startswith(events + "/"):
        return Publish("d2c", bag=topic[len(events) + 1 :])
    query = _query(topic, "$iothub/twin/GET/")
    if query is not None:
        return Publish("twin_get", rid=query.get("$rid"))
    query = _query(topic, "$iothub/twin/PATCH/properties/reported/")
    if query is not None:
        return Publish("twin_patch", rid=query.get("$rid"))
    if topic.startswith("$iothub/methods/res/"):
        status, sep, rest = topic[len("$iothub/methods/res/") :].partition("/")
        if sep and status.lstrip("-").isdigit() and rest.startswith("?"):
            return Publish("method_res", rid=propbag.decode(rest[1:]).get("$rid"), status=int(status))
    return None


def classify_subscription(topic_filter: str, identity: str) -> str | None:
    allowed = {
        f"{device_prefix(identity)}/messages/devicebound/#": "c2d",
        "$iothub/twin/res/#": "twin_res",
        "$iothub/twin/PATCH/properties/desired/#": "twin_desired",
        "$iothub/methods/POST/#": "methods",
    }
    return allowed.get(topic_filter)


def username_ok(username: str, hub_host: str, identity: str) -> bool:
    """`{host}/{deviceId}/?api-version=...` or `{host}/{deviceId}/{moduleId}/?...`."""
    dev, _, mod = identity.partition("/")
    path = username.partition("?")[0]
    host, sep, rest = path.partition("/")
    tail = f"{dev}/" + (f"{mod}/" if mod else "")
    return bool(sep) and host.lower() == hub_host.lower() and rest in (tail, tail[:-1])
