"""Device identities on shared upstream connections (design item 8).

Direction: near the bottom of the router; imports only `routes`.

A CBS put-token on a shared upstream connection authorises its audience for
the whole connection, so the router remembers, per device connection, which
audiences *that* device had accepted by the hub, and admits a
``devices/{id}/...`` attach only when one of them covers ``devices/{id}``
(``devices/{id}/modules/{mid}`` for module addresses).

Coverage follows the SAS scope rule: an audience covers an identity when its
resource path is a whole-segment prefix of the identity's path, so
``{host}/devices/d1`` covers ``devices/d1`` and ``devices/d1/modules/m`` but not
``devices/d10``. Paths are compared percent-decoded (addresses carry URL-encoded
ids, audiences do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from .routes import normalise_address, split_segments

IdentityPath = tuple[str, ...]


def identity_of_address(address: str) -> IdentityPath | None:
    """The identity a ``devices/...`` address acts for, or None for other addresses.

    ``devices/d1/messages/events`` -> ``("devices", "d1")``;
    ``/devices/d1/modules/m1/messages/events`` -> ``("devices", "d1", "modules", "m1")``.
    ``devices`` or ``devices/`` alone names no device and yields ``("devices",)``,
    which only a hub-wide audience covers.
    """
    segs = [unquote(s) for s in split_segments(normalise_address(address))]
    if not segs or segs[0] != "devices":
        return None
    if len(segs) < 2 or segs[1] == "":
        return ("devices",)
    if len(segs) >= 4 and segs[2] == "modules":
        return ("devices", segs[1], "modules", segs[3])
    return ("devices", segs[1])


def audience_path(audience: str) -> IdentityPath:
    """The resource path of a CBS audience / SAS ``sr`` (host dropped).

    ``myhub.azure-devices.net/devices/d1`` -> ``("devices", "d1")``; an
    audience with a scheme (``amqps://host/...``) is accepted too. A bare host
    yields ``()``, which covers everything on that hub.
    """
    text = audience
    lowered = text.lower()
    for scheme in ("amqps://", "amqp://", "https://", "http://"):
        if lowered.startswith(scheme):
            text = text[len(scheme):]
            break
    segs = [unquote(s) for s in text.split("/")]
    return tuple(s for s in segs[1:] if s != "") if segs else ()


def covers(authorised: IdentityPath, identity: IdentityPath) -> bool:
    return identity[: len(authorised)] == authorised


@dataclass(frozen=True, slots=True)
class PlainIdentity:
    """A SASL PLAIN user name of the IoT Hub form ``{id}[/modules/{mid}]@sas.{hub}``."""

    device_id: str
    module_id: str | None
    hub_name: str

    @property
    def path(self) -> IdentityPath:
        if self.module_id is None:
            return ("devices", self.device_id)
        return ("devices", self.device_id, "modules", self.module_id)


def parse_plain_username(username: str) -> PlainIdentity | None:
    """Parse ``dev1@sas.myhub`` / ``dev1/modules/m1@sas.myhub``; None for other forms
    (including ``{policy}@sas.root.{hub}``, which is not a device identity)."""
    who, sep, realm = username.rpartition("@")
    if not sep or not who or not realm.startswith("sas.") or realm.startswith("sas.root."):
        return None
    hub = realm[len("sas."):]
    if not hub:
        return None
    parts = who.split("/")
    if len(parts) == 1:
        return PlainIdentity(parts[0], None, hub)
    if len(parts) == 3 and parts[1] == "modules" and parts[0] and parts[2]:
        return PlainIdentity(parts[0], parts[2], hub)
    return None


def token_audience(token: str) -> str | None:
    """The decoded ``sr`` of a SAS token (the audience to put it for), or None."""
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        return None
    for field in token[len(prefix):].split("&"):
        key, sep, value = field.partition("=")
        if sep and key.strip() == "sr":
            return unquote(value.replace("+", " "))
    return None
