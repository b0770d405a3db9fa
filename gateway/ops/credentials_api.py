"""What /api/credentials shows: the credential store's entries, each with the
tokens the AMQP router currently holds under it.

One row per entry (``id``, ``kind``, ``source``, ``local_auth``, ``entry``,
from `CredentialStore.describe`) plus ``tokens``: the router's live token
state for identities that entry covers (device connection, identity, upstream
connection, seconds to expiry, renewal failures; from
`GatewayTokens.describe`). Never a key, token or password.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["credential_rows", "credentials_snapshot"]


def credential_rows(store: Any, tokens: Any) -> list[dict[str, Any]]:
    """The rows for `store` (a `CredentialStore`) and `tokens` (the router's
    `GatewayTokens`, or None)."""
    rows = [dict(row, tokens=[]) for row in store.describe()]
    if tokens is None:
        return rows
    by_entry = {row["entry"]: row for row in rows}
    for held in tokens.describe():
        entry = _entry_of(store, str(held.get("identity", "")))
        row = by_entry.get(entry) if entry is not None else None
        if row is not None:
            row["tokens"].append(held)
    return rows


def _entry_of(store: Any, identity: str) -> str | None:
    """The config entry (``devices[0]``) of an identity, ``dev1`` or ``dev1/modules/m1``."""
    device_id, _, module_id = identity.partition("/modules/")
    found = store.lookup(device_id, module_id or None)
    return None if found is None else str(found.entry)


def credentials_snapshot(
    store: Callable[[], Any], tokens: Callable[[], Any]
) -> Callable[[], list[dict[str, Any]]]:
    """A snapshot function for `Registry.set_credentials` that reads the store and
    the router's tokens in force when asked (both change on reload)."""
    return lambda: credential_rows(store(), tokens())
