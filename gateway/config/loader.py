"""Load a YAML file into a GatewayConfig; every error as ``file:line: key.path: message``.

Every problem is reported in one pass: when some entries fail their own checks,
the cross-reference checks (names of connectors and TLS profiles, duplicate
names and routes, clashing binds) still run over the entries that passed, and
a reference to an entry already reported is not reported again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

import gateway.config.credentials as credentials
import gateway.config.model as model
from gateway.config.model import GatewayConfig
from gateway.config.placeholders import find_placeholders
from gateway.config.yamlsource import YamlDocument, YamlSourceError, load_yaml

_SECRET_WORDS = ("password", "secret", "token", "key")


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one readable line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, parse and validate a config file; raises ConfigError.

    ``env`` (default: the process environment) resolves ``env:VAR`` credential keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}:1: yaml: the file is not UTF-8 text"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    config = parse_config_text(text, str(path), env=env)
    config._source_path = path.absolute()
    return config


def parse_config_text(
    text: str,
    filename: str = "<config>",
    *,
    base_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Parse and validate YAML text. Relative file paths resolve against ``base_dir``
    (default: the directory of ``filename``)."""
    try:
        doc = load_yaml(text)
    except YamlSourceError as exc:
        raise ConfigError([f"{filename}:{exc.line}: yaml: {exc.message}"]) from None
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{filename}:{doc.line_of(())}: config: expected a mapping of sections"])
    if base_dir is None:
        base_dir = Path(filename).parent
    context = {"base_dir": Path(base_dir), "env": env}
    try:
        config = GatewayConfig.model_validate(doc.data, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        errors += _cross_reference_errors(errors, doc.data, context)
        raise ConfigError(_format_errors(errors, doc, filename)) from None
    config._placeholders = [
        _located(doc, filename, list(loc), message)
        for loc, message in find_placeholders(config, doc.data)
    ]
    return config


def _located(doc: YamlDocument, filename: str, loc: list[Any], message: str) -> str:
    found, shown = _locate(doc.data, loc)
    return f"{filename}:{doc.line_of(tuple(found))}: {_dotted(shown)}: {message}"


_LIST_SECTIONS = ("listeners", "connectors", "link_routes", "mqtt_routes")
# A key that names another entry -> the section that entry lives in.
_REFERENCES = {"connector": "connectors", "tls_profile": "tls_profiles"}


def _cross_reference_errors(
    errors: list[Any], data: Any, context: dict[str, Any]
) -> list[Any]:
    """The cross-reference errors of `data` once the entries with `errors` are left out
    (pydantic runs them only when every field is valid), located in the original."""
    if not isinstance(data, dict):
        return []
    dropped: dict[str, set[Any]] = {}
    for error in errors:
        loc = error["loc"]
        if not loc:
            return []
        if (loc[0] in _LIST_SECTIONS and len(loc) > 1 and isinstance(loc[1], int)) or (
            loc[0] == "tls_profiles" and len(loc) > 1
        ):
            dropped.setdefault(loc[0], set()).add(loc[1])
        else:
            dropped.setdefault("", set()).add(loc[0])  # a whole section
    pruned = dict(data)
    kept: dict[str, list[int]] = {}
    # Names of left-out entries: references to them are not errors of their own.
    gone: dict[str, set[str]] = {"connectors": set(), "tls_profiles": set()}
    for section in _LIST_SECTIONS:
        items = data.get(section)
        if section in dropped and isinstance(items, list):
            kept[section] = [i for i in range(len(items)) if i not in dropped[section]]
            pruned[section] = [items[i] for i in kept[section]]
            if section == "connectors":
                gone[section] |= {str(items[i].get("name")) for i in dropped[section]
                                  if isinstance(items[i], dict)}  # fmt: skip
    profiles = data.get("tls_profiles")
    if "tls_profiles" in dropped and isinstance(profiles, dict):
        pruned["tls_profiles"] = {k: v for k, v in profiles.items() if k not in dropped["tls_profiles"]}
        gone["tls_profiles"] |= {str(k) for k in dropped["tls_profiles"]}
    all_profiles_gone = False
    for section in dropped.get("", ()):
        # An invalid admin section must not make its default address clash with a listener.
        if section == "admin":
            pruned["admin"] = {"enabled": False}
        else:
            pruned.pop(section, None)
            all_profiles_gone |= section == "tls_profiles"
    try:
        GatewayConfig.model_validate(pruned, context=context)
    except ValidationError as again:
        found = []
        for error in again.errors(include_url=False):
            loc = list(error["loc"])
            if len(loc) > 1 and loc[0] in kept and isinstance(loc[1], int):
                loc[1] = kept[loc[0]][loc[1]]
            section = _REFERENCES.get(str(loc[-1])) if loc else None
            if section is not None:
                value = _value_at(data, loc)
                if str(value) in gone[section] or (section == "tls_profiles" and all_profiles_gone):
                    continue
                error = {**error, "msg": _known_again(str(error["msg"]), data.get(section))}
            found.append({**error, "loc": tuple(loc)})
        return found
    return []


def _known_again(message: str, entries: Any) -> str:
    """``(known: ...)`` listing every entry of the file, the left-out ones too."""
    head, sep, _ = message.partition(" (known: ")
    if not sep:
        return message
    if isinstance(entries, dict):
        names = [str(name) for name in entries]
    elif isinstance(entries, list):
        names = [str(e["name"]) for e in entries if isinstance(e, dict) and "name" in e]
    else:
        names = []
    return f"{head} (known: {', '.join(sorted({repr(n) for n in names})) or 'none defined'})"


def _value_at(data: Any, loc: list[Any]) -> Any:
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node


def _format_errors(errors: list[Any], doc: YamlDocument, filename: str) -> list[str]:
    lines: list[tuple[int, str]] = []
    for error in errors:
        loc = list(error["loc"])
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("protocol")
        found, shown = _locate(doc.data, loc)
        line = doc.line_of(tuple(found))
        lines.append((line, f"{filename}:{line}: {_dotted(shown)}: {_message(error, shown)}"))
    lines.sort(key=lambda item: item[0])
    unique: list[str] = []
    for _, text in lines:
        if text not in unique:
            unique.append(text)
    return unique


# Tags of callable-discriminated unions (gateway.config.model.ProxySetting): not YAML keys.
_HIDDEN_TAGS = frozenset({"proxy_settings", "proxy_keyword"})


def _locate(data: Any, loc: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split a pydantic location into the part present in the YAML and the shown key path.

    Discriminated unions add the tag (``amqp``/``mqtt``) after a list index and
    dict keys that fail validation add ``[key]``; neither is a YAML key.
    """
    found: list[Any] = []
    shown: list[Any] = []
    node: Any = data
    present = True
    previous: Any = None
    for part in loc:
        if part == "[key]" or part in _HIDDEN_TAGS:
            continue
        if (
            present
            and isinstance(previous, int)
            and isinstance(node, dict)
            and node.get("protocol") == part
        ):
            previous = part
            continue
        shown.append(part)
        if present and isinstance(node, dict) and part in node:
            found.append(part)
            node = node[part]
        elif present and isinstance(node, list) and isinstance(part, int) and part < len(node):
            found.append(part)
            node = node[part]
        else:
            present = False
        previous = part
    return found, shown


def _dotted(path: list[Any]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "config"


def _message(error: Any, shown: list[Any]) -> str:
    kind = error["type"]
    msg: str = error["msg"]
    value = error.get("input")
    key = str(shown[-1]) if shown else ""
    secret = any(word in key.lower() for word in _SECRET_WORDS)
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(key, shown)
    if kind == "union_tag_not_found":
        return "required key is missing (amqp or mqtt)"
    if kind == "union_tag_invalid":
        return f"must be 'amqp' or 'mqtt', got {error['ctx']['tag']!r}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "dataclass_type"):
        msg = "must be a mapping (key: value)"
    elif kind == "list_type":
        msg = "must be a list"
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    if msg.startswith("Assertion failed, "):
        return msg[len("Assertion failed, ") :]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be ") :]
    elif msg.startswith("Input "):
        msg = msg[len("Input ") :]
    if kind != "config" and not secret and isinstance(value, str | int | float | bool):
        msg += f", got {value!r}"
    return msg


_PROTOCOL_VARIANTS = {
    "listeners": {"amqp": model.AmqpListener, "mqtt": model.MqttListener},
    "connectors": {"amqp": model.AmqpConnector, "mqtt": model.MqttConnector},
}


def _unknown_key(key: str, shown: list[Any]) -> str:
    variants = _PROTOCOL_VARIANTS.get(shown[0]) if len(shown) == 3 else None
    if variants:
        owners = [proto for proto, cls in variants.items() if key in cls.model_fields]
        if owners:
            return f"unknown key: {key!r} is only valid for protocol {owners[0]}"
    import difflib  # only for an unknown key's hint

    hint = difflib.get_close_matches(key, _known_keys(), n=1)
    if hint and hint[0] != key:
        return f"unknown key (did you mean {hint[0]!r}?)"
    return "unknown key"


_KNOWN_KEYS: list[str] = []


def _known_keys() -> list[str]:
    if not _KNOWN_KEYS:
        for obj in [*vars(model).values(), *vars(credentials).values()]:
            if isinstance(obj, type) and issubclass(obj, BaseModel):
                _KNOWN_KEYS.extend(k for k in obj.model_fields if k not in _KNOWN_KEYS)
    return _KNOWN_KEYS
