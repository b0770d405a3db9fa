"""Authentication helpers: IoT Hub SAS tokens (and, later, the credential store)."""

from __future__ import annotations

from gateway.auth.sas import (
    SasToken,
    SasTokenError,
    check_sas_token,
    device_resource_uri,
    generate_sas_token,
    parse_sas_token,
    verify_sas_token,
)

__all__ = [
    "SasToken",
    "SasTokenError",
    "check_sas_token",
    "device_resource_uri",
    "generate_sas_token",
    "parse_sas_token",
    "verify_sas_token",
]
