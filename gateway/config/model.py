"""The typed configuration: one pydantic model per YAML section.

The YAML shape in docs/design.md is the contract. Every model forbids
unknown keys so a typo is an error rather than a silently ignored setting.
Checks that need more than one field live in ``model_validator``s and report
through ``errors_at`` so each problem points at the key that caused it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gateway.config.admin_token import admin_token
from gateway.config.base import Loc, Name, Network, Section, _str, errors_at, readable_file
from gateway.config.credentials import CredentialsSection
from gateway.config.durations import Duration
from gateway.config.hostport import HostPort
from gateway.config.proxy_url import parse_proxy_url
from gateway.config.store import StoreAndForwardSection

DEFAULT_AMQP_PORT = 5671
DEFAULT_MQTT_PORT = 8883
DEFAULT_WEBSOCKET_PORT = 443  # IoT Hub serves AMQP and MQTT over WebSockets on 443
DEFAULT_MQTT_MAX_PACKET_SIZE = 262144 + 1024  # IoT Hub's 256 KiB message limit + header room


def _tls_version(value: Any) -> Any:
    # YAML reads an unquoted 1.2 as a float; accept it as the string it means.
    if isinstance(value, float):
        return f"{value:.1f}"
    return value


# --- gateway, admin, log -------------------------------------------------------------------


def _default_gateway_id() -> str:
    return f"iot-gateway-{socket.gethostname()}"


class GatewaySection(Section):
    id: str = Field(
        default_factory=_default_gateway_id,
        min_length=1,
        description="AMQP container-id towards the hub (default iot-gateway-<hostname>)",
    )
    drain_timeout: Duration = Field(
        10.0, description="on SIGTERM, how long in-flight deliveries may take to settle"
    )
    metrics_device_labels: bool = Field(
        False, description="add device id labels to per-device metrics (cardinality!)"
    )


class AdminSection(Section):
    listen: HostPort = Field(
        "127.0.0.1:9090",  # type: ignore[assignment]  # validated into a HostPort
        validate_default=True,
        description="/metrics /healthz /readyz /api/...",
    )
    enabled: bool = True
    token_file: Path | None = Field(
        None,
        description="file holding the bearer token /api/* requires (mode 0600); required "
        "when listen is not a loopback address",
    )
    _token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _api_token(self, info: ValidationInfo) -> AdminSection:
        self._token, problems = admin_token(self, (info.context or {}).get("base_dir"))
        if problems:
            raise errors_at("AdminSection", problems)
        return self

    @property
    def token(self) -> SecretStr | None:
        """The bearer token read from ``token_file`` (None: /api/* needs none)."""
        return self._token


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    trace: list[Literal["amqp", "mqtt"]] = Field(
        default_factory=list, description="protocols whose frames are logged one per line"
    )


# --- TLS -------------------------------------------------------------------------------------



def _both_or_neither(model: Any, first: str, second: str) -> None:
    """Two keys that only make sense together: one without the other is an error
    located at the one given."""
    values = (getattr(model, first), getattr(model, second))
    if (values[0] is None) != (values[1] is None):
        present, missing = (first, second) if values[1] is None else (second, first)
        raise errors_at(
            type(model).__name__, [((present,), f"{present} needs {missing} too (both or neither)")]
        )


class TlsProfile(Section):
    ca_file: Path | None = Field(None, description="trusted CAs (PEM); default: system store")
    cert_file: Path | None = Field(None, description="own certificate chain (PEM)")
    key_file: Path | None = Field(None, description="private key of cert_file (PEM)")
    server_name: str | None = Field(
        None, description="SNI and host name check (default: the connector host)"
    )
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"
    ciphers: str | None = Field(None, description="OpenSSL cipher string for TLS 1.2")

    @field_validator("ca_file", "cert_file", "key_file", mode="after")
    @classmethod
    def _readable_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        return readable_file(value, (info.context or {}).get("base_dir"))

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsProfile:
        _both_or_neither(self, "cert_file", "key_file")
        return self

    @property
    def has_certificate(self) -> bool:
        return self.cert_file is not None


# --- listeners -------------------------------------------------------------------------------


class ListenerBase(Section):
    name: Name
    bind: HostPort
    tls_profile: str | None = Field(
        None, description="terminate device TLS with this profile's cert_file/key_file"
    )
    max_connections: int = Field(1000, ge=1)
    allowed_networks: list[Network] = Field(
        default_factory=list, description="source CIDRs allowed to connect; empty = any"
    )
    handshake_timeout: Duration = Field(
        10.0, description="AMQP: header+SASL+open; MQTT: time to receive CONNECT"
    )


class AmqpListener(ListenerBase):
    protocol: Literal["amqp"]
    sasl: list[Literal["mssbcbs", "anonymous", "plain"]] = Field(
        default_factory=lambda: ["mssbcbs", "anonymous", "plain"],
        description=(
            "SASL mechanisms offered, in this order; empty = no SASL layer. mssbcbs (the "
            "Azure C AMQP stack's choice) and anonymous: the device puts tokens over $cbs"
        ),
    )
    max_frame_size: int = Field(65536, ge=512, le=2**32 - 1)
    idle_timeout: Duration = Field(60.0, description="0 = none")
    channel_max: int = Field(255, ge=0, le=65535)

    @field_validator("sasl", mode="before")
    @classmethod
    def _mechanism_case(cls, value: Any) -> Any:
        # SASL names are upper case on the wire; accept either spelling here.
        if isinstance(value, list):
            return [v.lower() if isinstance(v, str) else v for v in value]
        return value


class MqttListener(ListenerBase):
    protocol: Literal["mqtt"]
    max_packet_size: int = Field(DEFAULT_MQTT_MAX_PACKET_SIZE, ge=1024, le=268435460)
    max_connect_size: int = Field(
        16384,
        ge=1024,
        le=268435460,
        description="largest CONNECT (Will included) accepted before the hub authenticates "
        "the device; a larger one is refused once its header is read (gateway.mqtt.limits)",
    )


Listener = Annotated[AmqpListener | MqttListener, Field(discriminator="protocol")]


# --- connectors ------------------------------------------------------------------------------


class ProxySettings(Section):
    """An HTTP proxy reached with CONNECT (see gateway.net.http_proxy)."""

    url: str = Field(description="http://host:port of the proxy (https:// proxies unsupported)")
    username: str | None = Field(None, min_length=1, description="Basic auth user name")
    password_file: Path | None = Field(
        None, description="file holding the Basic auth password (read at each connect)"
    )

    @field_validator("url", mode="after")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_proxy_url(value)  # raises ValueError with a readable message
        return value

    @field_validator("password_file", mode="after")
    @classmethod
    def _readable_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        return readable_file(value, (info.context or {}).get("base_dir"))

    @model_validator(mode="after")
    def _user_and_password(self) -> ProxySettings:
        _both_or_neither(self, "username", "password_file")
        return self


def _proxy_kind(value: Any) -> str:
    return "proxy_keyword" if isinstance(value, str) else "proxy_settings"


# `env`: HTTPS_PROXY / NO_PROXY from the environment; `none`: direct, even with a default.
# The discriminator keeps errors to the branch the YAML meant (the loader hides the tags).
ProxySetting = Annotated[
    Annotated[ProxySettings, Tag("proxy_settings")]
    | Annotated[Literal["env", "none"], Tag("proxy_keyword")],
    Discriminator(_proxy_kind),
]


class ReconnectSettings(Section):
    initial: Duration = Field(1.0, description="first retry delay; doubles up to max")
    max: Duration = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectSettings:
        if self.initial <= 0:
            raise errors_at("ReconnectSettings", [(("initial",), "must be greater than 0")])
        if self.max < self.initial:
            raise errors_at("ReconnectSettings", [(("max",), "must be at least initial")])
        return self


class PoolSettings(Section):
    max_connections: int = Field(4, ge=1, le=1000)
    max_devices_per_connection: int = Field(
        200,
        ge=1,
        le=1000,
        description="1 = one TLS connection per device (with cbs: auto, $cbs routed verbatim)",
    )


def _host_entry(value: Any) -> str:
    parse_host_entry(_str(value))
    return value  # type: ignore[no-any-return]


def parse_host_entry(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port`` -> (host, port or None)."""
    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and text[end + 1] != ":"):
            raise ValueError(f"invalid host {text!r}: expected [ipv6] or [ipv6]:port")
        if not text[end + 1 :]:
            return str(HostPort.parse(f"{text}:0").host), None
        hp = HostPort.parse(text)
    elif ":" not in text:
        if any(c.isspace() for c in text):
            raise ValueError(f"invalid host {text!r}")
        return text, None
    else:
        hp = HostPort.parse(text)
    if not 1 <= hp.port <= 65535:
        raise ValueError(f"invalid host {text!r}: port must be 1..65535")
    return hp.host, hp.port


HostEntry = Annotated[
    str,
    PlainValidator(_host_entry),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "description": "host, host:port, [ipv6] or [ipv6]:port (default port: the connector's)",
        }
    ),
]


class ConnectorEndpoint(Section):
    """One place a connector's hub may be reached (from ``host``/``port`` or ``hosts``)."""

    host: str
    port: int


class ConnectorBase(Section):
    name: Name
    host: str | None = Field(None, min_length=1, description="the hub's host (or give hosts)")
    hosts: list[HostEntry] | None = Field(
        None,
        min_length=1,
        description="failover: endpoints tried in order on every connect, instead of host",
    )
    transport: Literal["tcp", "websockets"] = Field(
        "tcp",
        description="websockets: the protocol over wss://host/$iothub/websocket (port 443), "
        "for firewalls that open 443 only",
    )
    proxy: ProxySetting | None = Field(
        None,
        description="HTTP CONNECT proxy: {url, username, password_file}, env (HTTPS_PROXY, "
        "NO_PROXY) or none; default: the top-level proxy",
    )
    tls_profile: str | None = None
    allow_plaintext: bool = Field(False, description="permit a connector without TLS")
    connect_timeout: Duration = 10.0
    reconnect: ReconnectSettings = Field(default_factory=ReconnectSettings)
    ack_batching: Duration = Field(
        0.001,
        le=0.05,
        description=(
            "under sustained load, wait up to this long before reading the hub's next "
            "acknowledgements, so one wake-up relays several; only while enough messages "
            "are in flight that the wait cannot slow them (0 = relay each at once)"
        ),
    )

    # The port when none is given and the transport is tcp (each protocol sets it).
    _tcp_port: ClassVar[int] = 0

    @model_validator(mode="after")
    def _default_port(self) -> ConnectorBase:
        # Before _host_or_hosts: endpoints take this port when theirs is not given.
        if self.port is None:  # type: ignore[has-type]
            self.port = DEFAULT_WEBSOCKET_PORT if self.websockets else self._tcp_port
        return self

    @model_validator(mode="after")
    def _host_or_hosts(self) -> ConnectorBase:
        if self.hosts is None:
            if self.host is None:
                raise errors_at("Connector", [(("host",), "required key is missing")])
            return self
        if self.host is not None and self.host != parse_host_entry(self.hosts[0])[0]:
            raise errors_at("Connector", [(("hosts",), "give host or hosts, not both")])
        seen: set[tuple[str, int]] = set()
        for i, endpoint in enumerate(self.endpoints):
            key = (endpoint.host.lower(), endpoint.port)
            if key in seen:
                raise errors_at("Connector", [(("hosts", i), "duplicate endpoint")])
            seen.add(key)
        # The first host stands for the connector where one name is needed (the
        # AMQP open hostname's default, `target`, SAS token audiences).
        self.host = self.endpoints[0].host
        return self

    @property
    def endpoints(self) -> list[ConnectorEndpoint]:
        """Where to connect, in order (``hosts``, else ``host``/``port``)."""
        port = int(self.port)  # type: ignore[attr-defined]
        if self.hosts is None:
            return [ConnectorEndpoint.model_construct(host=str(self.host), port=port)]
        out = []
        for entry in self.hosts:
            host, entry_port = parse_host_entry(entry)
            out.append(ConnectorEndpoint.model_construct(host=host, port=entry_port or port))
        return out

    @property
    def target(self) -> str:
        """``host:port``, or every endpoint comma-separated (no spaces) with ``hosts``."""
        return ",".join(str(HostPort(e.host, e.port)) for e in self.endpoints)

    @property
    def websockets(self) -> bool:
        return self.transport == "websockets"


def _port_schema(schema: dict[str, Any]) -> None:
    # The default depends on transport: say so in the description, not as a null default.
    schema.pop("default", None)
    schema["type"] = "integer"


class AmqpConnector(ConnectorBase):
    _tcp_port: ClassVar[int] = DEFAULT_AMQP_PORT
    protocol: Literal["amqp"]
    port: int = Field(
        None,  # type: ignore[assignment]  # filled in below: 5671, or 443 with websockets
        ge=1,
        le=65535,
        description=f"default {DEFAULT_AMQP_PORT} ({DEFAULT_WEBSOCKET_PORT} with transport: "
        "websockets)",
        json_schema_extra=_port_schema,
    )
    sasl: Literal["anonymous", "external", "plain", "relay"] = Field(
        "anonymous",
        description="relay: each device's own SASL PLAIN login is relayed over a connection "
        "of its own (Device Provisioning Service; pool and cbs do not apply)",
    )
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    idle_timeout: Duration = Field(120.0, description="0 = none")
    max_frame_size: int = Field(65536, ge=512, le=2**32 - 1)
    on_demand: bool = Field(True, description="connect at the first device attach, not at start")
    idle_close: Duration = Field(
        60.0,
        description="close a pooled hub connection that has had no device this long (one "
        "is kept with on_demand: false; 0 = never)",
    )
    hostname: str | None = Field(
        None, description="AMQP open hostname (default: tls profile server_name, else host)"
    )
    pool: PoolSettings = Field(default_factory=PoolSettings)
    cbs: Literal["auto", "proxy", "route"] = Field(
        "auto",
        description="$cbs handling: proxy = served by the gateway, put-tokens forwarded over "
        "one gateway CBS link pair per hub connection; route = link-routed verbatim (needs "
        "pool.max_devices_per_connection: 1); auto = route when that is 1, else proxy",
    )

    @property
    def cbs_proxied(self) -> bool:
        """True when the gateway serves `$cbs` itself (see ``cbs``)."""
        if self.sasl == "relay":
            return False
        if self.cbs == "auto":
            return self.pool.max_devices_per_connection > 1
        return self.cbs == "proxy"

    @model_validator(mode="after")
    def _cbs_mode(self) -> AmqpConnector:
        if self.cbs == "route" and self.pool.max_devices_per_connection != 1:
            raise errors_at(
                "AmqpConnector",
                [
                    (
                        ("cbs",),
                        "cbs: route needs pool.max_devices_per_connection: 1 (devices sharing "
                        "a hub connection cannot each route their own CBS links; use proxy "
                        "or auto)",
                    )
                ],
            )
        return self

    @model_validator(mode="after")
    def _sasl_credentials(self) -> AmqpConnector:
        problems: list[tuple[Loc, str]] = []
        if self.sasl == "plain":
            if not self.sasl_username:
                problems.append((("sasl_username",), "required when sasl: plain"))
            if self.sasl_password is None:
                problems.append((("sasl_password",), "required when sasl: plain"))
        else:
            for key in ("sasl_username", "sasl_password"):
                if getattr(self, key) is not None:
                    problems.append(((key,), "only used with sasl: plain"))
        if problems:
            raise errors_at("AmqpConnector", problems)
        return self


class MqttConnector(ConnectorBase):
    protocol: Literal["mqtt"]
    port: int = Field(
        None,  # type: ignore[assignment]  # filled in below: 8883, or 443 with websockets
        ge=1,
        le=65535,
        description=f"default {DEFAULT_MQTT_PORT} ({DEFAULT_WEBSOCKET_PORT} with transport: "
        "websockets)",
        json_schema_extra=_port_schema,
    )

    _tcp_port: ClassVar[int] = DEFAULT_MQTT_PORT


Connector = Annotated[AmqpConnector | MqttConnector, Field(discriminator="protocol")]


# --- routes ----------------------------------------------------------------------------------


class LinkRoute(Section):
    prefix: str | None = Field(None, description="address prefix by whole segments, e.g. devices/")
    pattern: str | None = Field(None, description="segment pattern: * = one, # = zero or more")
    connector: str
    direction: Literal["in", "out", "both"] = Field(
        "both", description="in = device senders (target), out = device receivers (source)"
    )

    @model_validator(mode="after")
    def _prefix_or_pattern(self) -> LinkRoute:
        if (self.prefix is None) == (self.pattern is None):
            raise ValueError("give exactly one of prefix or pattern")
        address = self.prefix if self.prefix is not None else self.pattern
        if not address or not address.strip("/"):
            key = "prefix" if self.prefix is not None else "pattern"
            raise errors_at("LinkRoute", [((key,), "must not be empty")])
        return self

    @property
    def kind(self) -> Literal["prefix", "pattern"]:
        return "prefix" if self.prefix is not None else "pattern"

    @property
    def address(self) -> str:
        return self.prefix if self.prefix is not None else self.pattern  # type: ignore[return-value]


def _topic_filter(value: Any) -> str:
    text = _str(value)
    levels = text.split("/")
    if not text:
        raise ValueError("empty topic filter")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"invalid topic filter {text!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {text!r}: '+' must be a whole level")
    return text


TopicFilter = Annotated[
    str, PlainValidator(_topic_filter), WithJsonSchema({"type": "string", "minLength": 1})
]


class MqttRoute(Section):
    hub: str | None = Field(
        None,
        min_length=1,
        description="hub host from the CONNECT username; * = any (the default without username)",
    )
    username: str | None = Field(
        None,
        min_length=1,
        description="glob over the whole CONNECT username (* = any run of characters, / too; "
        "? = one), e.g. 0ne000ABC/registrations/* for a Device Provisioning Service scope",
    )
    connector: str
    allowed_topics: list[TopicFilter] | None = Field(
        None, description="MQTT topic filters a device may use; default: all (the hub decides)"
    )

    @model_validator(mode="after")
    def _hub_or_username(self) -> MqttRoute:
        if self.hub is not None and self.username is not None:
            raise ValueError("give hub or username, not both")
        if self.hub is None and self.username is None:
            self.hub = "*"
        return self

    @property
    def match(self) -> str:
        """How the route is shown: ``hub H`` or ``username U``."""
        return f"username {self.username}" if self.username is not None else f"hub {self.hub}"


# --- the whole file --------------------------------------------------------------------------


class GatewayConfig(Section):
    """The whole configuration file. A new top-level section is one class and one field."""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    admin: AdminSection = Field(default_factory=AdminSection)
    log: LogSection = Field(default_factory=LogSection)
    tls_profiles: dict[Name, TlsProfile] = Field(default_factory=dict)
    listeners: list[Listener] = Field(default_factory=list)
    connectors: list[Connector] = Field(default_factory=list)
    link_routes: list[LinkRoute] = Field(default_factory=list)
    mqtt_routes: list[MqttRoute] = Field(default_factory=list)
    credentials: CredentialsSection | None = Field(
        None, description="keys and certificates the gateway holds for devices"
    )
    proxy: ProxySetting | None = Field(
        None,
        description="default HTTP CONNECT proxy of connectors without their own proxy "
        "setting: {url, username, password_file} or env (HTTPS_PROXY, NO_PROXY)",
    )
    store_and_forward: StoreAndForwardSection | None = Field(
        None,
        description="keep opted-in devices' telemetry on disk while the hub is unreachable; "
        "absent = off",
    )

    _source_path: Path | None = PrivateAttr(default=None)
    # `file:line: key: ...` for each examples' placeholder left in (gateway.config.placeholders).
    _placeholders: list[str] = PrivateAttr(default_factory=list)

    @property
    def placeholders(self) -> list[str]:
        """Placeholders of the shipped examples left in this configuration, located."""
        return list(self._placeholders)

    @property
    def source_path(self) -> Path | None:
        """The file this configuration was loaded from (for reloads), if any."""
        return self._source_path

    def connector(self, name: str) -> AmqpConnector | MqttConnector:
        for connector in self.connectors:
            if connector.name == name:
                return connector
        raise KeyError(name)

    def listener(self, name: str) -> AmqpListener | MqttListener:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    def tls_profile_for(self, owner: ListenerBase | ConnectorBase) -> TlsProfile | None:
        return None if owner.tls_profile is None else self.tls_profiles[owner.tls_profile]

    @model_validator(mode="after")
    def _cross_references(self) -> GatewayConfig:
        problems = _cross_check(self)
        if problems:
            raise errors_at("GatewayConfig", problems)
        for connector in self.connectors:
            if connector.proxy is None and self.proxy is not None:
                connector.proxy = self.proxy  # the top-level default
            if isinstance(connector, AmqpConnector) and connector.hostname is None:
                profile = self.tls_profile_for(connector)
                connector.hostname = (profile and profile.server_name) or connector.host
        return self


def _cross_check(config: GatewayConfig) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    profiles = config.tls_profiles

    def duplicates(section: str, items: list[Any]) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append(
                    ((section, i, "name"), f"duplicate {section[:-1]} name {item.name!r}")
                )
            seen.add(item.name)

    duplicates("listeners", config.listeners)
    duplicates("connectors", config.connectors)

    binds: list[tuple[Loc, HostPort, str]] = []
    if config.admin.enabled:
        binds.append((("admin", "listen"), config.admin.listen, "admin.listen"))
    for i, listener in enumerate(config.listeners):
        loc: Loc = ("listeners", i)
        if listener.tls_profile is not None:
            profile = profiles.get(listener.tls_profile)
            if profile is None:
                problems.append(
                    ((*loc, "tls_profile"), _no_profile(listener.tls_profile, profiles))
                )
            elif not profile.has_certificate:
                problems.append(
                    (
                        (*loc, "tls_profile"),
                        f"tls_profile {listener.tls_profile!r} has no cert_file/key_file "
                        "to serve device TLS with",
                    )
                )
        for _, other, label in binds:
            if _binds_clash(listener.bind, other):
                problems.append(
                    ((*loc, "bind"), f"bind address {listener.bind} already used by {label}")
                )
                break
        binds.append(((*loc, "bind"), listener.bind, f"listener {listener.name!r}"))

    for i, connector in enumerate(config.connectors):
        loc = ("connectors", i)
        if connector.tls_profile is not None:
            if connector.tls_profile not in profiles:
                problems.append(
                    ((*loc, "tls_profile"), _no_profile(connector.tls_profile, profiles))
                )
        elif not connector.allow_plaintext:
            problems.append(
                (
                    loc,
                    f"plaintext connector refused; set allow_plaintext: true to send traffic to "
                    f"{connector.target} unencrypted, or name a tls_profile",
                )
            )

    by_name = {c.name: c for c in config.connectors}
    for section, routes, protocol in (
        ("link_routes", config.link_routes, "amqp"),
        ("mqtt_routes", config.mqtt_routes, "mqtt"),
    ):
        for i, route in enumerate(routes):
            target = by_name.get(route.connector)
            if target is None:
                known = ", ".join(sorted(repr(n) for n in by_name)) or "none defined"
                problems.append(
                    (
                        (section, i, "connector"),
                        f"no connector named {route.connector!r} (known: {known})",
                    )
                )
            elif target.protocol != protocol:
                problems.append(
                    (
                        (section, i, "connector"),
                        f"connector {route.connector!r} speaks {target.protocol}, "
                        f"{section} need a {protocol} connector",
                    )
                )

    seen_routes: list[tuple[Loc, str, str, str]] = []
    for i, link_route in enumerate(config.link_routes):
        address = link_route.address.strip("/")
        for _, kind, other_address, other_direction in seen_routes:
            overlap = "both" in (link_route.direction, other_direction) or (
                link_route.direction == other_direction
            )
            if kind == link_route.kind and other_address == address and overlap:
                problems.append(
                    (
                        ("link_routes", i, link_route.kind),
                        f"duplicate route for {link_route.kind} {link_route.address!r} "
                        f"(direction {link_route.direction} overlaps {other_direction})",
                    )
                )
                break
        seen_routes.append((("link_routes", i), link_route.kind, address, link_route.direction))

    seen_hubs: set[str] = set()
    seen_usernames: set[str] = set()
    for i, mqtt_route in enumerate(config.mqtt_routes):
        if mqtt_route.username is not None:
            if mqtt_route.username in seen_usernames:
                problems.append(
                    (
                        ("mqtt_routes", i, "username"),
                        f"duplicate route for username {mqtt_route.username!r}",
                    )
                )
            seen_usernames.add(mqtt_route.username)
            continue
        hub = (mqtt_route.hub or "*").lower()
        if hub in seen_hubs:
            problems.append(
                ((("mqtt_routes", i, "hub")), f"duplicate route for hub {mqtt_route.hub!r}")
            )
        seen_hubs.add(hub)
    problems.extend(_store_opt_ins(config))
    return problems


def _store_opt_ins(config: GatewayConfig) -> list[tuple[Loc, str]]:
    """``store_and_forward: true`` on a credential needs the top-level section."""
    if config.store_and_forward is not None or config.credentials is None:
        return []
    problems: list[tuple[Loc, str]] = []
    for section, entries in (
        ("devices", config.credentials.devices),
        ("groups", config.credentials.groups),
    ):
        for i, entry in enumerate(entries):
            if entry.store_and_forward:
                problems.append(
                    (
                        ("credentials", section, i, "store_and_forward"),
                        "store_and_forward: true needs the top-level store_and_forward: "
                        "section (at least its path)",
                    )
                )
    return problems


def _no_profile(name: str, profiles: dict[str, TlsProfile]) -> str:
    known = ", ".join(sorted(repr(n) for n in profiles)) or "none defined"
    return f"no tls_profile named {name!r} (known: {known})"


def _binds_clash(a: HostPort, b: HostPort) -> bool:
    if a.port != b.port or a.port == 0:  # port 0 = an ephemeral port each time
        return False
    if a.host == b.host:
        return True
    # A wildcard bind takes the port on every address of its family.
    if a.is_wildcard or b.is_wildcard:
        return (":" in a.host) == (":" in b.host)
    return False


def export_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (what config/schema.json holds)."""
    schema = GatewayConfig.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "iot-gateway configuration"
    return schema
