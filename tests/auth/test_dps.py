"""Group (enrollment) key derivation as the Device Provisioning Service does it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.dps import derive_device_key

from .conftest import FLEET_KEY

# Microsoft's DPS symmetric-key enrollment group example: group key, registration id, and
# the device key the article derives with openssl and PowerShell.
REGISTRATION_ID = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
DERIVED_KEY = "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="


def test_documented_example() -> None:
    assert derive_device_key(FLEET_KEY, REGISTRATION_ID) == DERIVED_KEY


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=16, max_size=64), st.text(min_size=1, max_size=128))
def test_matches_an_independent_computation(group_key: bytes, device_id: str) -> None:
    expected = base64.b64encode(
        hmac.HMAC(group_key, device_id.encode("utf-8"), digestmod="sha256").digest()
    ).decode()
    assert derive_device_key(base64.b64encode(group_key).decode(), device_id) == expected
    assert len(base64.b64decode(expected)) == hashlib.sha256().digest_size


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("device_id", [REGISTRATION_ID, "sensor-0042", "dev.with_odd:chars"])
def test_matches_openssl(device_id: str) -> None:
    hexkey = base64.b64decode(FLEET_KEY).hex()
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{hexkey}", "-binary"],
        input=device_id.encode(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert derive_device_key(FLEET_KEY, device_id) == base64.b64encode(done.stdout).decode()


@pytest.mark.parametrize(
    "key", ["not base64!", FLEET_KEY[:8] + "!" + FLEET_KEY[8:], FLEET_KEY[:8] + "\n" + FLEET_KEY[8:]]
)
def test_bad_group_key(key: str) -> None:
    """Characters outside the base64 alphabet are refused, not skipped."""
    with pytest.raises(ValueError, match="^the group key is not valid base64$"):
        derive_device_key(key, "dev1")


def test_registration_of_provisioning_user_names() -> None:
    from gateway.auth.dps import registration_of

    assert registration_of("0ne00A/registrations/sn-1/api-version=2019-03-31&x=y") == ("0ne00A", "sn-1")
    assert registration_of("0ne00A/registrations/sn-1") == ("0ne00A", "sn-1")  # AMQP SASL user
    assert registration_of("myhub.azure-devices.net/registrations/?api-version=1") is None
    assert registration_of("myhub.azure-devices.net/dev1/?api-version=1") is None
    assert registration_of("0ne00A/registrations/") is None
    assert registration_of(None) is None
    # the query is cut at its first "?"; the registration id is the third segment
    assert registration_of("0ne00A/registrations/sn-1?api-version=1?x") == ("0ne00A", "sn-1")
    assert registration_of("0ne00A/devices/sn-1") is None
    assert registration_of("/registrations/sn-1") is None
    # a hub's host name (dots) is not an ID scope, even with a registrations segment
    assert registration_of("myhub.azure-devices.net/registrations/sn-1") is None
    assert registration_of("0ne00A/registrations/sn.1") == ("0ne00A", "sn.1")


def test_registration_token_is_the_one_the_sdks_make() -> None:
    """sr = {scope}/registrations/{regId} percent-encoded, skn = registration, signed
    with the derived key (checked here with hmac, not with gateway.auth.sas)."""
    from urllib.parse import unquote

    from gateway.auth.tokens import issue_registration_token

    key = derive_device_key(FLEET_KEY, REGISTRATION_ID)
    issued = issue_registration_token(key, "0ne00A", REGISTRATION_ID, 1000.0, 60)
    fields = dict(p.split("=", 1) for p in issued.token.removeprefix("SharedAccessSignature ").split("&"))
    assert fields["sr"] == f"0ne00A%2Fregistrations%2F{REGISTRATION_ID}"
    assert (fields["skn"], fields["se"]) == ("registration", "1060")
    expected = hmac.new(base64.b64decode(key), f"{fields['sr']}\n1060".encode(), hashlib.sha256).digest()
    assert base64.b64decode(unquote(fields["sig"])) == expected
