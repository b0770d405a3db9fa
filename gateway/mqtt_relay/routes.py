"""Which route, and so which connector, a device's CONNECT goes to (pure).

`username` routes first, in configuration order (a glob over the whole CONNECT
user name). Then the hub routes: the hub host is the user name up to the first
`/` (`{hub-host}/{device-id}/?api-version=...`); an exact `hub` match (case
insensitive) wins over `hub: "*"`. A provisioning user name never takes a hub
route.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from gateway.auth.dps import registration_of

__all__ = ["find_connector", "hub_host_from_username", "select_mqtt_route", "select_route"]


def hub_host_from_username(username: str | None) -> str:
    """`{hub-host}/{device-id}/?api-version=...` -> `{hub-host}` ("" without a user name)."""
    return (username or "").split("/", 1)[0]


def select_route(routes: Iterable[Any], hub_host: str) -> Any | None:
    """The exact hub match (case-insensitive), else the `*` route, else None."""
    routes = list(routes)
    wanted = hub_host.lower()
    for route in routes:
        if route.hub != "*" and route.hub.lower() == wanted:
            return route
    for route in routes:
        if route.hub == "*":
            return route
    return None


def select_mqtt_route(routes: Iterable[Any], username: str | None) -> Any | None:
    """The route for a CONNECT user name.

    `username` routes first, in configuration order (glob over the whole user
    name); then the hub routes by the user name's host (`select_route`). A
    provisioning user name (`{idScope}/registrations/{regId}/...`) never falls
    through to a hub route: its first segment is a scope, not a hub.
    """
    routes = list(routes)
    text = username or ""
    for route in routes:
        pattern = getattr(route, "username", None)
        if pattern is not None and fnmatch.fnmatchcase(text, pattern):
            return route
    if registration_of(username) is not None:
        return None
    hub_routes = [r for r in routes if getattr(r, "username", None) is None]
    return select_route(hub_routes, hub_host_from_username(username))


def find_connector(config: Any, name: str) -> Any:
    """The connector a route names (the configuration validated that it exists)."""
    for connector in config.connectors:
        if connector.name == name:
            return connector
    raise LookupError(f"no connector named {name!r}")
