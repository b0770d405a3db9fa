from __future__ import annotations

import pytest

from gateway.router.identity import (
    PlainIdentity,
    audience_path,
    covers,
    identity_of_address,
    parse_plain_username,
    token_audience,
)


@pytest.mark.parametrize(
    ("address", "identity"),
    [
        ("devices/d1/messages/events", ("devices", "d1")),
        ("/devices/d1/messages/devicebound", ("devices", "d1")),
        ("amqps://h.azure-devices.net:5671/devices/d1/twin", ("devices", "d1")),
        ("devices/my%20dev/messages/events", ("devices", "my dev")),
        ("devices/d1/modules/m1/messages/events", ("devices", "d1", "modules", "m1")),
        # exactly the device or module path, nothing after it
        ("devices/d1", ("devices", "d1")),
        ("devices/d1/modules/m1", ("devices", "d1", "modules", "m1")),
        ("devices/d1/modules", ("devices", "d1")),
        ("devices", ("devices",)),
        ("devices/", ("devices",)),
        ("$cbs", None),
        ("messages/serviceBound/feedback", None),
    ],
)
def test_identity_of_address(address, identity) -> None:
    assert identity_of_address(address) == identity


def test_audience_and_coverage() -> None:
    assert audience_path("myhub.azure-devices.net/devices/d1") == ("devices", "d1")
    assert audience_path("amqps://myhub.azure-devices.net/devices/d1/") == ("devices", "d1")
    assert audience_path("myhub.azure-devices.net") == ()
    # every scheme, in any case, is dropped with the host
    for scheme in ("amqps://", "amqp://", "https://", "http://", "AMQP://", "HTTPS://", "Http://"):
        assert audience_path(f"{scheme}myhub.azure-devices.net/devices/d1") == ("devices", "d1")
    d1 = audience_path("h/devices/d1")
    assert covers(d1, ("devices", "d1"))
    assert covers(d1, ("devices", "d1", "modules", "m"))
    assert not covers(d1, ("devices", "d10"))
    assert not covers(d1, ("devices",))
    assert covers((), ("devices", "anything"))


def test_plain_usernames() -> None:
    assert parse_plain_username("dev1@sas.myhub") == PlainIdentity("dev1", None, "myhub")
    assert parse_plain_username("dev1/modules/m1@sas.myhub").path == (
        "devices",
        "dev1",
        "modules",
        "m1",
    )
    assert parse_plain_username("dev1/modules/m1@sas.myhub") == PlainIdentity("dev1", "m1", "myhub")
    # "@" is allowed in device ids: the realm is after the last one
    assert parse_plain_username("dev@1@sas.myhub") == PlainIdentity("dev@1", None, "myhub")
    for bad in ["dev1", "dev1@myhub", "iothubowner@sas.root.myhub", "@sas.h", "a/b@sas.h", "d@sas.",
                "d1/other/m1@sas.h", "/modules/m1@sas.h", "d1/modules/@sas.h", "a@b@h"]:  # fmt: skip
        assert parse_plain_username(bad) is None, bad


def test_token_audience() -> None:
    tok = (
        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdevice1"
        "&sig=gFSfLGMXDOvf906%2FiaX3KwzLLNFHgaFZyCbsGjxtd1Y%3D&se=1700000000"
    )
    assert token_audience(tok) == "myhub.azure-devices.net/devices/device1"
    assert token_audience("Bearer x") is None
    # "+" is a space (form encoding); a raw "=" in the value belongs to the value
    assert token_audience("SharedAccessSignature sig=x&sr=h%2Fdevices%2Fmy+dev&se=1") == (
        "h/devices/my dev"
    )
    assert token_audience("SharedAccessSignature sr=h/devices/d=1&sig=x") == "h/devices/d=1"
    assert token_audience("SharedAccessSignature sig=x&se=1") is None
