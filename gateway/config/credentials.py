"""The ``credentials:`` section: keys and certificates the gateway holds for devices.

Where a key comes from (``key:`` / ``group_key:``):

- a name in ``secrets_file`` (a YAML mapping ``name: base64-key``; the file
  must exist and be accessible by its owner only, mode 0600 or 0400);
- ``env:VAR``: the environment variable VAR holds the base64 key;
- an inline base64 key, only with ``allow_inline_secrets: true``, so keys do
  not end up in a config file that is shared, committed or world-readable.

A value that is not a name in ``secrets_file``, has no ``env:`` prefix and
decodes as base64 to 16 bytes or more is taken as an inline key.

Every entry also says how the device proves itself to the gateway (see
gateway.auth.local_auth): without that, holding a key would let any LAN host
act as the device. Resolved keys stay pydantic ``SecretStr`` values.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gateway.auth.local_auth import PasswordHash, PasswordHashError, parse_password_hash
from gateway.config.base import Loc, Network, Section, _str, errors_at, readable_file, resolve_file
from gateway.config.durations import Duration
from gateway.config.private_file import read_private_file
from gateway.config.yamlsource import YamlSourceError, load_yaml

DEFAULT_TOKEN_TTL = 3600.0
DEFAULT_RENEW_AT = 0.8
MIN_TOKEN_TTL = 1.0
INLINE_MIN_BYTES = 16  # IoT Hub symmetric keys are 16..64 bytes
ENV_PREFIX = "env:"

# IoT Hub device and module ids: up to 128 of these characters (case-sensitive).
ID_CHARS = r"[A-Za-z0-9\-.%_*?!(),:=@$']"
_ID_RE = re.compile(rf"^{ID_CHARS}{{1,128}}$")
IDENTITY_PATTERN = rf"^{ID_CHARS}{{1,128}}(/{ID_CHARS}{{1,128}})?$"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PRIVATE_MODE_MASK = 0o077
_MAX_SECRETS_FILE = 4 * 1024 * 1024


# --- identities and key references ---------------------------------------------------------


def split_identity(text: str) -> tuple[str, str | None]:
    """``dev1`` -> ("dev1", None); ``dev4/mod1`` -> ("dev4", "mod1"); ValueError otherwise."""
    device_id, sep, module_id = text.partition("/")
    if not _ID_RE.match(device_id) or (sep and not _ID_RE.match(module_id)):
        raise ValueError(
            f"invalid device id {text!r}: use DEVICE or DEVICE/MODULE, each 1-128 of "
            "letters, digits and - . % _ * ? ! ( ) , : = @ $ '"
        )
    return device_id, (module_id if sep else None)


def _identity(value: Any) -> str:
    text = _str(value)
    split_identity(text)
    return text


Identity = Annotated[
    str,
    PlainValidator(_identity),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": IDENTITY_PATTERN,
            "description": "device id, or DEVICE/MODULE for a module identity",
        }
    ),
]


def _id_pattern(value: Any) -> str:
    text = _str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    if "/" in text:
        raise ValueError(f"invalid id_pattern {text!r}: groups match device ids, which have no '/'")
    return text


IdPattern = Annotated[
    str,
    PlainValidator(_id_pattern),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "description": "device id glob: * any run of characters, ? one, [abc] a set",
        }
    ),
]

KeySource = Literal["secrets_file", "env", "inline"]


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Where a key comes from. ``value`` is resolved for secrets_file and inline
    keys; an ``env`` key is read from the environment when the store is built."""

    source: KeySource
    name: str | None  # the secret's name or the variable's; None for inline keys
    value: SecretStr | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        """Safe to show: ``secrets_file:dev1-key``, ``env:DEV4_KEY`` or ``inline``."""
        return "inline" if self.source == "inline" else f"{self.source}:{self.name}"


def check_key(text: str) -> str | None:
    """None if ``text`` is a usable base64 key, else what is wrong (never the key)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "not valid base64"
    if not raw:
        return "empty"
    return None


def _looks_inline(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) >= INLINE_MIN_BYTES
    except (binascii.Error, ValueError):
        return False


def resolve_key_ref(
    raw: str,
    *,
    secrets: Mapping[str, str] | None,
    secrets_path: Path | None,
    env: Mapping[str, str],
    allow_inline: bool,
) -> KeyRef:
    """Turn a ``key:`` value into a KeyRef; ValueError with an operator message otherwise."""
    text = raw.strip()
    if secrets is not None and text in secrets:
        problem = check_key(secrets[text])
        if problem:
            raise ValueError(f"secret {text!r} in {secrets_path}: {problem}")
        return KeyRef("secrets_file", text, SecretStr(secrets[text]))
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX) :]
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if name not in env:
            raise ValueError(f"environment variable {name} is not set")
        problem = check_key(env[name].strip())
        if problem:
            raise ValueError(f"environment variable {name}: {problem}")
        return KeyRef("env", name)
    if _looks_inline(text):
        if not allow_inline:
            raise ValueError(
                "inline keys are refused: put the key in secrets_file or an env: variable "
                "(or set credentials.allow_inline_secrets: true)"
            )
        return KeyRef("inline", None, SecretStr(text))
    if secrets_path is None:
        raise ValueError(
            "no secrets_file to look this key name up in: set credentials.secrets_file, "
            "or write env:VARIABLE"
        )
    # The value is not echoed: it may be a mistyped key rather than a name.
    known = sorted(secrets or ())
    listed = ", ".join(repr(n) for n in known[:10]) + (", ..." if len(known) > 10 else "")
    raise ValueError(f"no secret of that name in {secrets_path} (names there: {listed or 'none'})")


# --- the secrets file ----------------------------------------------------------------------


def read_secrets_file(path: Path) -> dict[str, str]:
    """Read ``name: base64-key`` pairs; refuse a file others may read (ValueError)."""
    data = read_private_file(path, label="secrets file ", max_bytes=_MAX_SECRETS_FILE)
    if len(data) > _MAX_SECRETS_FILE:
        raise ValueError(f"secrets file {path} is larger than {_MAX_SECRETS_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"secrets file {path} is not UTF-8 text") from None
    try:
        doc = load_yaml(text)
    except YamlSourceError as exc:
        # Only the line: the parser's message may quote part of a key.
        raise ValueError(f"{path}:{exc.line}: not valid YAML") from None
    if doc.data in (None, {}):
        return {}
    if not isinstance(doc.data, dict):
        raise ValueError(f"{path}:{doc.line_of(())}: expected a mapping name: base64-key")
    secrets: dict[str, str] = {}
    for name, value in doc.data.items():
        if not isinstance(value, str):
            line = doc.line_of((name,))
            raise ValueError(f"{path}:{line}: secret {str(name)!r} must be a base64 string")
        secrets[str(name)] = value.strip()
    return secrets


# --- entries -------------------------------------------------------------------------------


class LocalAuthFields(Section):
    """How a device proves itself to the gateway; at least one is required."""

    local_password_hash: SecretStr | None = Field(
        None,
        description="scrypt$N$r$p$salt$hash of the device's local password (AMQP SASL PLAIN "
        "or MQTT password); make one with: iot-gateway credentials hash-password",
    )
    allowed_addresses: list[Network] = Field(
        default_factory=list, description="source addresses / CIDRs the device connects from"
    )
    trust: Literal["network"] | None = Field(
        None, description="network = any host may act as this device (logged as a warning)"
    )

    @field_validator("local_password_hash", mode="after")
    @classmethod
    def _hash_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                parse_password_hash(value.get_secret_value())
            except PasswordHashError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def password_hash(self) -> PasswordHash | None:
        if self.local_password_hash is None:
            return None
        return parse_password_hash(self.local_password_hash.get_secret_value())

    def _local_auth_problems(self) -> list[tuple[Loc, str]]:
        has_other = self.local_password_hash is not None or bool(self.allowed_addresses)
        if self.trust == "network":
            if has_other:
                return [
                    (
                        ("trust",),
                        "trust: network cannot be combined with local_password_hash or "
                        "allowed_addresses (it would make them pointless); drop one",
                    )
                ]
            return []
        if not has_other:
            return [
                (
                    (),
                    "needs local authentication: local_password_hash, allowed_addresses, or "
                    "trust: network (otherwise any host on the network could act as this device)",
                )
            ]
        return []


class DeviceCredentialConfig(LocalAuthFields):
    """One device or module identity and its hub credential."""

    id: Identity
    key: SecretStr | None = Field(
        None,
        description="symmetric key: a name in secrets_file, env:VARIABLE, or (with "
        "allow_inline_secrets) an inline base64 key",
    )
    cert_file: Path | None = Field(None, description="X.509 device certificate (PEM)")
    key_file: Path | None = Field(
        None, description="private key of cert_file (PEM); mode 0600, like secrets_file"
    )
    store_and_forward: bool = Field(
        False,
        description="keep this device's telemetry while the hub is unreachable (needs the "
        "top-level store_and_forward: section)",
    )

    _key_ref: KeyRef | None = PrivateAttr(default=None)

    @field_validator("cert_file", mode="after")
    @classmethod
    def _cert_readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        return readable_file(value, (info.context or {}).get("base_dir"))

    @field_validator("key_file", mode="after")
    @classmethod
    def _key_private(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = readable_file(value, (info.context or {}).get("base_dir"))
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & _PRIVATE_MODE_MASK:
            raise ValueError(
                f"private key {path} is accessible by group or others (mode {mode:04o}); "
                f"chmod 600 {path}"
            )
        return path

    @model_validator(mode="after")
    def _one_credential(self) -> DeviceCredentialConfig:
        problems: list[tuple[Loc, str]] = []
        has_cert = self.cert_file is not None or self.key_file is not None
        if self.key is not None and has_cert:
            problems.append(
                (
                    ("cert_file" if self.cert_file else "key_file",),
                    "give either key (symmetric key) or cert_file + key_file (X.509), not both",
                )
            )
        elif self.key is None and not has_cert:
            problems.append(((), "needs key (symmetric key) or cert_file + key_file (X.509)"))
        elif has_cert and (self.cert_file is None or self.key_file is None):
            present, missing = (
                ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            )
            problems.append(((present,), f"{present} needs {missing} too"))
        problems.extend(self._local_auth_problems())
        if problems:
            raise errors_at("DeviceCredentialConfig", problems)
        return self

    @property
    def device_id(self) -> str:
        return split_identity(self.id)[0]

    @property
    def module_id(self) -> str | None:
        return split_identity(self.id)[1]

    @property
    def key_ref(self) -> KeyRef | None:
        """Where the symmetric key comes from (None for an X.509 entry)."""
        return self._key_ref


class GroupCredentialConfig(LocalAuthFields):
    """Devices whose keys derive from an enrollment group key (DPS symmetric key groups)."""

    id_pattern: IdPattern
    group_key: SecretStr = Field(
        description="enrollment group key: a name in secrets_file, env:VARIABLE, or (with "
        "allow_inline_secrets) an inline base64 key",
    )
    store_and_forward: bool = Field(
        False,
        description="keep this device's telemetry while the hub is unreachable (needs the "
        "top-level store_and_forward: section)",
    )

    _key_ref: KeyRef | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _local_auth(self) -> GroupCredentialConfig:
        problems = self._local_auth_problems()
        if problems:
            raise errors_at("GroupCredentialConfig", problems)
        return self

    @property
    def key_ref(self) -> KeyRef | None:
        return self._key_ref


class CredentialsSection(Section):
    """Credentials the gateway holds and uses on behalf of devices."""

    secrets_file: Path | None = Field(
        None, description="YAML mapping name: base64-key; must be mode 0600 (or 0400)"
    )
    devices: list[DeviceCredentialConfig] = Field(default_factory=list)
    groups: list[GroupCredentialConfig] = Field(
        default_factory=list, description="first matching id_pattern wins; devices entries first"
    )
    token_ttl: Duration = Field(DEFAULT_TOKEN_TTL, description="lifetime of issued SAS tokens")
    renew_at: float = Field(
        DEFAULT_RENEW_AT, gt=0, lt=1, description="renew a token at this fraction of its lifetime"
    )
    allow_inline_secrets: bool = Field(
        False, description="let key/group_key hold an inline base64 key"
    )

    @field_validator("secrets_file", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        return resolve_file(value, (info.context or {}).get("base_dir"))

    @field_validator("token_ttl", mode="after")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if value < MIN_TOKEN_TTL:
            raise ValueError(f"must be at least {MIN_TOKEN_TTL:g}s")
        return value

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> CredentialsSection:
        context = info.context or {}
        env: Mapping[str, str] | None = context.get("env")
        if env is None:
            env = os.environ
        problems: list[tuple[Loc, str]] = []
        secrets: dict[str, str] | None = None
        secrets_ok = True
        if self.secrets_file is not None:
            try:
                secrets = read_secrets_file(self.secrets_file)
            except ValueError as exc:
                problems.append((("secrets_file",), str(exc)))
                secrets_ok = False

        def resolve(raw: SecretStr, loc: Loc) -> KeyRef | None:
            text = raw.get_secret_value()
            if not secrets_ok and not text.strip().startswith(ENV_PREFIX):
                return None  # already reported at secrets_file
            try:
                return resolve_key_ref(
                    text,
                    secrets=secrets,
                    secrets_path=self.secrets_file,
                    env=env,
                    allow_inline=self.allow_inline_secrets,
                )
            except ValueError as exc:
                problems.append((loc, str(exc)))
                return None

        seen_ids: set[str] = set()
        for i, device in enumerate(self.devices):
            if device.id in seen_ids:
                problems.append((("devices", i, "id"), f"duplicate device id {device.id!r}"))
            seen_ids.add(device.id)
            if device.key is not None:
                device._key_ref = resolve(device.key, ("devices", i, "key"))
        seen_patterns: set[str] = set()
        for i, group in enumerate(self.groups):
            if group.id_pattern in seen_patterns:
                problems.append(
                    (("groups", i, "id_pattern"), f"duplicate id_pattern {group.id_pattern!r}")
                )
            seen_patterns.add(group.id_pattern)
            group._key_ref = resolve(group.group_key, ("groups", i, "group_key"))
        if problems:
            raise errors_at("CredentialsSection", problems)
        return self
