"""Import a Qpid Dispatch Router configuration (``qdrouterd.conf``) as gateway YAML.

Pure: text in, text out. :func:`parse` reads either of qdrouterd's two file
formats into :class:`Entity` records; :func:`convert` maps them onto the
gateway's configuration and renders YAML with a ``# not carried over:``
comment for every entity and attribute it could not carry, saying why.

The two formats:

- the native one: ``entity {`` on a line, ``key: value`` lines (the value
  runs to the end of the line; ``#`` starts a comment, except in ``pattern``,
  ``bindingKey`` and ``hostname``, whose value is the first word), ``}`` on
  a line; nested maps (``openProperties: {``, a vhost's ``groups: {``) are
  kept as raw text;
- JSON: ``[["listener", {"host": "0.0.0.0", ...}], ...]`` (a ``.json`` file,
  or text starting with ``[``), where lines starting with ``#`` are comments.

Attribute names are matched as qdrouterd matches them: dashed and camelCase
forms are the same (``sasl-mechanisms`` = ``saslMechanisms``), case aside,
and the names older releases used (``addr``, ``dir``, ``certDb``, ``keyFile``,
``routerId``, ...) are read as their successors. Entity types likewise
(``link-route``, ``router.config.linkRoute``; 0.4-0.6's ``linkRoutePattern``
and ``container``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.config.base import NAME_RE

__all__ = ["Entity", "ImportResult", "QdrouterdError", "convert", "import_text", "parse"]


class QdrouterdError(ValueError):
    """The file is not a readable qdrouterd configuration: ``file:line: message``."""

    def __init__(self, filename: str, line: int | None, message: str) -> None:
        self.filename = filename
        self.line = line
        self.message = message
        where = f"{filename}:{line}" if line is not None else filename
        super().__init__(f"{where}: {message}")


@dataclass
class Attr:
    key: str  # as written in the file
    value: Any
    line: int | None


@dataclass
class Entity:
    type: str  # canonical: listener, connector, sslProfile, linkRoute, ...
    written: str  # as written in the file
    line: int | None
    attrs: dict[str, Attr] = field(default_factory=dict)  # canonical name -> attribute

    def get(self, name: str, default: Any = None) -> Any:
        attr = self.attrs.get(name)
        return default if attr is None else attr.value


# -- names ------------------------------------------------------------------------------------

_SEPARATORS = re.compile(r"[ _.\-]+")


def camelcase(text: str) -> str:
    """qdrouterd's rule: words separated by ``-``, ``_``, ``.`` or space -> camelCase."""
    words = [w for w in _SEPARATORS.split(text) if w]
    if not words:
        return text
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


# Entity types by lower-cased camelCase name (prefixes stripped first).
_ENTITY_TYPES = {
    name.lower(): name
    for name in (
        "router", "container", "listener", "connector", "sslProfile", "linkRoute",
        "linkRoutePattern", "autoLink", "address", "fixedAddress", "waypoint", "exchange",
        "binding", "log", "policy", "vhost", "vhostUserGroupSettings", "policyRuleset",
        "authServicePlugin", "console", "tcpListener", "tcpConnector", "httpListener",
        "httpConnector", "management",
    )
}  # fmt: skip

# Attribute names by lower-cased camelCase name; older names map to their successors.
_CANONICAL_ATTRS = {
    name.lower(): name
    for name in (
        "name", "identity", "id", "mode", "host", "port", "role", "cost", "sslProfile",
        "saslMechanisms", "authenticatePeer", "saslPlugin", "requireEncryption", "requireSsl",
        "trustedCertsFile", "maxFrameSize", "maxSessions", "maxSessionFrames",
        "idleTimeoutSeconds", "initialHandshakeTimeoutSeconds", "stripAnnotations",
        "linkCapacity", "multiTenant", "failoverUrls", "healthz", "metrics", "websockets",
        "http", "httpRootDir", "messageLoggingComponents", "policyVhost", "openProperties",
        "socketAddressFamily", "allowRedirect", "verifyHostname", "saslUsername",
        "saslPassword", "caCertFile", "certFile", "privateKeyFile", "password", "passwordFile",
        "ciphers", "protocols", "uidFormat", "uidNameMappingFile", "prefix", "pattern",
        "direction", "connection", "containerId", "addExternalPrefix", "delExternalPrefix",
        "distribution", "address", "phase", "externalAddress", "connector", "module", "enable",
        "output", "workerThreads", "saslConfigDir", "saslConfigName", "containerName",
        "area", "waypoint", "sslProfileName",
    )
}  # fmt: skip
_OLD_NAMES = {
    "addr": "host",
    "dir": "direction",
    "certdb": "caCertFile",
    "keyfile": "privateKeyFile",
    "trustedcerts": "trustedCertsFile",
    "routerid": "id",
    "protocolfamily": "socketAddressFamily",
    "saslconfigpath": "saslConfigDir",
    "failoverlist": "failoverUrls",
    "externaladdr": "externalAddress",
    "logmessage": "messageLoggingComponents",
    "httproot": "httpRootDir",
    "requirepeerauth": "authenticatePeer",
}


def canonical_type(written: str) -> str:
    name = written
    for prefix in ("org.apache.qpid.dispatch.", "router.config."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = camelcase(name)
    return _ENTITY_TYPES.get(name.lower(), name)


def canonical_attr(written: str) -> str:
    key = camelcase(written).lower()
    if key in _OLD_NAMES:
        return _OLD_NAMES[key]
    return _CANONICAL_ATTRS.get(key, camelcase(written))


# -- parsing ----------------------------------------------------------------------------------

_ENTITY_OPEN = re.compile(r"^([A-Za-z_][\w.\-]*)\s*\{\s*(.*)$")
_ATTR = re.compile(r"^([$A-Za-z_][\w.\-]*)\s*:\s*(.*)$")
# Values in which '#' is data, not a comment: qdrouterd takes their first word.
_HASH_OK = {"pattern", "bindingKey", "hostname"}


def parse(text: str, filename: str = "qdrouterd.conf") -> list[Entity]:
    """The entities of a qdrouterd configuration, native or JSON format."""
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    stripped = "\n".join(
        "" if line.lstrip().startswith("#") else line for line in text.splitlines()
    )
    if filename.endswith(".json") or stripped.lstrip().startswith("["):
        return _parse_json(stripped, filename)
    return _parse_conf(text, filename)


def _parse_conf(text: str, filename: str) -> list[Entity]:
    entities: list[Entity] = []
    current: Entity | None = None
    nested: tuple[str, int, list[str], int] | None = None  # key, line, raw lines, depth

    def error(line: int, message: str) -> QdrouterdError:
        return QdrouterdError(filename, line, message)

    for number, raw in enumerate(text.splitlines(), start=1):
        if nested is not None:
            key, start, lines, depth = nested
            body = raw.split("#", 1)[0] if key != "openProperties" else raw
            depth += body.count("{") - body.count("}")
            lines.append(raw)
            if depth <= 0:
                assert current is not None
                current.attrs[canonical_attr(key)] = Attr(key, "\n".join(lines), start)
                nested = None
            else:
                nested = (key, start, lines, depth)
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}" or (line.startswith("}") and line[1:].lstrip().startswith("#")):
            if current is None:
                raise error(number, "'}' without an open entity")
            entities.append(current)
            current = None
            continue
        attr = _ATTR.match(line)
        if attr is not None and current is not None:
            key, rest = attr.group(1), attr.group(2)
            if canonical_attr(key) in _HASH_OK or key in _HASH_OK:
                value_text = rest.split()[0] if rest.split() else ""
                value: Any = _unquote(value_text, number, filename)
            else:
                value = _value(rest, number, filename)
            if value == "{":
                nested = (key, number, ["{"], 1)
                continue
            if value == "":
                raise error(number, f"attribute '{key}' has no value")
            current.attrs[canonical_attr(key)] = Attr(key, value, number)
            continue
        opened = _ENTITY_OPEN.match(line)
        if opened is not None and attr is None:
            if current is not None:
                raise error(
                    number,
                    f"'{opened.group(1)} {{' inside entity '{current.written}' opened at line "
                    f"{current.line}: close it with '}}' on a line of its own first",
                )
            rest = opened.group(2).split("#", 1)[0].strip()
            current = Entity(canonical_type(opened.group(1)), opened.group(1), number)
            if rest == "}":
                entities.append(current)
                current = None
            elif rest:
                raise error(
                    number,
                    f"text after '{opened.group(1)} {{': put each 'key: value' on a line of "
                    "its own",
                )
            continue
        if current is None:
            if attr is not None:
                raise error(number, f"attribute '{attr.group(1)}' outside an entity")
            raise error(number, f"expected 'ENTITY {{' (e.g. 'listener {{'), got {line!r}")
        raise error(number, f"expected 'key: value' or '}}' in entity '{current.written}', "
                            f"got {line!r}")  # fmt: skip
    if nested is not None:
        raise error(nested[1], f"map '{nested[0]}' is never closed with '}}'")
    if current is not None:
        raise error(current.line or 0, f"entity '{current.written}' is never closed with '}}'")
    return entities


def _unquote(text: str, line: int, filename: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        if text[0] == '"':
            try:
                decoded = json.loads(text)
            except ValueError:
                raise QdrouterdError(filename, line, f"bad quoted value {text}") from None
            return str(decoded)
        return text[1:-1]
    return text


def _value(rest: str, line: int, filename: str) -> str:
    """A native-format value: quoted (a comment may follow) or up to a '#'."""
    rest = rest.strip()
    if rest[:1] in ("'", '"'):
        quote = rest[0]
        end = 1
        while end < len(rest):
            if rest[end] == "\\" and quote == '"':
                end += 2
                continue
            if rest[end] == quote:
                break
            end += 1
        if end >= len(rest):
            raise QdrouterdError(filename, line, f"unterminated quoted value {rest}")
        after = rest[end + 1 :].strip()
        if after and not after.startswith("#"):
            raise QdrouterdError(filename, line, f"text after the quoted value: {after!r}")
        return _unquote(rest[: end + 1], line, filename)
    value = rest.split("#", 1)[0].strip()
    if value.endswith(","):  # a stray JSON-style comma
        value = value[:-1].rstrip()
    return value


def _parse_json(text: str, filename: str) -> list[Entity]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QdrouterdError(filename, exc.lineno, f"JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, list):
        raise QdrouterdError(filename, 1, 'JSON form: expected a list of ["entity", {...}] pairs')
    starts = _item_lines(text)
    entities: list[Entity] = []
    for i, item in enumerate(data):
        line = starts[i] if i < len(starts) else None
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], dict)
        ):
            raise QdrouterdError(
                filename, line, f'JSON form: item {i + 1} is not an ["entity", {{...}}] pair'
            )
        entity = Entity(canonical_type(item[0]), item[0], line)
        for key, value in item[1].items():
            entity.attrs[canonical_attr(str(key))] = Attr(str(key), value, line)
        entities.append(entity)
    return entities


def _item_lines(text: str) -> list[int]:
    """The line each item of the (valid) top-level JSON list starts on."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return lines
        lines.append(text.count("\n", 0, i) + 1)
        _, i = decoder.raw_decode(text, i)


# -- values -----------------------------------------------------------------------------------


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "1", "on"):
        return True
    if text in ("no", "false", "0", "off"):
        return False
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


_SERVICES = {"amqp": 5672, "amqps": 5671}


def _port(value: Any) -> int | None:
    number = _int(value)
    if number is not None:
        return number if 0 <= number <= 65535 else None
    return _SERVICES.get(str(value).strip().lower())


def _shown(attr: Attr) -> str:
    """An attribute as a comment shows it: secrets never, long values cut."""
    if "password" in canonical_attr(attr.key).lower():
        return f"{attr.key}: <redacted>"
    value = attr.value
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, dict | list):
        text = json.dumps(value)
    else:
        text = str(value)
    text = " ".join(text.split())
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{attr.key}: {text}"


# -- conversion -------------------------------------------------------------------------------


@dataclass
class Note:
    """One thing not carried over: where it was, what it was, why."""

    line: int | None
    what: str
    why: str

    def render(self, filename: str) -> str:
        where = f"{filename}:{self.line}" if self.line is not None else filename
        return f"# not carried over: {where}: {self.what} -- {self.why}"


@dataclass
class _Item:
    """A YAML list item or mapping entry being built: keys in order, and notes."""

    fields: dict[str, Any]
    notes: list[Note] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)  # other comments (carried, but differently)


@dataclass
class ImportResult:
    yaml: str
    notes: list[Note]
    listeners: int
    connectors: int
    link_routes: int


# Why whole entities cannot be carried over.
_ENTITY_WHY = {
    "autoLink": "autoLinks attach the router's own links to a broker queue and route messages "
    "over them; the gateway only relays the devices' own links (link routes)",
    "address": "address entities configure message routing (distribution, waypoints); the "
    "gateway link-routes and keeps no addresses of its own",
    "fixedAddress": "message-routing address (0.4-0.6); the gateway only link-routes",
    "waypoint": "waypoints route messages through a broker; the gateway only link-routes",
    "exchange": "exchanges/bindings route messages by key; the gateway only link-routes",
    "binding": "exchanges/bindings route messages by key; the gateway only link-routes",
    "policy": "connection policies: use listeners[].max_connections and allowed_networks, and "
    "credentials for per-device rules",
    "vhost": "vhost policies are not enforced; use listeners[].max_connections, "
    "allowed_networks, and mqtt_routes[].allowed_topics",
    "vhostUserGroupSettings": "vhost policies are not enforced",
    "policyRuleset": "policy rulesets (0.6) are not enforced; use listeners[].allowed_networks",
    "authServicePlugin": "no external SASL authentication service: devices authenticate to "
    "the hub (CBS / SAS token), or locally with credentials.devices[].local_password_hash",
    "console": "no web console; the admin endpoint (admin.listen) serves /metrics, /healthz, "
    "/readyz and the JSON API behind `iot-gateway status`",
    "management": "no AMQP management agent; use the admin endpoint and `iot-gateway status`",
    "tcpListener": "raw TCP forwarding is not a gateway feature",
    "tcpConnector": "raw TCP forwarding is not a gateway feature",
    "httpListener": "HTTP forwarding is not a gateway feature",
    "httpConnector": "HTTP forwarding is not a gateway feature",
}

# Why single attributes cannot be carried over.
_ATTR_WHY = {
    "cost": "no router network: route cost has no meaning",
    "stripAnnotations": "not needed: the gateway adds no router annotations and relays "
    "message annotations unchanged",
    "linkCapacity": "credit is relayed end to end between device and hub; the gateway keeps "
    "no link capacity of its own",
    "maxSessionFrames": "session windows are relayed end to end",
    "multiTenant": "no multi-tenant address prefixing: addresses are relayed unchanged",
    "failoverUrls": "no usable failover host in the list",
    "allowRedirect": "redirects from the hub are not followed",
    "messageLoggingComponents": "no per-message logging; use log.trace: [amqp] (bodies "
    "and secrets redacted)",
    "policyVhost": "vhost policies are not enforced",
    "openProperties": "the gateway sends its own AMQP open properties",
    "socketAddressFamily": "the address family follows the bind address (write IPv6 as "
    "[::]:5672)",
    "saslPlugin": "no external SASL authentication service",
    "requireEncryption": "no SASL security layers; use a TLS listener (tls_profile)",
    "trustedCertsFile": "device client certificates are not verified by the gateway",
    "healthz": "served by the admin endpoint (admin.listen), not on AMQP ports",
    "metrics": "served by the admin endpoint (admin.listen), not on AMQP ports",
    "websockets": "no AMQP over WebSocket",
    "httpRootDir": "no web console",
    "uidFormat": "the gateway does not derive user ids from client certificates",
    "uidNameMappingFile": "the gateway does not derive user ids from client certificates",
    "password": "private key passwords are not supported; decrypt the key "
    "(openssl pkey -in key.pem -out key-plain.pem) and protect it with file permissions",
    "passwordFile": "private key passwords are not supported; decrypt the key "
    "(openssl pkey -in key.pem -out key-plain.pem) and protect it with file permissions",
    "workerThreads": "the gateway runs one event loop; no threads to configure",
    "saslConfigDir": "no Cyrus SASL database: devices authenticate to the hub (CBS / SAS "
    "token), or locally with credentials.devices[].local_password_hash",
    "saslConfigName": "no Cyrus SASL database: devices authenticate to the hub (CBS / SAS "
    "token), or locally with credentials.devices[].local_password_hash",
    "area": "no router network",
    "identity": "management identity: nothing to carry",
    "distribution": "link routes go to the one connector named",
    "maxSessions": "not needed: devices' sessions are relayed as they open them",
}
_DEFAULT_ATTR_WHY = "no equivalent in the gateway"


class _Converter:
    def __init__(self, entities: list[Entity], filename: str) -> None:
        self.entities = entities
        self.filename = filename
        self.notes: list[Note] = []  # whole entities
        self.gateway: dict[str, Any] = {}
        self.gateway_notes: list[Note] = []
        self.log_level: str | None = None
        self.log_notes: list[Note] = []
        self.profiles: dict[str, _Item] = {}
        self.profile_names: dict[str, str] = {}  # qdrouterd name -> ours
        self.listeners: list[_Item] = []
        self.connectors: list[_Item] = []
        self.connector_names: dict[str, str] = {}  # qdrouterd name -> ours
        self.routes: list[_Item] = []
        self.route_lines: list[list[int | None]] = []
        self.used_names: dict[str, set[str]] = {"tls": set(), "listener": set(),
                                                 "connector": set()}  # fmt: skip

    # -- helpers ----------------------------------------------------------------------

    def entity_note(self, entity: Entity, why: str) -> None:
        label = entity.written
        name = entity.get("name")
        what = f"{label} {name!r}" if name else label
        key_attrs = [
            a for k, a in entity.attrs.items() if k in ("prefix", "pattern", "address", "host", "module")
        ]
        if key_attrs:
            what += " {" + ", ".join(_shown(a) for a in key_attrs) + "}"
        self.notes.append(Note(entity.line, what, why))

    def leftover(self, entity: Entity, item: _Item, handled: Iterable[str],
                 whys: dict[str, str] | None = None) -> None:  # fmt: skip
        """A note for every attribute of ``entity`` not in ``handled``."""
        handled = set(handled) | {"name", "identity", "type"}
        for key, attr in entity.attrs.items():
            if key in handled:
                continue
            why = (whys or {}).get(key) or _ATTR_WHY.get(key, _DEFAULT_ATTR_WHY)
            item.notes.append(Note(attr.line, _shown(attr), why))

    def name(self, wanted: str | None, fallback: str, kind: str) -> str:
        """A valid, unused name in ``kind``'s namespace (tls, listener, connector)."""
        base = re.sub(r"[^A-Za-z0-9_.\-]+", "-", wanted or "").strip("-._") or fallback
        if not NAME_RE.match(base):
            base = f"{fallback}-{base}"
        used = self.used_names[kind]
        candidate, n = base, 2
        while candidate in used:
            candidate, n = f"{base}-{n}", n + 1
        used.add(candidate)
        return candidate

    # -- entities ---------------------------------------------------------------------

    def run(self) -> None:
        order = {"sslProfile": 0, "router": 1, "container": 1, "log": 1, "connector": 2,
                 "listener": 3, "linkRoute": 4, "linkRoutePattern": 4}  # fmt: skip
        # Profiles and connectors first: listeners and routes refer to them.
        for entity in sorted(self.entities, key=lambda e: order.get(e.type, 5)):
            handler = getattr(self, f"_entity_{entity.type}", None)
            if handler is not None:
                handler(entity)
            elif entity.type in _ENTITY_WHY:
                self.entity_note(entity, _ENTITY_WHY[entity.type])
            else:
                self.entity_note(entity, f"unknown entity type {entity.written!r}")

    def _entity_router(self, entity: Entity) -> None:
        item = _Item({})
        ident = entity.get("id")
        if ident is not None:
            ident = str(ident)
            if "${" in ident or "$(" in ident:
                item.notes.append(Note(entity.attrs["id"].line, _shown(entity.attrs["id"]),
                                       "environment substitution is not done; the default id "
                                       "is iot-gateway-<hostname>"))  # fmt: skip
            elif ident:
                self.gateway["id"] = ident
        mode = str(entity.get("mode", "standalone")).lower()
        handled = ["id"]
        if mode == "standalone":
            handled.append("mode")
        whys = {
            "mode": f"mode {mode}: no router network (inter-router or edge links); the gateway "
            "is always a standalone router, one per site or behind a load balancer",
        }
        self.leftover(entity, item, handled, whys)
        self.gateway_notes.extend(item.notes)

    def _entity_container(self, entity: Entity) -> None:
        # 0.4-0.6: the container name was the AMQP container-id.
        item = _Item({})
        name = entity.get("containerName")
        if name and "id" not in self.gateway:
            self.gateway["id"] = str(name)
        self.leftover(entity, item, ["containerName"])
        self.gateway_notes.extend(item.notes)

    def _entity_log(self, entity: Entity) -> None:
        module = str(entity.get("module", "")).upper()
        enable = str(entity.get("enable", "")).strip().lower()
        if module != "DEFAULT":
            self.entity_note(entity, "per-module log levels are not carried over; log.level "
                             "sets the gateway's level, log.trace: [amqp] logs frames")  # fmt: skip
            return
        item = _Item({})
        level = _log_level(enable)
        handled = ["module"]
        if level is not None:
            self.log_level = level
            handled.append("enable")
        self.leftover(entity, item, handled, {
            "enable": "no matching log level (debug, info, warning, error)",
            "output": "the gateway logs to stderr (the journal under systemd); log.format: "
            "json for log shippers",
            "timestamp": "timestamps are added by the journal or log.format: json",
            "source": "source locations are not logged",
            "includeTimestamp": "timestamps are added by the journal or log.format: json",
            "includeSource": "source locations are not logged",
        })  # fmt: skip
        self.log_notes.extend(item.notes)

    def _entity_sslProfile(self, entity: Entity) -> None:
        wanted = entity.get("name")
        if not wanted:
            self.entity_note(entity, "an sslProfile without a name cannot be referred to")
            return
        item = _Item({})
        for ours, theirs in (("ca_file", "caCertFile"), ("cert_file", "certFile"),
                             ("key_file", "privateKeyFile"), ("ciphers", "ciphers")):  # fmt: skip
            value = entity.get(theirs)
            if value not in (None, ""):
                item.fields[ours] = str(value)
        handled = ["caCertFile", "certFile", "privateKeyFile", "ciphers"]
        protocols = entity.get("protocols")
        if protocols:
            versions = re.findall(r"TLSv1(?:\.(\d))?", str(protocols))
            minors = sorted(int(v or 0) for v in versions)
            usable = [m for m in minors if m >= 2]
            if usable:
                item.fields["min_version"] = f"1.{usable[0]}"
                handled.append("protocols")
                if usable[0] != minors[0]:
                    item.remarks.append(f"protocols {protocols}: TLS below 1.2 is never used")
        if ("cert_file" in item.fields) != ("key_file" in item.fields):
            missing = "privateKeyFile" if "key_file" not in item.fields else "certFile"
            present = "cert_file" if missing == "privateKeyFile" else "key_file"
            dropped = item.fields.pop(present)
            item.notes.append(Note(entity.line, f"{present} {dropped}",
                                   f"{missing} is missing: a certificate needs its key"))  # fmt: skip
        self.leftover(entity, item, handled, {
            "protocols": "no TLS 1.2 or 1.3 listed; the gateway uses TLS 1.2 or later",
        })  # fmt: skip
        ours = self.name(str(wanted), "tls", "tls")
        self.profile_names[str(wanted)] = ours
        self.profiles[ours] = item

    def _inline_tls(self, entity: Entity, item: _Item, owner: str) -> str | None:
        """0.4-0.6 kept TLS settings on the listener or connector itself."""
        files = {ours: entity.get(theirs) for ours, theirs in
                 (("ca_file", "caCertFile"), ("cert_file", "certFile"),
                  ("key_file", "privateKeyFile"))}  # fmt: skip
        if not any(files.values()):
            return None
        profile = _Item({k: str(v) for k, v in files.items() if v})
        wanted = entity.get("sslProfileName")  # 0.6 named the inline profile
        name = self.name(str(wanted) if wanted else f"{owner}-tls", "tls", "tls")
        self.profiles[name] = profile
        item.remarks.append(f"TLS settings of this {entity.written} moved to tls_profiles.{name}")
        return name

    def _entity_listener(self, entity: Entity) -> None:
        role = str(entity.get("role", "normal")).lower()
        if role != "normal":
            self.entity_note(entity, f"role {role}: " + (
                "brokers or services connecting in as link-route targets are not supported; "
                "the gateway connects out to its connectors" if role == "route-container"
                else "no router network (inter-router and edge links)"))  # fmt: skip
            return
        if _bool(entity.get("http", False)):
            self.entity_note(entity, "HTTP/WebSocket listener (console, AMQP over WebSocket): "
                             "the admin endpoint (admin.listen) serves /metrics and /healthz; "
                             "AMQP over WebSocket is not provided")  # fmt: skip
            return
        port_attr = entity.attrs.get("port")
        port = _port(port_attr.value if port_attr else "amqp")
        if port is None:
            assert port_attr is not None
            self.entity_note(entity, f"port {port_attr.value!r}: only numbers, amqp (5672) "
                             "and amqps (5671) are understood")  # fmt: skip
            return
        host = str(entity.get("host", "") or "").strip()
        if host in ("", "*"):
            host = "0.0.0.0"
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        name = self.name(entity.get("name"), "amqp", "listener")
        item = _Item({"name": name, "protocol": "amqp", "bind": bind})
        handled = ["host", "port", "role", "http", "name"]
        whys: dict[str, str] = {}

        mechanisms = str(entity.get("saslMechanisms", "") or "").split()
        authenticate = _bool(entity.get("authenticatePeer", False))
        if mechanisms:
            handled.append("saslMechanisms")
            ours = ("MSSBCBS", "ANONYMOUS", "PLAIN")
            offered = [m.lower() for m in mechanisms if m.upper() in ours]
            others = [m for m in mechanisms if m.upper() not in ours]
            if authenticate and "anonymous" in offered:
                offered.remove("anonymous")
            if "anonymous" in offered:
                # Same trust as ANONYMOUS (tokens go over $cbs); the Azure C stack asks
                # for it by name, and the gateway offers it first by default.
                offered.insert(0, "mssbcbs")
                item.remarks.append("mssbcbs added before anonymous: the Azure C SDK's name "
                                    "for putting tokens over $cbs, as the gateway's default")  # fmt: skip
            if offered:
                item.fields["sasl"] = offered
            else:
                item.remarks.append("no mechanism the gateway offers was listed: it offers "
                                    "its default, MSSBCBS, ANONYMOUS and PLAIN")  # fmt: skip
            if others:
                item.notes.append(Note(entity.attrs["saslMechanisms"].line,
                                       f"SASL mechanisms {' '.join(others)}",
                                       "the gateway offers MSSBCBS, ANONYMOUS and PLAIN only"))  # fmt: skip
        if authenticate is False or authenticate is None:
            handled.append("authenticatePeer")
        else:
            whys["authenticatePeer"] = (
                "the gateway does not check device passwords against a SASL database: a "
                "device's PLAIN password (a SAS token) is passed to the hub, which decides; to "
                "check devices locally, use credentials.devices[].local_password_hash"
            )

        profile_name = entity.get("sslProfile")
        require_ssl = _bool(entity.get("requireSsl", False))
        tls = None
        if profile_name:
            handled.append("sslProfile")
            tls = self.profile_names.get(str(profile_name))
            if tls is None:
                item.notes.append(Note(entity.attrs["sslProfile"].line,
                                       _shown(entity.attrs["sslProfile"]),
                                       "no sslProfile of that name; the listener stays "
                                       "plaintext"))  # fmt: skip
            elif "cert_file" not in self.profiles[tls].fields:
                item.notes.append(Note(entity.attrs["sslProfile"].line,
                                       _shown(entity.attrs["sslProfile"]),
                                       "the profile has no certFile/privateKeyFile to serve "
                                       "TLS with; the listener stays plaintext"))  # fmt: skip
                tls = None
        else:
            tls = self._inline_tls(entity, item, name)
            handled += ["caCertFile", "certFile", "privateKeyFile", "sslProfileName"] if tls else []
        if tls is not None:
            item.fields["tls_profile"] = tls
            handled.append("requireSsl")
            if not require_ssl:
                item.remarks.append(
                    "requireSsl: no allowed plaintext and TLS on one port; the gateway's "
                    "listener is TLS only: add a plaintext listener on another port for "
                    "devices without TLS"
                )
        elif not require_ssl:
            handled.append("requireSsl")
        else:
            whys["requireSsl"] = "no usable sslProfile: the listener is plaintext"

        self._limits(entity, item, handled, listener=True)
        self.leftover(entity, item, handled, whys)
        self.listeners.append(item)

    def _limits(self, entity: Entity, item: _Item, handled: list[str], listener: bool) -> None:
        frame = _int(entity.get("maxFrameSize"))
        if frame is not None and 512 <= frame < 2**32:
            item.fields["max_frame_size"] = frame
            handled.append("maxFrameSize")
        idle = _int(entity.get("idleTimeoutSeconds"))
        if idle is not None and idle >= 0:
            item.fields["idle_timeout"] = f"{idle}s"
            handled.append("idleTimeoutSeconds")
        if listener:
            handshake = _int(entity.get("initialHandshakeTimeoutSeconds"))
            if handshake is not None and handshake > 0:
                item.fields["handshake_timeout"] = f"{handshake}s"
                handled.append("initialHandshakeTimeoutSeconds")
            elif handshake == 0:
                handled.append("initialHandshakeTimeoutSeconds")  # 0 = qdrouterd's default

    def _entity_connector(self, entity: Entity) -> None:
        role = str(entity.get("role", "normal")).lower()
        wanted = entity.get("name")
        if role not in ("route-container", "on-demand"):
            why = ("no router network (inter-router and edge links)" if role in
                   ("inter-router", "edge") else
                   "role normal: a connection for message routing (autoLinks, waypoints); "
                   "only route-container connectors carry link routes")  # fmt: skip
            self.entity_note(entity, f"role {role}: {why}" if role != "normal" else why)
            return
        port_attr = entity.attrs.get("port")
        port = _port(port_attr.value if port_attr else "amqp")
        if port is None:
            assert port_attr is not None
            self.entity_note(entity, f"port {port_attr.value!r}: only numbers, amqp (5672) "
                             "and amqps (5671) are understood")  # fmt: skip
            return
        host = str(entity.get("host", "127.0.0.1") or "127.0.0.1")
        name = self.name(str(wanted) if wanted else None, "connector", "connector")
        item = _Item({"name": name, "protocol": "amqp", "host": host, "port": port})
        handled = ["host", "port", "role", "name"]
        whys: dict[str, str] = {}

        profile_name = entity.get("sslProfile")
        tls = None
        if profile_name:
            tls = self.profile_names.get(str(profile_name))
            if tls is None:
                self.entity_note(entity, f"sslProfile {profile_name!r} is not defined; "
                                 "the connector is not carried over rather than sending "
                                 "in plaintext")  # fmt: skip
                return
            handled.append("sslProfile")
        else:
            tls = self._inline_tls(entity, item, name)
            if tls is not None:
                handled += ["caCertFile", "certFile", "privateKeyFile", "sslProfileName"]
        if tls is not None:
            item.fields["tls_profile"] = tls
        else:
            item.fields["allow_plaintext"] = True
            item.remarks.append(
                "no sslProfile: this connector sends in plaintext, as it did; "
                "for IoT Hub add a tls_profile and port 5671"
            )

        verify = _bool(entity.get("verifyHostname", True))
        if verify is not False:
            handled.append("verifyHostname")
        else:
            whys["verifyHostname"] = (
                "host name verification is always on; if the hub's certificate names "
                "another host, set server_name in the tls profile"
            )

        self._failover(entity, item, handled, host, port)
        self._connector_sasl(entity, item, handled, tls)
        self._limits(entity, item, handled, listener=False)
        if role == "route-container":
            item.remarks.append("role route-container connected at start; the gateway "
                                "connects at the first device attach (on_demand: true)")  # fmt: skip
        self.leftover(entity, item, handled, whys)
        if wanted:
            self.connector_names[str(wanted)] = name
        self.connectors.append(item)

    def _failover(self, entity: Entity, item: _Item, handled: list[str], host: str,
                  port: int) -> None:  # fmt: skip
        """failoverUrls (``amqp://h2:5671, h3``) -> hosts: the connector's own endpoint first."""
        urls = str(entity.get("failoverUrls", "") or "")
        if not urls.strip():
            return
        hosts = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        for url in (u.strip() for u in urls.split(",")):
            address = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", url).split("/", 1)[0]
            address = address.rsplit("@", 1)[-1]  # no user:password@ in a host list
            if not address:
                continue
            if not re.fullmatch(r"(\[[0-9A-Fa-f:.%]+\]|[^:\[\]\s]+)(:\d{1,5})?", address):
                item.notes.append(Note(entity.attrs["failoverUrls"].line,
                                       f"failover URL {url!r}", "not a host[:port]"))  # fmt: skip
                continue
            if address not in hosts:
                hosts.append(address)
        if len(hosts) > 1:
            item.fields["hosts"] = hosts
            handled.append("failoverUrls")
            if "amqp://" in urls.lower() and item.fields.get("tls_profile"):
                item.remarks.append("failover URLs mixed amqp:// and TLS: every host in hosts "
                                    "uses this connector's TLS profile")  # fmt: skip

    def _connector_sasl(self, entity: Entity, item: _Item, handled: list[str],
                        tls: str | None) -> None:  # fmt: skip
        mechanisms = [m.upper() for m in str(entity.get("saslMechanisms", "") or "").split()]
        username = entity.get("saslUsername")
        password_attr = entity.attrs.get("saslPassword")
        has_cert = tls is not None and "cert_file" in self.profiles[tls].fields
        chosen: str | None = None
        if username and (not mechanisms or "PLAIN" in mechanisms):
            chosen = "plain"
        elif "EXTERNAL" in mechanisms and has_cert:
            chosen = "external"
        elif not mechanisms or "ANONYMOUS" in mechanisms:
            chosen = "anonymous"
        if mechanisms:
            handled.append("saslMechanisms")
        if chosen is None:
            item.notes.append(Note(entity.attrs["saslMechanisms"].line,
                                   _shown(entity.attrs["saslMechanisms"]),
                                   "the gateway connects with ANONYMOUS, EXTERNAL or PLAIN; "
                                   "it uses ANONYMOUS"))  # fmt: skip
            chosen = "anonymous"
        item.fields["sasl"] = chosen
        if chosen != "plain":
            return
        item.fields["sasl_username"] = str(username)
        handled.append("saslUsername")
        secret = "" if password_attr is None else str(password_attr.value)
        if secret.startswith("pass:"):
            secret = secret[5:]
        elif secret.startswith(("env:", "file:")) or password_attr is None:
            where = secret.split(":", 1)[0] if secret else ""
            item.fields["sasl_password"] = "REPLACE-ME"
            if password_attr is not None:
                handled.append("saslPassword")
                item.notes.append(Note(password_attr.line, f"saslPassword from {where}:",
                                       "the gateway reads the password from this file only: "
                                       "replace REPLACE-ME (and keep the file mode 0600)"))  # fmt: skip
            else:
                item.remarks.append("no saslPassword was given: replace REPLACE-ME")
            return
        item.fields["sasl_password"] = secret
        handled.append("saslPassword")
        item.remarks.append("sasl_password copied from the source: keep this file mode 0600")

    def _entity_linkRoute(self, entity: Entity) -> None:
        if entity.get("connection") is None and entity.get("connector") is not None:
            self._route(entity, entity.get("connector"), "connector")  # a common slip
        else:
            self._route(entity, entity.get("connection"), "connection")

    def _entity_linkRoutePattern(self, entity: Entity) -> None:
        self._route(entity, entity.get("connector"), "connector")

    def _route(self, entity: Entity, connection: Any, key: str) -> None:
        if entity.get("containerId"):
            self.entity_note(entity, "containerId routes to whichever peer connects with that "
                             "container-id; the gateway routes only to its own connectors: "
                             "name one with 'connection'")  # fmt: skip
            return
        if not connection:
            self.entity_note(entity, "no connection (routed across a router network); the "
                             "gateway routes only to its own connectors")  # fmt: skip
            return
        connector = self.connector_names.get(str(connection))
        if connector is None:
            self.entity_note(entity, f"{key} {connection!r} is not a carried-over "
                             "route-container connector")  # fmt: skip
            return
        prefix, pattern = entity.get("prefix"), entity.get("pattern")
        if (prefix is None) == (pattern is None) or not str(prefix or pattern).strip("/"):
            self.entity_note(entity, "needs exactly one non-empty prefix or pattern")
            return
        direction = str(entity.get("direction", "both") or "both").lower()
        if direction not in ("in", "out", "both"):
            self.entity_note(entity, f"unknown direction {direction!r}")
            return
        kind, address = ("prefix", str(prefix)) if prefix is not None else ("pattern", str(pattern))
        item = _Item({kind: address, "connector": connector, "direction": direction})
        handled = ["prefix", "pattern", "direction", key, "distribution"]
        if "." in address.replace("$", ""):
            item.remarks.append(
                f"{kind} {address!r}: Qpid Dispatch Router also splits addresses on '.', the "
                "gateway only on '/' (IoT Hub device ids may contain dots)"
            )
        self.leftover(entity, item, handled, {
            "addExternalPrefix": "addresses are relayed unchanged (no prefix rewriting)",
            "delExternalPrefix": "addresses are relayed unchanged (no prefix rewriting)",
        })  # fmt: skip
        if any(n.what.startswith(("addExternalPrefix", "delExternalPrefix")) for n in item.notes):
            self.entity_note(entity, "address prefix rewriting (add/delExternalPrefix) is not "
                             "supported: addresses are relayed unchanged")  # fmt: skip
            return
        self._merge_route(entity, item)

    def _merge_route(self, entity: Entity, item: _Item) -> None:
        kind = "prefix" if "prefix" in item.fields else "pattern"
        address = item.fields[kind].strip("/")
        direction = item.fields["direction"]
        for i, other in enumerate(self.routes):
            if kind not in other.fields or other.fields[kind].strip("/") != address:
                continue
            theirs = other.fields["direction"]
            overlap = "both" in (direction, theirs) or direction == theirs
            if other.fields["connector"] != item.fields["connector"]:
                if overlap:
                    self.entity_note(entity, f"{kind} {address!r} is already routed to "
                                     f"connector {other.fields['connector']!r}")  # fmt: skip
                    return
                continue
            if overlap:
                self.entity_note(entity, "duplicate of an earlier link route")
                return
            # The in and out halves of one route: one entry, direction both.
            other.fields["direction"] = "both"
            other.notes.extend(item.notes)
            other.remarks.extend(r for r in item.remarks if r not in other.remarks)
            self.route_lines[i].append(entity.line)
            return
        self.routes.append(item)
        self.route_lines.append([entity.line])

    # -- rendering --------------------------------------------------------------------

    def admin_listen(self) -> str:
        ports = {item.fields["bind"].rsplit(":", 1)[1] for item in self.listeners}
        port = 9090
        while str(port) in ports:
            port += 1
        return f"127.0.0.1:{port}"

    def render(self) -> str:
        f = self.filename
        out = [
            f"# Imported from {f} by `iot-gateway import-qdrouterd`.",
            "# Check it with `iot-gateway check -c THIS_FILE`; every key is described in",
            "# the README (Configuration) and config/schema.json.",
        ]
        all_notes = self.all_notes()
        if all_notes:
            out.append(f"# {len(all_notes)} item(s) could not be carried over; each is "
                       "commented where it would go.")  # fmt: skip
        out.append("")
        for note in sorted(self.notes, key=lambda n: (n.line is None, n.line or 0)):
            out.append(note.render(f))
        if self.notes:
            out.append("")
        out.append("gateway:")
        if "id" in self.gateway:
            out.append(f"  id: {_scalar(self.gateway['id'])}   # AMQP container-id towards "
                       "the hub")  # fmt: skip
        else:
            out.append("  # id: default iot-gateway-<hostname>")
        out.append("  drain_timeout: 10s")
        out.extend("  " + n.render(f) for n in self.gateway_notes)
        out.append("admin:")
        out.append(f"  listen: {self.admin_listen()}   # /metrics /healthz /readyz /api "
                   "(iot-gateway status)")  # fmt: skip
        out.append("log:")
        out.append(f"  level: {self.log_level or 'info'}")
        out.extend("  " + n.render(f) for n in self.log_notes)
        if self.profiles:
            out.append("tls_profiles:")
            for name, item in self.profiles.items():
                out.append(f"  {name}:")
                if not item.fields:
                    out.append("    min_version: \"1.2\"   # system trust store")
                out.extend(_fields(item, "    "))
                out.extend("    " + n.render(f) for n in item.notes)
        for section, items in (("listeners", self.listeners), ("connectors", self.connectors)):
            if items:
                out.append(f"{section}:")
                for item in items:
                    out.extend(_list_item(item, f))
            else:
                out.append(f"{section}: []")
        if self.routes:
            out.append("link_routes:")
            for item, lines in zip(self.routes, self.route_lines, strict=True):
                flow = ", ".join(f"{k}: {_scalar(v)}" for k, v in item.fields.items())
                where = ", ".join(str(n) for n in lines if n is not None)
                suffix = f"   # {f}:{where}" if where else ""
                out.append(f"  - {{{flow}}}{suffix}")
                out.extend("    # " + r for r in item.remarks)
                out.extend("    " + n.render(f) for n in item.notes)
        else:
            out.append("link_routes: []")
        return "\n".join(out) + "\n"

    def all_notes(self) -> list[Note]:
        notes = [*self.notes, *self.gateway_notes, *self.log_notes]
        for item in (*self.profiles.values(), *self.listeners, *self.connectors, *self.routes):
            notes.extend(item.notes)
        return notes


def _log_level(enable: str) -> str | None:
    first = re.split(r"[,\s]+", enable.strip())[0].rstrip("+") if enable else ""
    return {
        "trace": "debug", "debug": "debug", "info": "info", "notice": "info",
        "warning": "warning", "error": "error", "critical": "error",
    }.get(first)  # fmt: skip


def _scalar(value: Any) -> str:
    """One YAML scalar, quoted when YAML would read it as something else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    text = str(value)
    # Plain when YAML reads it back as this same string; else JSON-quoted (valid YAML),
    # and always quoted with ':', '#', '$' or brackets so flow mappings stay unambiguous.
    if re.search(r"[:#{}\[\],&*!|>'\"%@`$\\]", text) or text != text.strip() or not text:
        return json.dumps(text)
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _fields(item: _Item, indent: str) -> list[str]:
    lines = [f"{indent}{k}: {_scalar(v)}" for k, v in item.fields.items()]
    lines.extend(f"{indent}# {r}" for r in item.remarks)
    return lines


def _list_item(item: _Item, filename: str) -> list[str]:
    lines = _fields(item, "    ")
    lines[0] = "  - " + lines[0].lstrip()
    lines.extend("    " + n.render(filename) for n in item.notes)
    return lines


def convert(entities: list[Entity], filename: str = "qdrouterd.conf") -> ImportResult:
    """Gateway YAML for ``entities``, with a comment for everything left behind."""
    converter = _Converter(entities, filename)
    converter.run()
    return ImportResult(
        yaml=converter.render(),
        notes=converter.all_notes(),
        listeners=len(converter.listeners),
        connectors=len(converter.connectors),
        link_routes=len(converter.routes),
    )


def import_text(text: str, filename: str = "qdrouterd.conf") -> ImportResult:
    """Parse and convert in one step; raises :class:`QdrouterdError` on unreadable input."""
    return convert(parse(text, filename), filename)
