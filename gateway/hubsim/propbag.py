"""IoT Hub MQTT topic property bags: `k=v&k2=v2`, names and values percent-encoded."""

from __future__ import annotations

from urllib.parse import quote, unquote


def decode(bag: str) -> dict[str, str | None]:
    """`k` alone is a null value, `k=` an empty one; `$` may arrive as `%24`."""
    props: dict[str, str | None] = {}
    for part in bag.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        props[unquote(name)] = unquote(value) if sep else None
    return props


def encode(props: dict[str, object]) -> str:
    """Encode as the hub does (`$` sent as `%24`)."""
    parts = []
    for name, value in props.items():
        key = quote(name, safe="")
        parts.append(key if value is None else f"{key}={quote(str(value), safe='')}")
    return "&".join(parts)
