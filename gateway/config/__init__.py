"""Configuration: YAML file -> validated, typed settings (no I/O beyond reading the file).

Errors carry ``file:line: key.path: message`` so an operator can fix them
without reading code.
"""

from __future__ import annotations

from gateway.config.credentials import (
    CredentialsSection,
    DeviceCredentialConfig,
    GroupCredentialConfig,
    KeyRef,
)
from gateway.config.durations import Duration, parse_duration
from gateway.config.hostport import HostPort
from gateway.config.loader import ConfigError, load_config, parse_config_text
from gateway.config.model import (
    AdminSection,
    AmqpConnector,
    AmqpListener,
    Connector,
    GatewayConfig,
    GatewaySection,
    LinkRoute,
    Listener,
    LogSection,
    MqttConnector,
    MqttListener,
    MqttRoute,
    PoolSettings,
    ReconnectSettings,
    TlsProfile,
    export_schema,
)
from gateway.config.sizes import ByteSize, parse_size
from gateway.config.store import StoreAndForwardConfig, StoreAndForwardSection

__all__ = [
    "AdminSection",
    "AmqpConnector",
    "AmqpListener",
    "ByteSize",
    "ConfigError",
    "Connector",
    "CredentialsSection",
    "DeviceCredentialConfig",
    "Duration",
    "GatewayConfig",
    "GatewaySection",
    "GroupCredentialConfig",
    "HostPort",
    "KeyRef",
    "LinkRoute",
    "Listener",
    "LogSection",
    "MqttConnector",
    "MqttListener",
    "MqttRoute",
    "PoolSettings",
    "ReconnectSettings",
    "StoreAndForwardConfig",
    "StoreAndForwardSection",
    "TlsProfile",
    "export_schema",
    "load_config",
    "parse_config_text",
    "parse_duration",
    "parse_size",
]
