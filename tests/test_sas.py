"""SAS tokens as IoT Hub computes them, and tokens never reaching the logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import re
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth.sas import (
    SasTokenError,
    check_sas_token,
    device_resource_uri,
    generate_sas_token,
    parse_sas_token,
    verify_sas_token,
)
from gateway.ops.logging import redact, setup_logging

# iothub-protocol.md section 1: key bytes 00..1f, se=1700000000.
KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
HOST = "myhub.azure-devices.net"
SE = 1700000000
DEVICE_SIG = "gFSfLGMXDOvf906/iaX3KwzLLNFHgaFZyCbsGjxtd1Y="
DEVICE_TOKEN = (
    "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdevice1"
    "&sig=gFSfLGMXDOvf906%2FiaX3KwzLLNFHgaFZyCbsGjxtd1Y%3D&se=1700000000"
)
MODULE_SIG = "AXjj7ZMV66oOI2zG1PugMgZ11Jn6WP2K6XWP9Wc2Z30="
LOWER_CASE_SIG = "iIyvul1z7xsjQDMXvGvUxZi+lqnXkFn5lOgyNrICYDM="

# Issue 2's CLI vector.
CLI_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
CLI_SIG = "wosmA3uJK9T0mdB5CIYn+sAVA2ODflnucuvNO5S6mbM="

# Characters IoT Hub allows in device ids besides letters and digits.
ID_SPECIALS = "-.%_*?!(),:=@$'"


def independent_sig(encoded_uri: str, key_b64: str, expiry: int) -> str:
    """The signature computed here from the documented formula, not by gateway code."""
    mac = hmac.new(base64.b64decode(key_b64), f"{encoded_uri}\n{expiry}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def fields_of(token: str) -> dict[str, str]:
    assert token.startswith("SharedAccessSignature ")
    body = token.removeprefix("SharedAccessSignature ")
    return dict(part.split("=", 1) for part in body.split("&"))


# --- worked vectors ------------------------------------------------------------------------------


def test_device_vector() -> None:
    uri = device_resource_uri(HOST, "device1")
    assert uri == "myhub.azure-devices.net/devices/device1"
    assert generate_sas_token(uri, KEY, SE) == DEVICE_TOKEN
    assert independent_sig("myhub.azure-devices.net%2Fdevices%2Fdevice1", KEY, SE) == DEVICE_SIG


def test_module_vector() -> None:
    uri = device_resource_uri(HOST, "device1", "mod1")
    assert uri == "myhub.azure-devices.net/devices/device1/modules/mod1"
    fields = fields_of(generate_sas_token(uri, KEY, SE))
    assert fields["sr"] == "myhub.azure-devices.net%2Fdevices%2Fdevice1%2Fmodules%2Fmod1"
    assert urllib.parse.unquote(fields["sig"]) == MODULE_SIG
    assert fields["se"] == str(SE)


def test_policy_vector_appends_skn_unsigned() -> None:
    token = generate_sas_token(device_resource_uri(HOST, "device1"), KEY, SE, policy_name="device")
    assert token == DEVICE_TOKEN + "&skn=device"
    parsed = parse_sas_token(token)
    assert parsed.skn == "device"
    assert verify_sas_token(token, KEY, now=SE - 1, audience=f"{HOST}/devices/device1")


def test_lower_case_encoding_verifies_as_sent() -> None:
    # The C SDK encodes "/" as %2f; the signature covers sr exactly as sent.
    token = (
        "SharedAccessSignature sr=myhub.azure-devices.net%2fdevices%2fdevice1"
        f"&sig={urllib.parse.quote_plus(LOWER_CASE_SIG)}&se={SE}"
    )
    assert verify_sas_token(token, KEY, now=SE - 10, audience=f"{HOST}/devices/device1")
    # ...and the upper-case signature does not verify the lower-case sr.
    forged = token.replace(
        urllib.parse.quote_plus(LOWER_CASE_SIG), urllib.parse.quote_plus(DEVICE_SIG)
    )
    with pytest.raises(SasTokenError) as info:
        check_sas_token(forged, KEY, now=SE - 10)
    assert info.value.reason == "signature"


def test_cli_vector() -> None:
    token = generate_sas_token(device_resource_uri(HOST, "dev1"), CLI_KEY, SE)
    fields = fields_of(token)
    assert fields["sig"] == urllib.parse.quote_plus(CLI_SIG)
    assert fields["sig"] == "wosmA3uJK9T0mdB5CIYn%2BsAVA2ODflnucuvNO5S6mbM%3D"
    assert fields["sr"] == "myhub.azure-devices.net%2Fdevices%2Fdev1"
    assert fields["se"] == "1700000000"


# --- independent computation, special characters ----------------------------------------------

device_ids = st.text(alphabet=st.sampled_from("abcXYZ019" + ID_SPECIALS), min_size=1, max_size=40)


@given(device_id=device_ids, module_id=st.none() | device_ids, expiry=st.integers(0, 2**40))
def test_matches_independent_computation(
    device_id: str, module_id: str | None, expiry: int
) -> None:
    uri = f"{HOST}/devices/{device_id}" + (f"/modules/{module_id}" if module_id else "")
    # The Python SDK's encoding (quote with no safe characters); equal to quote_plus for ids
    # that cannot contain spaces.
    encoded = urllib.parse.quote(uri, safe="")
    token = generate_sas_token(device_resource_uri(HOST, device_id, module_id), KEY, expiry)
    fields = fields_of(token)
    assert fields["sr"] == encoded
    assert "/" not in fields["sr"] and "&" not in fields["sr"] and "=" not in fields["sr"]
    assert urllib.parse.unquote(fields["sig"]) == independent_sig(encoded, KEY, expiry)
    assert fields["se"] == str(expiry)
    parsed = parse_sas_token(token)
    assert parsed.resource_uri == uri
    assert verify_sas_token(token, KEY, now=expiry - 1, audience=uri)


@pytest.mark.parametrize(
    ("device_id", "encoded"),
    [
        ("dev%1", "dev%251"),
        ("a&b=c", "a%26b%3Dc"),
        ("x+y", "x%2By"),
        ("$edgeHub", "%24edgeHub"),
        ("d@n:1", "d%40n%3A1"),
        ("(*)!'", "%28%2A%29%21%27"),
    ],
)
def test_special_characters_are_encoded(device_id: str, encoded: str) -> None:
    token = generate_sas_token(device_resource_uri(HOST, device_id), KEY, SE)
    expected_sr = f"myhub.azure-devices.net%2Fdevices%2F{encoded}"
    assert fields_of(token)["sr"] == expected_sr
    assert urllib.parse.unquote(fields_of(token)["sig"]) == independent_sig(expected_sr, KEY, SE)
    assert parse_sas_token(token).resource_uri.endswith("/" + device_id)


# --- parsing and verification -------------------------------------------------------------------


def test_parse_any_field_order_and_raw_sig() -> None:
    token = f"SharedAccessSignature se={SE}&skn=device&sig={DEVICE_SIG}&sr=myhub.azure-devices.net%2Fdevices%2Fdevice1"
    parsed = parse_sas_token(token)
    assert (parsed.sr, parsed.se, parsed.skn) == (
        "myhub.azure-devices.net%2Fdevices%2Fdevice1",
        SE,
        "device",
    )
    assert parsed.signature == DEVICE_SIG  # a raw "+" or "/" is base64, not a space
    assert verify_sas_token(token, KEY, now=SE - 1)
    assert DEVICE_SIG not in repr(parsed)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "not a SharedAccessSignature token"),
        ("sr=a&sig=b&se=1", "not a SharedAccessSignature token"),
        ("SharedAccessSignature sr=a&sig=b", "token lacks se"),
        ("SharedAccessSignature se=1", "token lacks sr, sig"),
        ("SharedAccessSignature sr=a&sig=b&se=soon", "token expiry (se) is not an integer"),
        ("SharedAccessSignature sr=a&sig=b&se=1&se=2", "duplicate token field 'se'"),
        ("SharedAccessSignature sr=a&sigb&se=1", "malformed token field 'sigb'"),
        ("SharedAccessSignature sr=a&sig=b&se=1&=x", "malformed token field ''"),
        # a field without "=" after all three: not silently ignored; long names are cut
        ("SharedAccessSignature sr=a&sig=b&se=1&abcdefghijklmnopqrstuvwxyz",
         "malformed token field 'abcdefghijklmnop'"),
        ("SharedAccessSignature sr=&sig=b&se=1", "token lacks sr"),
    ],
)
def test_parse_rejects_malformed(token: str, message: str) -> None:
    with pytest.raises(SasTokenError, match=f"^{re.escape(message)}$") as info:
        parse_sas_token(token)
    assert info.value.reason == "malformed"
    assert not verify_sas_token(token, KEY, now=0)


def test_verify_failures() -> None:
    audience = f"{HOST}/devices/device1"
    assert verify_sas_token(DEVICE_TOKEN, KEY, now=SE - 1, audience=audience)
    cases = {
        "expired": dict(token=DEVICE_TOKEN, key=KEY, now=SE, audience=audience),
        "signature": dict(token=DEVICE_TOKEN, key=CLI_KEY, now=SE - 1, audience=audience),
        "audience": dict(
            token=DEVICE_TOKEN, key=KEY, now=SE - 1, audience=f"{HOST}/devices/device10"
        ),
    }
    messages = {
        "expired": f"token expired at {SE}",
        "signature": "token signature does not match the key",
        "audience": "token resource (sr) does not cover the audience",
    }
    for reason, case in cases.items():
        with pytest.raises(SasTokenError, match=f"^{re.escape(messages[reason])}$") as info:
            check_sas_token(case["token"], case["key"], case["now"], case["audience"])
        assert info.value.reason == reason
        assert not verify_sas_token(case["token"], case["key"], case["now"], case["audience"])
    tampered = DEVICE_TOKEN.replace("device1", "device2")
    assert not verify_sas_token(tampered, KEY, now=SE - 1)
    # Clock skew allowance.
    assert verify_sas_token(DEVICE_TOKEN, KEY, now=SE + 100, skew=300)


def test_audience_scope_by_segment() -> None:
    hub_wide = generate_sas_token(f"{HOST}/devices", KEY, SE, policy_name="device")
    assert verify_sas_token(hub_wide, KEY, SE - 1, audience=f"{HOST}/devices/any")
    assert verify_sas_token(hub_wide, KEY, SE - 1, audience=f"{HOST.upper()}/devices/any")
    assert not verify_sas_token(hub_wide, KEY, SE - 1, audience=f"{HOST}/devicesX/any")
    assert not verify_sas_token(DEVICE_TOKEN, KEY, SE - 1, audience=f"{HOST}/devices/DEVICE1")
    assert verify_sas_token(DEVICE_TOKEN, KEY, SE - 1, audience=f"{HOST}/devices/device1/modules/m")


def test_token_for_another_hub_is_refused() -> None:
    """The same device path and a valid signature, but sr names another hub."""
    other = generate_sas_token("otherhub.azure-devices.net/devices/device1", KEY, SE)
    audience = f"{HOST}/devices/device1"
    with pytest.raises(SasTokenError, match="does not cover the audience") as info:
        check_sas_token(other, KEY, SE - 1, audience)
    assert info.value.reason == "audience"
    hub_wide = generate_sas_token("otherhub.azure-devices.net/devices", KEY, SE)
    assert not verify_sas_token(hub_wide, KEY, SE - 1, audience=audience)


def test_audience_slashes_and_edge_characters() -> None:
    """Leading and trailing slashes are not segments; other characters at the ends are."""
    trailing = generate_sas_token(f"{HOST}/devices/device1/", KEY, SE)
    assert verify_sas_token(trailing, KEY, SE - 1, audience=f"/{HOST}/devices/device1/")
    assert verify_sas_token(trailing, KEY, SE - 1, audience=f"{HOST}/devices/device1")
    # ids ending or starting in characters a careless strip would eat ("X", " ")
    for device_id in ("devX", "X", "dev "):
        token = generate_sas_token(f"{HOST}/devices/{device_id}", KEY, SE)
        assert verify_sas_token(token, KEY, SE - 1, audience=f"{HOST}/devices/{device_id}")
        assert not verify_sas_token(token, KEY, SE - 1, audience=f"{HOST}/devices/dev")
    spaced = generate_sas_token(f" {HOST}/devices/d", KEY, SE)
    assert not verify_sas_token(spaced, KEY, SE - 1, audience=f"{HOST}/devices/d")


@pytest.mark.parametrize(
    "key",
    [
        "not base64!",
        KEY[:8] + "!" + KEY[8:],  # one character outside the alphabet in a valid key
        KEY[:8] + " " + KEY[8:],
        KEY.rstrip("="),  # padding missing
    ],
)
def test_bad_key_is_a_value_error(key: str) -> None:
    with pytest.raises(ValueError, match="^the key is not valid base64$"):
        generate_sas_token("h/devices/d", key, SE)
    with pytest.raises(ValueError, match="^the key is not valid base64$"):
        check_sas_token(DEVICE_TOKEN, key, SE - 1)


# --- tokens never logged -----------------------------------------------------------------------


def test_redact() -> None:
    assert redact(DEVICE_TOKEN) == (
        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdevice1"
        "&sig=<redacted>&se=1700000000"
    )
    assert redact(redact(DEVICE_TOKEN)) == redact(DEVICE_TOKEN)
    assert redact("password=x&sig=abc%2B&se=1") == "password=x&sig=<redacted>&se=1"
    assert redact("nothing secret here") == "nothing secret here"
    quoted = f"attach properties {{'token': '{DEVICE_TOKEN}&skn=device'}}"
    assert "gFSfLGMX" not in redact(quoted) and "skn=device'}" in redact(quoted)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logged_token_does_not_appear(fmt: str, restore_root_logger: None) -> None:
    out = io.StringIO()
    setup_logging("debug", fmt, stream=out)
    logger = logging.getLogger("gateway.test")
    logger.info("put-token %s", DEVICE_TOKEN, extra={"token": DEVICE_TOKEN, "n": 3})
    logger.debug("raw sig=%s", "gFSfLGMXDOvf906%2FiaX3KwzLLNFHgaFZyCbsGjxtd1Y%3D")
    try:
        raise RuntimeError(f"hub refused {DEVICE_TOKEN}")
    except RuntimeError:
        logger.exception("failure")
    text = out.getvalue()
    assert "gFSfLGMX" not in text
    assert text.count("sig=<redacted>") >= 4
    if fmt == "json":
        entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert entries[0]["level"] == "info" and entries[0]["logger"] == "gateway.test"
        assert entries[0]["n"] == 3 and "ts" in entries[0] and "sig=<redacted>" in entries[0]["msg"]
        assert "exc" in entries[2]


def test_setup_logging_level_and_replacement(restore_root_logger: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("warning", "text", stream=first)
    setup_logging("info", "text", stream=second)
    logging.getLogger("gateway.test").info("hello %d", 5)
    logging.getLogger("gateway.test").debug("hidden")
    assert first.getvalue() == ""
    line = second.getvalue()
    assert line.rstrip().endswith("INFO gateway.test: hello 5") and "hidden" not in line
    with pytest.raises(ValueError):
        setup_logging("loud", "text")
    with pytest.raises(ValueError):
        setup_logging("info", "xml")
