"""Placeholders of the shipped examples left in a configuration.

The example files (``config/``, ``deploy/``, the README) name a hub
``myhub.azure-devices.net``, a proxy ``proxy.corp.example`` and a Device
Provisioning Service ID scope ``0ne000ABCD``. A configuration still holding
one was copied and not finished: at best the gateway dials a name that is not
the operator's, at worst someone else's hub of that name. ``iot-gateway
check`` warns about each; ``iot-gateway run`` refuses to start unless given
``--allow-placeholders`` (docs/operations.md, "Placeholders").
"""

from __future__ import annotations

from typing import Any

from gateway.config.base import Loc
from gateway.config.model import GatewayConfig, parse_host_entry
from gateway.config.proxy_url import parse_proxy_url

# host name -> what it stands for
PLACEHOLDER_HOSTS = {
    "myhub.azure-devices.net": "your IoT hub's host name",
    "proxy.corp.example": "your HTTP proxy",
}
PLACEHOLDER_SCOPES = {"0ne000ABCD": "your Device Provisioning Service ID scope"}


def _host_problem(host: str) -> str | None:
    meaning = PLACEHOLDER_HOSTS.get(host.strip().lower().rstrip("."))
    if meaning is None:
        return None
    return f"{host!r} is the examples' placeholder: put {meaning} here"


def _scope_problem(text: str) -> str | None:
    for scope, meaning in PLACEHOLDER_SCOPES.items():
        if scope.lower() in text.lower():
            return f"{scope!r} is the examples' placeholder ID scope: put {meaning} here"
    return None


def _proxy_problem(proxy: Any) -> str | None:
    url = getattr(proxy, "url", None)
    if url is None:
        return None
    try:
        host = parse_proxy_url(str(url))[0]
    except ValueError:
        return None
    return _host_problem(host)


def find_placeholders(config: GatewayConfig, data: Any) -> list[tuple[Loc, str]]:
    """Each placeholder left in ``config``, at the key holding it. ``data`` is the YAML
    as read: a connector that inherits the top-level proxy is not reported again."""
    found: list[tuple[Loc, str]] = []
    raw_connectors = data.get("connectors") if isinstance(data, dict) else None
    for i, connector in enumerate(config.connectors):
        if connector.hosts is not None:
            for j, entry in enumerate(connector.hosts):
                problem = _host_problem(parse_host_entry(entry)[0])
                if problem:
                    found.append((("connectors", i, "hosts", j), problem))
        elif connector.host is not None and (problem := _host_problem(connector.host)):
            found.append((("connectors", i, "host"), problem))
        raw = raw_connectors[i] if isinstance(raw_connectors, list) and i < len(raw_connectors) else {}
        if isinstance(raw, dict) and isinstance(raw.get("proxy"), dict):
            if problem := _proxy_problem(connector.proxy):
                found.append((("connectors", i, "proxy", "url"), problem))
    if problem := _proxy_problem(config.proxy):
        found.append((("proxy", "url"), problem))
    for i, route in enumerate(config.link_routes):
        if problem := _scope_problem(route.address):
            found.append((("link_routes", i, route.kind), problem))
    for i, mqtt_route in enumerate(config.mqtt_routes):
        # (A `hub:` match is not a place the gateway dials: emulators use such names.)
        if mqtt_route.username is not None and (problem := _scope_problem(mqtt_route.username)):
            found.append((("mqtt_routes", i, "username"), problem))
    return found
