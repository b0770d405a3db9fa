"""The CBS messages the router reads, rewrites and writes, checked with python-qpid-proton.

Requests and replies are built and read back by proton (a stack we did not write), so a
field the gateway drops, renames or types wrongly shows up here whatever our own codec says.
"""

from __future__ import annotations

import pytest
from proton import Message as ProtonMessage
from proton import symbol, ulong

from gateway.amqp.errors import AMQPError
from gateway.router.cbs import (
    CBS_ADDRESS,
    PUT_TOKEN,
    SAS_TOKEN_TYPE,
    is_cbs_address,
    parse_reply,
    parse_request,
    put_token_message,
    restore_reply,
    rewrite_request,
    status_reply,
)

AUDIENCE = "myhub.azure-devices.net/devices/d1"
TOKEN = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fd1&sig=x&se=1"


def encoded(msg: ProtonMessage) -> bytes:
    return bytes(msg.encode())


def decoded(raw: bytes) -> ProtonMessage:
    msg = ProtonMessage()
    msg.decode(raw)
    return msg


def request(**props: object) -> bytes:
    msg = ProtonMessage(
        id="dev-msg-1",
        reply_to="cbs-reply",
        subject="s",
        properties={"operation": PUT_TOKEN, "type": SAS_TOKEN_TYPE, "name": AUDIENCE, **props},
        body=TOKEN,
    )
    return encoded(msg)


def test_is_cbs_address() -> None:
    assert is_cbs_address("$cbs") and is_cbs_address("$cbs/x")
    assert not is_cbs_address("$cbsx") and not is_cbs_address("x/$cbs") and not is_cbs_address("")


def test_parse_request() -> None:
    req = parse_request(memoryview(request()))
    assert (req.operation, req.audience) == ("put-token", AUDIENCE)
    assert req.properties.message_id == "dev-msg-1" and req.properties.reply_to == "cbs-reply"
    assert req.raw == request() and type(req.raw) is bytes
    # values that are not strings are read as their text; absent ones are None
    odd = parse_request(encoded(ProtonMessage(properties={"operation": symbol("put-token"),
                                                          "name": ulong(7)})))  # fmt: skip
    assert (odd.operation, odd.audience) == ("put-token", "7")
    bare = parse_request(encoded(ProtonMessage(body="x")))
    assert (bare.operation, bare.audience) == (None, None)
    # no properties section at all: read as an empty one
    no_props = parse_request(b"\x00\x53\x77\xa1\x01x")  # just an amqp-value "x"
    assert no_props.properties.message_id is None and no_props.operation is None


def test_parse_request_refuses_garbage() -> None:
    with pytest.raises(AMQPError):
        parse_request(b"\x00\x53\x73\xc0\xff")


def test_rewrite_request_changes_only_message_id_and_reply_to() -> None:
    req = parse_request(request())
    out = decoded(rewrite_request(req, "gw-1", "gw-reply"))
    assert (out.id, out.reply_to, out.subject) == ("gw-1", "gw-reply", "s")
    assert out.properties == {"operation": PUT_TOKEN, "type": SAS_TOKEN_TYPE, "name": AUDIENCE}
    assert out.body == TOKEN


def reply(status: object, description: object = "OK", **kw: object) -> bytes:
    props: dict[str, object] = {"status-code": status}
    if description is not None:
        props["status-description"] = description
    return encoded(ProtonMessage(correlation_id="gw-1", properties=props, **kw))  # type: ignore[arg-type]


def test_parse_reply() -> None:
    got = parse_reply(memoryview(reply(200)))
    assert (got.status, got.description) == (200, "OK") and got.raw == reply(200)
    assert got.properties.correlation_id == "gw-1"
    assert parse_reply(reply("401", symbol("Unauthorized"))).status == 401
    assert parse_reply(reply(401, symbol("Unauthorized"))).description == "Unauthorized"
    no_status = parse_reply(encoded(ProtonMessage(properties={"x": 1})))
    assert (no_status.status, no_status.description) == (None, None)
    assert parse_reply(reply("soon")).status is None
    assert parse_reply(reply([1])).status is None
    assert parse_reply(reply(404, None)).description is None


def test_restore_reply_gives_the_device_its_ids_back() -> None:
    hub = parse_reply(reply(200, address="gw-reply", subject="keep"))
    out = decoded(restore_reply(hub, "dev-msg-1", "cbs-reply", "gw-reply"))
    assert (out.correlation_id, out.address, out.subject) == ("dev-msg-1", "cbs-reply", "keep")
    assert out.properties == {"status-code": 200, "status-description": "OK"}
    # `to` is only replaced where the hub addressed the gateway's own reply link
    other = decoded(restore_reply(parse_reply(reply(200, address="elsewhere")), "m", "cbs-reply",
                                  "gw-reply"))  # fmt: skip
    assert (other.correlation_id, other.address) == ("m", "elsewhere")
    unaddressed = decoded(restore_reply(parse_reply(reply(200)), "m", "cbs-reply", "gw-reply"))
    assert unaddressed.address is None
    no_link = decoded(restore_reply(parse_reply(reply(200, address="gw-reply")), "m", "cbs-reply"))
    assert no_link.address == "gw-reply"


def test_status_reply() -> None:
    raw = status_reply("dev-msg-1", "cbs-reply", 503, "the hub cannot be reached")
    out = decoded(raw)
    assert (out.correlation_id, out.address) == ("dev-msg-1", "cbs-reply")
    assert out.properties == {"status-code": 503, "status-description": "the hub cannot be reached"}
    assert out.body is None
    assert raw.endswith(b"\x00\x53\x77\x40")  # an amqp-value section holding null, last
    # status-code is an AMQP int (0x71, 4 bytes), as IoT Hub sends it
    assert b"\xa1\x0bstatus-code\x71\x00\x00\x01\xf7" in raw
    assert parse_reply(raw).status == 503


def test_put_token_message() -> None:
    raw = put_token_message(AUDIENCE, TOKEN, "gw-7", "gw-reply")
    out = decoded(raw)
    assert (out.id, out.address, out.reply_to) == ("gw-7", CBS_ADDRESS, "gw-reply")
    assert out.properties == {"operation": "put-token", "type": SAS_TOKEN_TYPE, "name": AUDIENCE}
    assert out.body == TOKEN
    req = parse_request(raw)
    assert (req.operation, req.audience) == ("put-token", AUDIENCE)
