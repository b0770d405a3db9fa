"""Store-and-forward's pure pieces on the router side: which addresses are telemetry,
the identity a store key stands for, and the meta kept beside each stored message."""

from __future__ import annotations

import pytest

from gateway.router.forwarder import key_identity
from gateway.router.local_link import Meta, decode_meta, encode_meta, telemetry_key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("devices/dev1/messages/events", "dev1"),
        ("/devices/dev1/messages/events", "dev1"),
        ("amqps://myhub.azure-devices.net/devices/dev1/messages/events", "dev1"),
        ("amqps://myhub.azure-devices.net:5671/devices/dev1/modules/m1/messages/events", "dev1/m1"),
        ("devices/dev%201/messages/events", "dev 1"),
        ("devices/dev1/messages/devicebound", None),
        ("devices/dev1/messages/events/extra", None),
        ("devices//messages/events", None),
        ("devices/dev1/modules//messages/events", None),
        ("$cbs", None),
        ("devices/dev1/twin", None),
    ],
)
def test_telemetry_key(address: str, key: str | None) -> None:
    assert telemetry_key(address) == key


def test_key_identity() -> None:
    assert key_identity("dev1") == ("devices", "dev1")
    assert key_identity("dev1/m1") == ("devices", "dev1", "modules", "m1")


def test_meta_round_trip() -> None:
    assert decode_meta(encode_meta(0x80013700, b"\x00tag\xff")) == Meta(0x80013700, b"\x00tag\xff")
    assert decode_meta(encode_meta(0, b"")) == Meta(0, b"")


@pytest.mark.parametrize("meta", [b"", b"not json", b"[]", b'{"format": "x"}', b'{"tag": "zz"}'])
def test_unreadable_meta_gets_defaults(meta: bytes) -> None:
    assert decode_meta(meta) == Meta(0, None)  # message-format 0, a fresh tag on replay
