"""A readable summary of a validated config and its resolved route table (``check``)."""

from __future__ import annotations

from typing import Any

from gateway.config.model import AmqpConnector, AmqpListener, GatewayConfig, MqttListener
from gateway.config.proxy_url import redact_proxy_url


def route_table(config: GatewayConfig) -> list[dict[str, Any]]:
    """Every route with its connector resolved: plain dicts, no secrets."""
    rows: list[dict[str, Any]] = []
    for route in config.link_routes:
        connector = config.connector(route.connector)
        rows.append(
            {
                "kind": "link",
                "match": route.kind,
                "address": route.address,
                "direction": route.direction,
                "connector": connector.name,
                "target": connector.target,
                "tls": connector.tls_profile is not None,
            }
        )
    for mqtt_route in config.mqtt_routes:
        connector = config.connector(mqtt_route.connector)
        rows.append(
            {
                "kind": "mqtt",
                **(
                    {"username": mqtt_route.username}
                    if mqtt_route.username is not None
                    else {"hub": mqtt_route.hub}
                ),
                "connector": connector.name,
                "target": connector.target,
                "tls": connector.tls_profile is not None,
                "allowed_topics": mqtt_route.allowed_topics,
            }
        )
    return rows


def format_duration(seconds: float) -> str:
    """``3600`` -> ``1h``, ``90`` -> ``1m30s``, ``0.5`` -> ``500ms``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    text = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            text += f"{count}{unit}"
    return text


def table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned, indented lines (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_summary(config: GatewayConfig) -> str:
    out: list[str] = [f"gateway id: {config.gateway.id}"]
    admin = f"http://{config.admin.listen}" if config.admin.enabled else "disabled"
    out.append(f"admin: {admin}")
    out.append(
        f"log: {config.log.level}, {config.log.format}"
        + (f", trace {','.join(config.log.trace)}" if config.log.trace else "")
    )

    out.append(f"listeners ({len(config.listeners)}):")
    if config.listeners:
        rows = [["NAME", "PROTOCOL", "BIND", "TLS", "DETAILS"]]
        for listener in config.listeners:
            if isinstance(listener, AmqpListener):
                details = "sasl " + (",".join(listener.sasl) or "none")
            elif isinstance(listener, MqttListener):
                details = f"max packet {listener.max_packet_size}"
            if listener.allowed_networks:
                details += ", from " + ",".join(str(n) for n in listener.allowed_networks)
            rows.append(
                [
                    listener.name,
                    listener.protocol,
                    str(listener.bind),
                    listener.tls_profile or "plaintext",
                    details,
                ]
            )
        out.extend(table(rows))

    out.append(f"connectors ({len(config.connectors)}):")
    if config.connectors:
        rows = [["NAME", "PROTOCOL", "TARGET", "TLS", "DETAILS"]]
        for connector in config.connectors:
            if isinstance(connector, AmqpConnector) and connector.sasl == "relay":
                details = (
                    f"sasl relay: one TLS connection per device, its own login relayed, "
                    f"hostname {connector.hostname}"
                )
            elif isinstance(connector, AmqpConnector):
                details = (
                    f"sasl {connector.sasl}, hostname {connector.hostname}, pool "
                    f"{connector.pool.max_connections}x"
                    f"{connector.pool.max_devices_per_connection}"
                    + (", $cbs proxied" if connector.cbs_proxied else ", $cbs routed")
                    + (", on demand" if connector.on_demand else "")
                )
            else:
                details = "one TLS connection per device"
            if connector.websockets:
                details += ", over WebSockets"
            if connector.proxy == "env":
                details += ", proxy from HTTPS_PROXY"
            elif connector.proxy is not None and connector.proxy != "none":
                details += f", via proxy {redact_proxy_url(connector.proxy.url)}"
            tls = connector.tls_profile or "PLAINTEXT"
            rows.append([connector.name, connector.protocol, connector.target, tls, details])
        out.extend(table(rows))

    link_rows = [r for r in route_table(config) if r["kind"] == "link"]
    out.append(f"link routes ({len(link_rows)}):")
    if link_rows:
        rows = [["MATCH", "ADDRESS", "DIRECTION", "CONNECTOR", "TARGET"]]
        for r in link_rows:
            rows.append([r["match"], r["address"], r["direction"], r["connector"], r["target"]])
        out.extend(table(rows))

    mqtt_rows = [r for r in route_table(config) if r["kind"] == "mqtt"]
    out.append(f"mqtt routes ({len(mqtt_rows)}):")
    if mqtt_rows:
        rows = [["MATCH", "CONNECTOR", "TARGET", "TOPICS"]]
        for r in mqtt_rows:
            topics = "all" if r["allowed_topics"] is None else " ".join(r["allowed_topics"])
            match = f"username {r['username']}" if "username" in r else f"hub {r['hub']}"
            rows.append([match, r["connector"], r["target"], topics])
        out.extend(table(rows))
    if config.credentials is not None:
        creds = config.credentials
        out.append(
            f"credentials: {len(creds.devices)} devices, {len(creds.groups)} groups, "
            f"token ttl {format_duration(creds.token_ttl)}, renew at {creds.renew_at:.0%}"
            " (iot-gateway credentials list -c FILE)"
        )
    if config.store_and_forward is not None:
        saf = config.store_and_forward
        opted = 0
        if config.credentials is not None:
            opted = sum(1 for e in (*config.credentials.devices, *config.credentials.groups)
                        if e.store_and_forward)  # fmt: skip
        out.append(
            f"store and forward: {saf.path}, max {_size(saf.max_bytes)} "
            f"({saf.device_share:.0%} per device), max age {format_duration(saf.max_age)}, "
            f"replay {saf.replay_rate:g}/s per connector; {opted} credentials entries opted in"
        )
    return "\n".join(out) + "\n"


def _size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
