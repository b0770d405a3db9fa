"""CredentialStore: lookup order, env keys, local auth with caching, tokens, descriptions."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import local_auth
from gateway.auth.clock import BUILD_EPOCH
from gateway.auth.credentials import CredentialError, CredentialStore
from gateway.auth.dps import derive_device_key
from gateway.auth.local_auth import hash_password
from gateway.auth.sas import verify_sas_token

from .conftest import ALL_KEYS, DEV1_KEY, DEV2_KEY, ENV_KEY, FLEET_KEY, HUB, ConfigParser

PASSWORD = "dev2-local-password"
PASSWORD_HASH = hash_password(PASSWORD, n=2**4, r=1, p=1)
# A set clock: no token is issued before the build date (gateway.auth.clock).
NOW = BUILD_EPOCH + 1_000_000.0


@pytest.fixture
def config_text(tmp_path: Path, secrets_path: Path) -> str:
    for name in ("dev3.pem", "dev3.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    return f"""
        credentials:
          secrets_file: secrets.yaml
          token_ttl: 10m
          renew_at: 0.75
          devices:
            - {{id: dev1, key: dev1-key, trust: network}}
            - {{id: dev2, key: dev2-key, local_password_hash: "{PASSWORD_HASH}", allowed_addresses: ["192.168.1.0/24", "fd00::/8"]}}
            - {{id: dev3, cert_file: dev3.pem, key_file: dev3.key, allowed_addresses: ["192.168.1.7"]}}
            - {{id: dev4/mod1, key: env:DEV4_KEY, trust: network}}
            - {{id: sensor-special, key: dev2-key, trust: network}}
          groups:
            - {{id_pattern: "sensor-*", group_key: fleet-key, local_password_hash: "{PASSWORD_HASH}"}}
            - {{id_pattern: "*", group_key: dev1-key, allowed_addresses: ["10.0.0.0/8"]}}
        """


@pytest.fixture
def store(parse: ConfigParser, config_text: str) -> CredentialStore:
    config = parse(config_text, env={"DEV4_KEY": ENV_KEY})
    return CredentialStore.from_config(config.credentials, env={"DEV4_KEY": ENV_KEY})


def test_empty_store() -> None:
    store = CredentialStore.from_config(None)
    assert len(store) == 0 and store.lookup("dev1") is None and store.describe() == []
    assert store.warnings() == [] and store.token_ttl == 3600 and store.renew_at == 0.8


def test_lookup_exact_module_and_groups(store: CredentialStore) -> None:
    dev1 = store.lookup("dev1")
    assert dev1 is not None and (dev1.kind, dev1.identity, dev1.entry) == (
        "key",
        "dev1",
        "devices[0]",
    )
    assert dev1.key is not None and dev1.key.get_secret_value() == DEV1_KEY
    dev3 = store.lookup("dev3")
    assert dev3 is not None and dev3.kind == "x509" and not dev3.uses_token
    assert dev3.key is None and dev3.cert_file is not None and dev3.cert_file.name == "dev3.pem"
    assert dev3.key_file is not None and dev3.key_file.name == "dev3.key"
    assert (dev3.entry, dev3.module_id) == ("devices[2]", None)
    mod = store.lookup("dev4", "mod1")
    assert mod is not None and mod.identity == "dev4/mod1" and mod.module_id == "mod1"
    assert mod.key is not None and mod.key.get_secret_value() == ENV_KEY
    assert store.lookup_identity("dev4/mod1") == mod
    assert store.lookup("dev4") is not None  # the catch-all group, not the module entry
    assert store.lookup("dev4").kind == "group"  # type: ignore[union-attr]
    assert store.lookup("dev1", "mod9") is None  # groups never apply to modules
    assert store.lookup_identity("a/b/c") is None and store.lookup_identity("a/") is None
    # An exact entry wins over a matching group.
    special = store.lookup("sensor-special")
    assert special is not None and special.kind == "key"
    assert special.key is not None and special.key.get_secret_value() == DEV2_KEY
    # Groups in order: the first matching pattern derives the key.
    sensor = store.lookup("sensor-0042")
    assert sensor is not None and (sensor.kind, sensor.entry) == ("group", "groups[0]")
    assert sensor.source == "group sensor-* (secrets_file:fleet-key)"
    assert sensor.module_id is None and sensor.local.password_hash is not None
    assert sensor.key is not None
    assert sensor.key.get_secret_value() == derive_device_key(FLEET_KEY, "sensor-0042")
    other = store.lookup("pump-7")
    assert other is not None and other.entry == "groups[1]"
    assert other.key.get_secret_value() == derive_device_key(DEV1_KEY, "pump-7")  # type: ignore[union-attr]
    assert store.lookup("Sensor-1").entry == "groups[1]"  # type: ignore[union-attr]  # case-sensitive


def test_store_reads_env_keys_from_the_env_it_is_given(
    parse: ConfigParser, config_text: str
) -> None:
    config = parse(config_text, env={"DEV4_KEY": ENV_KEY})
    store = CredentialStore.from_config(config.credentials, env={"DEV4_KEY": DEV2_KEY})
    assert store.lookup("dev4", "mod1").key.get_secret_value() == DEV2_KEY  # type: ignore[union-attr]
    with pytest.raises(CredentialError) as info:
        CredentialStore.from_config(config.credentials, env={})
    assert str(info.value) == "credentials.devices[3].key: environment variable DEV4_KEY is not set"


def test_local_auth(store: CredentialStore) -> None:
    dev2 = store.lookup("dev2")
    assert dev2 is not None
    assert store.authenticate_local(dev2, "192.168.1.9", PASSWORD).ok
    assert store.authenticate_local(dev2, "fd00::9", PASSWORD.encode()).ok
    assert store.authenticate_local(dev2, "::ffff:192.168.1.9", PASSWORD).ok
    wrong = store.authenticate_local(dev2, "192.168.1.9", "letmein")
    assert not wrong.ok and wrong.reason == "dev2: wrong password"
    assert not store.authenticate_local(dev2, "192.168.1.9", None).ok
    far = store.authenticate_local(dev2, "192.168.2.9", PASSWORD)
    assert not far.ok and far.reason == "dev2: address 192.168.2.9 not in allowed_addresses"
    dev3 = store.lookup("dev3")
    assert store.authenticate_local(dev3, "192.168.1.7", None).ok  # type: ignore[arg-type]
    assert not store.authenticate_local(dev3, "192.168.1.8", None).ok  # type: ignore[arg-type]
    dev1 = store.lookup("dev1")
    assert store.authenticate_local(dev1, "203.0.113.1", None).ok  # type: ignore[arg-type]
    sensor = store.lookup("sensor-1")
    assert store.authenticate_local(sensor, "203.0.113.1", PASSWORD).ok  # type: ignore[arg-type]
    assert not store.authenticate_local(sensor, "203.0.113.1", "nope").ok  # type: ignore[arg-type]


def test_successful_password_check_is_cached(
    store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(local_auth.hashlib, "scrypt", counting)
    dev2 = store.lookup("dev2")
    assert dev2 is not None
    assert store.authenticate_local(dev2, "192.168.1.9", PASSWORD).ok
    assert store.authenticate_local(dev2, "192.168.1.10", PASSWORD).ok
    assert len(calls) == 1
    # A different password is checked for real, every time, and refused.
    assert not store.authenticate_local(dev2, "192.168.1.9", PASSWORD + "x").ok
    assert not store.authenticate_local(dev2, "192.168.1.9", PASSWORD + "x").ok
    assert len(calls) == 3
    # The cache never bypasses the address check.
    assert not store.authenticate_local(dev2, "10.9.9.9", PASSWORD).ok
    # Another identity sharing the hash is verified on its own.
    sensor = store.lookup("sensor-9")
    assert store.authenticate_local(sensor, "1.2.3.4", PASSWORD).ok  # type: ignore[arg-type]
    assert len(calls) == 4


def test_issue_token(store: CredentialStore) -> None:
    for identity, key in [("dev1", DEV1_KEY), ("dev4/mod1", ENV_KEY)]:
        entry = store.lookup_identity(identity)
        assert entry is not None
        issued = store.issue_token(entry, HUB, NOW)
        assert issued.expires_at == NOW + 600 and issued.audience == f"{HUB}/devices/" + (
            "dev4/modules/mod1" if "/" in identity else identity
        )
        assert verify_sas_token(issued.token, key, NOW + 599, issued.audience)
    sensor = store.lookup("sensor-77")
    issued = store.issue_token(sensor, HUB, NOW)  # type: ignore[arg-type]
    assert verify_sas_token(
        issued.token, derive_device_key(FLEET_KEY, "sensor-77"), NOW, f"{HUB}/devices/sensor-77"
    )
    with pytest.raises(
        CredentialError, match=r"^dev3 authenticates with an X\.509 certificate, not a SAS token$"
    ):
        store.issue_token(store.lookup("dev3"), HUB, NOW)  # type: ignore[arg-type]
    sched = store.renewal_schedule()
    assert (sched.ttl, sched.renew_at) == (600, 0.75)


def test_derived_key_is_accepted_by_an_independent_verifier(store: CredentialStore) -> None:
    """The emulator's own SAS code (written apart from gateway.auth) accepts a token
    made with a group-derived key."""
    hubsim_sas = pytest.importorskip("gateway.hubsim.sas")
    if not all(hasattr(hubsim_sas, n) for n in ("parse_token", "signature_ok")):
        pytest.skip("hubsim SAS verifier not available")
    issued = store.issue_token(store.lookup("sensor-5"), HUB, NOW)  # type: ignore[arg-type]
    parsed = hubsim_sas.parse_token(issued.token)
    assert hubsim_sas.signature_ok(parsed, derive_device_key(FLEET_KEY, "sensor-5"))
    assert not hubsim_sas.signature_ok(parsed, FLEET_KEY)


def test_describe_and_reprs_never_show_secrets(
    store: CredentialStore, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    rows = store.describe()
    keys = ("id", "kind", "source", "local_auth", "entry")
    assert [{k: r[k] for k in keys} for r in rows] == [dict(zip(keys, row, strict=True)) for row in [
        ("dev1", "key", "secrets_file:dev1-key", "trust: network", "devices[0]"),
        ("dev2", "key", "secrets_file:dev2-key", "password + from 192.168.1.0/24,fd00::/8",
         "devices[1]"),
        ("dev3", "x509", f"cert {tmp_path / 'dev3.pem'}", "from 192.168.1.7/32", "devices[2]"),
        ("dev4/mod1", "key", "env:DEV4_KEY", "trust: network", "devices[3]"),
        ("sensor-special", "key", "secrets_file:dev2-key", "trust: network", "devices[4]"),
        ("sensor-*", "group", "secrets_file:fleet-key", "password", "groups[0]"),
        ("*", "group", "secrets_file:dev1-key", "from 10.0.0.0/8", "groups[1]"),
    ]]  # fmt: skip
    assert len(store) == 7
    entries = [store.lookup_identity(i) for i in ("dev1", "dev2", "dev3", "dev4/mod1", "sensor-1")]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("store %r entries %r %s", store, entries, entries)
    text = repr(rows) + repr(store) + repr(entries) + str(entries) + caplog.text
    for secret in (*ALL_KEYS, derive_device_key(FLEET_KEY, "sensor-1"), PASSWORD_HASH, PASSWORD):
        assert secret not in text
    salt = PASSWORD_HASH.split("$")[4]
    assert salt not in text


def test_warnings_name_trusted_entries(store: CredentialStore) -> None:
    assert store.warnings() == [
        "credentials devices[0]: dev1 has trust: network; any host that can reach the gateway "
        "may act as this device",
        "credentials devices[3]: dev4/mod1 has trust: network; any host that can reach the "
        "gateway may act as this device",
        "credentials devices[4]: sensor-special has trust: network; any host that can reach the "
        "gateway may act as this device",
    ]


def test_module_certificates_groups_from_the_environment_and_trusted_groups(
    parse: ConfigParser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("m.pem", "m.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    text = f"""
        store_and_forward: {{path: {tmp_path / "store"}}}
        credentials:
          devices:
            - {{id: dev5/modA, cert_file: m.pem, key_file: m.key, trust: network,
               store_and_forward: true}}
            - {{id: dev6, key: env:DEV6, trust: network, store_and_forward: true}}
          groups:
            - {{id_pattern: "pump-*", group_key: env:FLEET, trust: network, store_and_forward: true}}
        """
    config = parse(text, env={"FLEET": FLEET_KEY, "DEV6": DEV1_KEY})
    # Without an env mapping the store reads the process environment.
    monkeypatch.setenv("FLEET", FLEET_KEY)
    monkeypatch.setenv("DEV6", DEV1_KEY)
    store = CredentialStore.from_config(config.credentials)
    module = store.lookup("dev5", "modA")
    assert module is not None and (module.kind, module.identity) == ("x509", "dev5/modA")
    pump = store.lookup("pump-1")
    assert pump is not None and pump.source == "group pump-* (env:FLEET)"
    # store-and-forward is each entry's own choice, carried to what lookup returns
    assert [e.store_and_forward for e in (module, store.lookup("dev6"), pump)] == [True] * 3
    assert [r["store_and_forward"] for r in store.describe()] == [True] * 3
    assert pump.key is not None
    assert pump.key.get_secret_value() == derive_device_key(FLEET_KEY, "pump-1")
    assert store.warnings() == [
        "credentials devices[0]: dev5/modA has trust: network; any host that can reach the "
        "gateway may act as this device",
        "credentials devices[1]: dev6 has trust: network; any host that can reach the "
        "gateway may act as this device",
        "credentials groups[0]: devices matching 'pump-*' have trust: network; any host that "
        "can reach the gateway may act as them",
    ]
    with pytest.raises(CredentialError) as info:
        CredentialStore.from_config(config.credentials, env={"DEV6": DEV1_KEY})
    assert str(info.value) == "credentials.groups[0].group_key: environment variable FLEET is not set"


def test_unresolved_key_references() -> None:
    """A key the config loader did not resolve is an error naming the entry, not a crash."""
    from gateway.auth.credentials import _key_value
    from gateway.config.credentials import KeyRef

    with pytest.raises(CredentialError) as info:
        _key_value(None, {}, "devices[1].key")
    assert str(info.value) == "credentials.devices[1].key: key was not resolved"
    with pytest.raises(CredentialError) as info:
        _key_value(KeyRef("secrets_file", "k1"), {}, "devices[2].key")
    assert str(info.value) == "credentials.devices[2].key: key was not resolved"
    assert _key_value(KeyRef("env", "K"), {"K": f" {DEV1_KEY}\n"}, "x").get_secret_value() == DEV1_KEY


def test_issue_registration_token(store: CredentialStore) -> None:
    sensor = store.lookup("sensor-77")
    assert sensor is not None
    issued = store.issue_registration_token(sensor, "0ne00A", NOW)
    assert issued.audience == "0ne00A/registrations/sensor-77"
    assert issued.expires_at == NOW + 600 and issued.issued_at == NOW
    assert verify_sas_token(issued.token, derive_device_key(FLEET_KEY, "sensor-77"), NOW,
                            "0ne00A/registrations/sensor-77")  # fmt: skip
    assert "skn=registration" in issued.token
    for identity in ("dev3", "dev4/mod1"):
        entry = store.lookup_identity(identity)
        assert entry is not None
        with pytest.raises(CredentialError) as info:
            store.issue_registration_token(entry, "0ne00A", NOW)
        assert str(info.value) == (
            f"{identity} has no symmetric device key to sign a registration with"
        )
