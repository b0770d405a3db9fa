"""MQTT 5 properties: located and skipped on the relay path, decoded on request.

The relay forwards properties unchanged, so framing only needs the property
length. `decode_properties` validates and decodes a property block for the
few places that read a property (Server Keep Alive, Topic Alias) and for tests.
"""

from __future__ import annotations

from enum import IntEnum

from .errors import MalformedPacket
from .wire import Cursor


class PropertyType(IntEnum):
    BYTE = 1
    UINT16 = 2
    UINT32 = 3
    VARINT = 4
    UTF8 = 5
    BINARY = 6
    UTF8_PAIR = 7


class Property(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


PROPERTY_TYPES: dict[int, PropertyType] = {
    Property.PAYLOAD_FORMAT_INDICATOR: PropertyType.BYTE,
    Property.MESSAGE_EXPIRY_INTERVAL: PropertyType.UINT32,
    Property.CONTENT_TYPE: PropertyType.UTF8,
    Property.RESPONSE_TOPIC: PropertyType.UTF8,
    Property.CORRELATION_DATA: PropertyType.BINARY,
    Property.SUBSCRIPTION_IDENTIFIER: PropertyType.VARINT,
    Property.SESSION_EXPIRY_INTERVAL: PropertyType.UINT32,
    Property.ASSIGNED_CLIENT_IDENTIFIER: PropertyType.UTF8,
    Property.SERVER_KEEP_ALIVE: PropertyType.UINT16,
    Property.AUTHENTICATION_METHOD: PropertyType.UTF8,
    Property.AUTHENTICATION_DATA: PropertyType.BINARY,
    Property.REQUEST_PROBLEM_INFORMATION: PropertyType.BYTE,
    Property.WILL_DELAY_INTERVAL: PropertyType.UINT32,
    Property.REQUEST_RESPONSE_INFORMATION: PropertyType.BYTE,
    Property.RESPONSE_INFORMATION: PropertyType.UTF8,
    Property.SERVER_REFERENCE: PropertyType.UTF8,
    Property.REASON_STRING: PropertyType.UTF8,
    Property.RECEIVE_MAXIMUM: PropertyType.UINT16,
    Property.TOPIC_ALIAS_MAXIMUM: PropertyType.UINT16,
    Property.TOPIC_ALIAS: PropertyType.UINT16,
    Property.MAXIMUM_QOS: PropertyType.BYTE,
    Property.RETAIN_AVAILABLE: PropertyType.BYTE,
    Property.USER_PROPERTY: PropertyType.UTF8_PAIR,
    Property.MAXIMUM_PACKET_SIZE: PropertyType.UINT32,
    Property.WILDCARD_SUBSCRIPTION_AVAILABLE: PropertyType.BYTE,
    Property.SUBSCRIPTION_IDENTIFIER_AVAILABLE: PropertyType.BYTE,
    Property.SHARED_SUBSCRIPTION_AVAILABLE: PropertyType.BYTE,
}

PropertyValue = int | str | bytes | tuple[str, str]


def skip_properties(cursor: Cursor, what: str) -> tuple[int, int]:
    """Skip a property block (length + properties); return its contents' (start, end)."""
    length = cursor.varint(f"{what} property length")
    start = cursor.pos
    cursor.skip(length, f"{what} properties")
    return start, cursor.pos


def decode_properties(
    data: bytes | memoryview, start: int, end: int
) -> list[tuple[int, PropertyValue]]:
    """Decode the properties in `data[start:end]` (the block's contents, after its length)."""
    cursor = Cursor(data, start, end)
    out: list[tuple[int, PropertyValue]] = []
    while cursor.remaining:
        ident = cursor.varint("property identifier")
        kind = PROPERTY_TYPES.get(ident)
        if kind is None:
            raise MalformedPacket(f"unknown property identifier 0x{ident:02x}")
        value: PropertyValue
        if kind is PropertyType.BYTE:
            value = cursor.uint8("property")
        elif kind is PropertyType.UINT16:
            value = cursor.uint16("property")
        elif kind is PropertyType.UINT32:
            value = cursor.uint32("property")
        elif kind is PropertyType.VARINT:
            value = cursor.varint("property")
        elif kind is PropertyType.UTF8:
            value = cursor.utf8("property")
        elif kind is PropertyType.BINARY:
            value = cursor.binary("property")
        else:
            value = (cursor.utf8("user property name"), cursor.utf8("user property value"))
        out.append((ident, value))
    return out
