"""AMQP 1.0 numeric constants: type constructor codes, descriptor codes, defaults.

Names follow the spec (OASIS AMQP 1.0, part 1 "Types", part 2 "Transport",
part 3 "Messaging", part 5 "Security").
"""

from __future__ import annotations

from enum import IntEnum


class TypeCode(IntEnum):
    """Primitive type constructor bytes (spec 1.6)."""

    DESCRIBED = 0x00
    NULL = 0x40
    BOOLEAN = 0x56
    BOOLEAN_TRUE = 0x41
    BOOLEAN_FALSE = 0x42
    UBYTE = 0x50
    USHORT = 0x60
    UINT = 0x70
    SMALLUINT = 0x52
    UINT0 = 0x43
    ULONG = 0x80
    SMALLULONG = 0x53
    ULONG0 = 0x44
    BYTE = 0x51
    SHORT = 0x61
    INT = 0x71
    SMALLINT = 0x54
    LONG = 0x81
    SMALLLONG = 0x55
    FLOAT = 0x72
    DOUBLE = 0x82
    DECIMAL32 = 0x74
    DECIMAL64 = 0x84
    DECIMAL128 = 0x94
    CHAR = 0x73
    TIMESTAMP = 0x83
    UUID = 0x98
    VBIN8 = 0xA0
    VBIN32 = 0xB0
    STR8 = 0xA1
    STR32 = 0xB1
    SYM8 = 0xA3
    SYM32 = 0xB3
    LIST0 = 0x45
    LIST8 = 0xC0
    LIST32 = 0xD0
    MAP8 = 0xC1
    MAP32 = 0xD1
    ARRAY8 = 0xE0
    ARRAY32 = 0xF0


# Canonical element type codes for Array.element_type: one per AMQP type, whatever
# width or compact constructor the bytes used. Decoding normalises to these.
ELEMENT_TYPES: dict[int, int] = {
    0x40: 0x40,
    0x41: 0x56,
    0x42: 0x56,
    0x56: 0x56,
    0x50: 0x50,
    0x60: 0x60,
    0x43: 0x70,
    0x52: 0x70,
    0x70: 0x70,
    0x44: 0x80,
    0x53: 0x80,
    0x80: 0x80,
    0x51: 0x51,
    0x61: 0x61,
    0x54: 0x71,
    0x71: 0x71,
    0x55: 0x81,
    0x81: 0x81,
    0x72: 0x72,
    0x82: 0x82,
    0x74: 0x74,
    0x84: 0x84,
    0x94: 0x94,
    0x73: 0x73,
    0x83: 0x83,
    0x98: 0x98,
    0xA0: 0xB0,
    0xB0: 0xB0,
    0xA1: 0xB1,
    0xB1: 0xB1,
    0xA3: 0xB3,
    0xB3: 0xB3,
    0x45: 0xD0,
    0xC0: 0xD0,
    0xD0: 0xD0,
    0xC1: 0xD1,
    0xD1: 0xD1,
    0xE0: 0xF0,
    0xF0: 0xF0,
}


class Descriptor(IntEnum):
    """Descriptor codes (domain 0x00000000) of the spec's composite types."""

    # transport performatives (2.7)
    OPEN = 0x10
    BEGIN = 0x11
    ATTACH = 0x12
    FLOW = 0x13
    TRANSFER = 0x14
    DISPOSITION = 0x15
    DETACH = 0x16
    END = 0x17
    CLOSE = 0x18
    ERROR = 0x1D
    # delivery states (3.4)
    RECEIVED = 0x23
    ACCEPTED = 0x24
    REJECTED = 0x25
    RELEASED = 0x26
    MODIFIED = 0x27
    # termini (3.5)
    SOURCE = 0x28
    TARGET = 0x29
    DELETE_ON_CLOSE = 0x2B
    DELETE_ON_NO_LINKS = 0x2C
    DELETE_ON_NO_MESSAGES = 0x2D
    DELETE_ON_NO_LINKS_OR_MESSAGES = 0x2E
    # transactions (4.5)
    COORDINATOR = 0x30
    DECLARE = 0x31
    DISCHARGE = 0x32
    DECLARED = 0x33
    TRANSACTIONAL_STATE = 0x34
    # SASL (5.3.3)
    SASL_MECHANISMS = 0x40
    SASL_INIT = 0x41
    SASL_CHALLENGE = 0x42
    SASL_RESPONSE = 0x43
    SASL_OUTCOME = 0x44
    # message sections (3.2)
    HEADER = 0x70
    DELIVERY_ANNOTATIONS = 0x71
    MESSAGE_ANNOTATIONS = 0x72
    PROPERTIES = 0x73
    APPLICATION_PROPERTIES = 0x74
    DATA = 0x75
    AMQP_SEQUENCE = 0x76
    AMQP_VALUE = 0x77
    FOOTER = 0x78


# Symbolic descriptor names, which the spec allows in place of the numeric code.
DESCRIPTOR_NAMES: dict[int, str] = {
    0x10: "amqp:open:list",
    0x11: "amqp:begin:list",
    0x12: "amqp:attach:list",
    0x13: "amqp:flow:list",
    0x14: "amqp:transfer:list",
    0x15: "amqp:disposition:list",
    0x16: "amqp:detach:list",
    0x17: "amqp:end:list",
    0x18: "amqp:close:list",
    0x1D: "amqp:error:list",
    0x23: "amqp:received:list",
    0x24: "amqp:accepted:list",
    0x25: "amqp:rejected:list",
    0x26: "amqp:released:list",
    0x27: "amqp:modified:list",
    0x28: "amqp:source:list",
    0x29: "amqp:target:list",
    0x2B: "amqp:delete-on-close:list",
    0x2C: "amqp:delete-on-no-links:list",
    0x2D: "amqp:delete-on-no-messages:list",
    0x2E: "amqp:delete-on-no-links-or-messages:list",
    0x30: "amqp:coordinator:list",
    0x31: "amqp:declare:list",
    0x32: "amqp:discharge:list",
    0x33: "amqp:declared:list",
    0x34: "amqp:transactional-state:list",
    0x40: "amqp:sasl-mechanisms:list",
    0x41: "amqp:sasl-init:list",
    0x42: "amqp:sasl-challenge:list",
    0x43: "amqp:sasl-response:list",
    0x44: "amqp:sasl-outcome:list",
    0x70: "amqp:header:list",
    0x71: "amqp:delivery-annotations:map",
    0x72: "amqp:message-annotations:map",
    0x73: "amqp:properties:list",
    0x74: "amqp:application-properties:map",
    0x75: "amqp:data:binary",
    0x76: "amqp:amqp-sequence:list",
    0x77: "amqp:amqp-value:*",
    0x78: "amqp:footer:map",
}
DESCRIPTOR_CODES: dict[str, int] = {name: code for code, name in DESCRIPTOR_NAMES.items()}


# Link settlement modes (2.8.2, 2.8.3)
SND_SETTLE_UNSETTLED = 0
SND_SETTLE_SETTLED = 1
SND_SETTLE_MIXED = 2
RCV_SETTLE_FIRST = 0
RCV_SETTLE_SECOND = 1

# Link roles (2.8.1)
ROLE_SENDER = False
ROLE_RECEIVER = True

# SASL outcome codes (5.3.3.6)
SASL_OK = 0
SASL_AUTH = 1
SASL_SYS = 2
SASL_SYS_PERM = 3
SASL_SYS_TEMP = 4

# Spec defaults (2.7.1, 2.7.2)
DEFAULT_MAX_FRAME_SIZE = 4294967295
DEFAULT_CHANNEL_MAX = 65535
DEFAULT_HANDLE_MAX = 4294967295
MESSAGE_FORMAT_AMQP = 0


class ErrorCondition:
    """Standard error condition symbols (2.8.15, 2.8.16, 2.8.17, 2.8.18)."""

    INTERNAL_ERROR = "amqp:internal-error"
    NOT_FOUND = "amqp:not-found"
    UNAUTHORIZED_ACCESS = "amqp:unauthorized-access"
    DECODE_ERROR = "amqp:decode-error"
    RESOURCE_LIMIT_EXCEEDED = "amqp:resource-limit-exceeded"
    NOT_ALLOWED = "amqp:not-allowed"
    INVALID_FIELD = "amqp:invalid-field"
    NOT_IMPLEMENTED = "amqp:not-implemented"
    RESOURCE_LOCKED = "amqp:resource-locked"
    PRECONDITION_FAILED = "amqp:precondition-failed"
    RESOURCE_DELETED = "amqp:resource-deleted"
    ILLEGAL_STATE = "amqp:illegal-state"
    FRAME_SIZE_TOO_SMALL = "amqp:frame-size-too-small"
    CONNECTION_FORCED = "amqp:connection:forced"
    FRAMING_ERROR = "amqp:connection:framing-error"
    CONNECTION_REDIRECT = "amqp:connection:redirect"
    WINDOW_VIOLATION = "amqp:session:window-violation"
    ERRANT_LINK = "amqp:session:errant-link"
    HANDLE_IN_USE = "amqp:session:handle-in-use"
    UNATTACHED_HANDLE = "amqp:session:unattached-handle"
    DETACH_FORCED = "amqp:link:detach-forced"
    TRANSFER_LIMIT_EXCEEDED = "amqp:link:transfer-limit-exceeded"
    MESSAGE_SIZE_EXCEEDED = "amqp:link:message-size-exceeded"
    LINK_REDIRECT = "amqp:link:redirect"
    LINK_STOLEN = "amqp:link:stolen"
