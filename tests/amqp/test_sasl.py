"""SASL negotiation: mechanisms, PLAIN parsing, outcomes, secrets kept out of reprs."""

from __future__ import annotations

import struct

import proton
import pytest
from proton import Described, symbol, ulong

from gateway.amqp import Connection, ConnectionError, SaslAuthenticated, SaslClient, SaslServer
from gateway.amqp.performatives import SaslInit, SaslMechanisms, SaslResponse
from gateway.amqp.types import Symbol

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"


def sasl_frame(code: int, fields: list) -> bytes:
    data = proton.Data()
    data.put_object(Described(ulong(code), fields))
    body = bytes(data.encode())
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def decode_sasl_frames(data: bytes) -> list:
    out = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] == b"AMQP":
            out.append(("header", data[pos : pos + 8]))
            pos += 8
            continue
        size, doff, ftype, _ = struct.unpack_from(">IBBH", data, pos)
        d = proton.Data()
        d.decode(data[pos + doff * 4 : pos + size])
        d.rewind()
        d.next()
        obj = d.get_object()
        out.append((ftype, int(obj.descriptor), obj.value))
        pos += size
    return out


def test_server_offers_configured_mechanisms_as_proton_reads_them():
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN", "ANONYMOUS"]))
    conn.receive_data(SASL_HEADER)
    frames = decode_sasl_frames(conn.data_to_send())
    assert frames[0] == ("header", SASL_HEADER)
    ftype, code, fields = frames[1]
    assert (ftype, code) == (1, 0x40)
    assert list(fields[0]) == ["PLAIN", "ANONYMOUS"]


@pytest.mark.parametrize(
    "response, identity, password, authzid",
    [
        (b"\x00dev1@sas.hub\x00SharedAccessSignature sr=a", "dev1@sas.hub", "SharedAccessSignature sr=a", None),
        (b"admin\x00dev1\x00pw", "dev1", "pw", "admin"),
        (b"\x00d\x00", "d", "", None),
    ],
)
def test_plain_identity_and_password_reported(response, identity, password, authzid):
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"]))
    conn.receive_data(SASL_HEADER)
    conn.data_to_send()
    events = conn.receive_data(sasl_frame(0x41, [symbol("PLAIN"), response, "myhub.azure-devices.net"]))
    (auth,) = events
    assert isinstance(auth, SaslAuthenticated)
    assert (auth.mechanism, auth.identity, auth.password, auth.authzid) == ("PLAIN", identity, password, authzid)
    assert auth.hostname == "myhub.azure-devices.net"
    assert conn.authenticated is auth
    if password:
        assert password not in repr(auth)
    outcome = decode_sasl_frames(conn.data_to_send())
    assert outcome[0][1] == 0x44 and outcome[0][2][0] == 0


@pytest.mark.parametrize(
    "mechanism, response",
    [
        ("PLAIN", b"no-nul-bytes"),
        ("PLAIN", b"\x00\x00pw"),  # empty authcid
        ("PLAIN", None),
        ("PLAIN", b"\x00\xff\xfe\x00pw"),  # not UTF-8
        ("EXTERNAL", b""),  # not offered
        ("CRAM-MD5", b""),
    ],
)
def test_bad_sasl_init_gets_auth_outcome_and_close(mechanism, response):
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN", "ANONYMOUS"]))
    conn.receive_data(SASL_HEADER)
    conn.data_to_send()
    events = conn.receive_data(sasl_frame(0x41, [symbol(mechanism), response]))
    (err,) = events
    assert isinstance(err, ConnectionError)
    assert err.error.condition == "amqp:unauthorized-access"
    (outcome,) = decode_sasl_frames(conn.data_to_send())
    assert outcome[1] == 0x44 and outcome[2][0] == 1  # auth
    assert conn.closed
    assert conn.receive_data(AMQP_HEADER) == []


def test_anonymous_only_server_refuses_plain():
    conn = Connection("server", "gw", sasl=SaslServer(["ANONYMOUS"]))
    conn.receive_data(SASL_HEADER)
    events = conn.receive_data(sasl_frame(0x41, [symbol("PLAIN"), b"\x00u\x00p"]))
    assert isinstance(events[0], ConnectionError)
    assert "not offered" in events[0].error.description


def test_authenticator_sees_credentials_and_decides():
    calls = []

    def check(mechanism, identity, password, hostname):
        calls.append((mechanism, identity, password, hostname))
        return identity == "good"

    for identity, ok in (("good", True), ("bad", False)):
        conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"], authenticate=check))
        conn.receive_data(SASL_HEADER)
        events = conn.receive_data(sasl_frame(0x41, [symbol("PLAIN"), b"\x00" + identity.encode() + b"\x00pw", "h"]))
        assert isinstance(events[0], SaslAuthenticated) is ok
    assert calls == [("PLAIN", "good", "pw", "h"), ("PLAIN", "bad", "pw", "h")]


def test_sasl_response_out_of_turn_is_refused():
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"]))
    conn.receive_data(SASL_HEADER)
    events = conn.receive_data(sasl_frame(0x43, [b"x"]))
    assert isinstance(events[0], ConnectionError)


def test_amqp_frame_during_sasl_is_a_framing_error():
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"]))
    conn.receive_data(SASL_HEADER)
    data = proton.Data()
    data.put_object(Described(ulong(0x10), ["c"]))
    body = bytes(data.encode())
    events = conn.receive_data(struct.pack(">IBBH", 8 + len(body), 2, 0, 0) + body)
    assert isinstance(events[0], ConnectionError)
    assert events[0].error.condition == "amqp:connection:framing-error"


def test_optional_sasl_accepts_both_headers():
    server = SaslServer(["ANONYMOUS"], required=False)
    conn = Connection("server", "gw", sasl=server)
    conn.open()
    assert conn.receive_data(AMQP_HEADER) == []
    assert conn.data_to_send().startswith(AMQP_HEADER)
    conn = Connection("server", "gw", sasl=server)
    conn.receive_data(SASL_HEADER)
    assert conn.data_to_send().startswith(SASL_HEADER)


def test_client_mechanisms_and_initial_responses():
    assert SaslClient.plain("u", "p").on_mechanisms(
        SaslMechanisms(Symbol("PLAIN")), "host"
    ) == SaslInit(Symbol("PLAIN"), b"\x00u\x00p", "host")
    assert SaslClient.external().on_mechanisms(
        SaslMechanisms(Symbol("EXTERNAL")), None
    ).initial_response == b""
    anon = SaslClient.anonymous().on_mechanisms(SaslMechanisms(Symbol("ANONYMOUS")), "h")
    assert anon.mechanism == "ANONYMOUS" and anon.hostname == "h"
    assert SaslClient("PLAIN", "u", "p", hostname="other").on_mechanisms(
        SaslMechanisms(Symbol("PLAIN")), "host"
    ).hostname == "other"
    assert SaslClient.external().on_challenge(None) == SaslResponse(b"")


def test_client_secrets_not_in_repr():
    client = SaslClient.plain("dev1", "SharedAccessSignature sig=secret")
    assert "secret" not in repr(client)
    init = client.on_mechanisms(SaslMechanisms(Symbol("PLAIN")), None)
    assert "secret" not in repr(init)


def test_client_mechanism_not_offered():
    conn = Connection("client", "c", sasl=SaslClient.plain("u", "p"))
    conn.open()
    conn.data_to_send()
    events = conn.receive_data(SASL_HEADER + sasl_frame(0x40, [proton.Array(proton.UNDESCRIBED, proton.Data.SYMBOL, symbol("ANONYMOUS"))]))
    (err,) = events
    assert err.error.condition == "amqp:unauthorized-access"
    assert "PLAIN" in err.error.description and "ANONYMOUS" in err.error.description


def test_client_outcome_failure_and_success():
    conn = Connection("client", "c", sasl=SaslClient.anonymous())
    conn.open()
    conn.data_to_send()
    events = conn.receive_data(SASL_HEADER + sasl_frame(0x40, [symbol("ANONYMOUS")]) + sasl_frame(0x44, [proton.ubyte(1)]))
    assert isinstance(events[-1], ConnectionError)
    assert "code 1" in events[-1].error.description
    conn = Connection("client", "c", sasl=SaslClient.anonymous())
    conn.open()
    conn.data_to_send()
    events = conn.receive_data(SASL_HEADER + sasl_frame(0x40, [symbol("ANONYMOUS")]) + sasl_frame(0x44, [proton.ubyte(0)]))
    assert isinstance(events[-1], SaslAuthenticated)
    out = conn.data_to_send()
    frames = decode_sasl_frames(out)
    assert frames[0][1] == 0x41  # init
    assert frames[1] == ("header", AMQP_HEADER)  # then the AMQP header and our open
    assert frames[2][0] == 0 and frames[2][1] == 0x10


def test_constructor_validation():
    with pytest.raises(ValueError):
        SaslServer(["EXTERNAL"])
    with pytest.raises(ValueError):
        SaslServer([])
    with pytest.raises(ValueError):
        SaslClient("PLAIN")  # no credentials
    with pytest.raises(ValueError):
        SaslClient("GSSAPI")
    with pytest.raises(ValueError):
        Connection("server", "gw", sasl=SaslClient.anonymous())
    with pytest.raises(ValueError):
        Connection("client", "c", sasl=SaslServer())


# --- MSSBCBS (the Azure C AMQP stack's "token follows over CBS") and failed negotiations


def _negotiate(server: SaslServer, init: bytes) -> tuple[Connection, list, list]:
    conn = Connection("server", "gw", sasl=server)
    conn.receive_data(SASL_HEADER)
    offered = decode_sasl_frames(conn.data_to_send())
    events = conn.receive_data(init)
    return conn, offered, events


def test_default_server_offers_mssbcbs_first():
    _, offered, _ = _negotiate(SaslServer(), b"")
    assert list(offered[1][2][0]) == ["MSSBCBS", "ANONYMOUS", "PLAIN"]


def test_mssbcbs_without_initial_response_is_accepted_as_anonymous():
    # uamqp-c's sasl-init for MSSBCBS: the mechanism alone, no initial response, no hostname.
    server = SaslServer()
    conn, _, events = _negotiate(server, sasl_frame(0x41, [symbol("MSSBCBS")]))
    (auth,) = events
    assert isinstance(auth, SaslAuthenticated)
    assert (auth.mechanism, auth.identity, auth.password) == ("MSSBCBS", None, None)
    outcome = decode_sasl_frames(conn.data_to_send())
    assert outcome[0][1] == 0x44 and outcome[0][2][0] == 0
    assert server.failure_summary() is None


def test_mssbcbs_is_not_judged_by_the_authenticator():
    calls = []

    def check(mechanism, identity, password, hostname):
        calls.append(mechanism)
        return mechanism != "PLAIN"

    server = SaslServer(["MSSBCBS"], authenticate=check)
    _, _, events = _negotiate(server, sasl_frame(0x41, [symbol("MSSBCBS"), b"", None]))
    assert isinstance(events[0], SaslAuthenticated) and calls == ["MSSBCBS"]


def test_mechanism_not_offered_gets_outcome_auth_and_a_summary_of_both_sides():
    server = SaslServer(["ANONYMOUS", "PLAIN"])
    conn, _, events = _negotiate(server, sasl_frame(0x41, [symbol("MSSBCBS")]))
    assert isinstance(events[0], ConnectionError)
    assert events[0].error.condition == "amqp:unauthorized-access"
    outcome = decode_sasl_frames(conn.data_to_send())
    assert (outcome[0][1], outcome[0][2][0]) == (0x44, 1)  # sasl-outcome, code auth
    summary = server.failure_summary()
    assert "'MSSBCBS'" in summary and "offered ANONYMOUS, PLAIN" in summary


@pytest.mark.parametrize(
    "frame",
    [
        sasl_frame(0x41, []),  # sasl-init without its mandatory mechanism
        sasl_frame(0x41, [b"MSSBCBS"]),  # mechanism as binary, not a symbol
        sasl_frame(0x44, [0]),  # an outcome from the client
    ],
    ids=["no-mechanism", "binary-mechanism", "outcome-from-client"],
)
def test_bad_sasl_frame_from_client_gets_outcome_auth(frame):
    server = SaslServer()
    conn, _, events = _negotiate(server, frame)
    assert isinstance(events[0], ConnectionError)
    outcome = decode_sasl_frames(conn.data_to_send())
    assert (outcome[0][1], outcome[0][2][0]) == (0x44, 1)
    assert server.failure_summary().startswith("bad SASL frame")


def test_client_that_leaves_after_the_mechanisms_is_summarised():
    # What uamqp-c does when MSSBCBS is not offered: it closes without a sasl-init.
    server = SaslServer(["ANONYMOUS", "PLAIN"])
    conn = Connection("server", "gw", sasl=server)
    conn.receive_data(SASL_HEADER)
    conn.data_to_send()
    assert server.failure_summary(ended=False) is None
    conn.receive_data(b"")
    summary = server.failure_summary()
    assert "without choosing a mechanism" in summary and "offered ANONYMOUS, PLAIN" in summary


# -- relaying another peer's sasl-init (provisioning logins) ---------------------------------


def _mechanisms(*names: str) -> bytes:
    return sasl_frame(0x40, [proton.Array(proton.UNDESCRIBED, proton.Data.SYMBOL, *map(symbol, names))])


def _outcome(code: int) -> bytes:
    return sasl_frame(0x44, [proton.ubyte(code)])


@pytest.mark.parametrize("split", [False, True])
def test_relay_client_forwards_the_init_verbatim_and_reports_the_outcome(split: bool) -> None:
    from gateway.amqp.sasl import SaslRelayClient

    init = sasl_frame(0x41, [symbol("PLAIN"), b"\x00scope/registrations/r1\x00token", None])
    relay = SaslRelayClient(init, "PLAIN")
    assert relay.start() == SASL_HEADER
    server = SASL_HEADER + _mechanisms("EXTERNAL", "PLAIN") + _outcome(0) + AMQP_HEADER
    chunks = [server[i : i + 1] for i in range(len(server))] if split else [server]
    sent = b"".join(relay.receive_data(c) for c in chunks)
    assert sent == init  # byte for byte, once
    assert relay.outcome == 0
    assert relay.rest == AMQP_HEADER  # what followed the outcome is the caller's


def test_relay_client_refusals() -> None:
    from gateway.amqp.sasl import SaslRelayClient

    init = sasl_frame(0x41, [symbol("PLAIN"), b"\x00u\x00p", None])
    relay = SaslRelayClient(init, "PLAIN")
    assert relay.receive_data(SASL_HEADER + _mechanisms("PLAIN")) == init
    relay.receive_data(_outcome(1))
    assert relay.outcome == 1
    relay = SaslRelayClient(init, "PLAIN")
    assert relay.receive_data(SASL_HEADER + _mechanisms("ANONYMOUS")) == b""
    assert relay.outcome == 2  # sys: the mechanism is not offered, nothing was sent
    with pytest.raises(Exception, match="SASL"):
        SaslRelayClient(init, "PLAIN").receive_data(AMQP_HEADER)


def test_server_answers_an_outcome_code_the_authenticator_gives() -> None:
    server = SaslServer(["PLAIN"], authenticate=lambda *a: 4)
    decision = server.on_init(SaslInit(Symbol("PLAIN"), b"\x00u\x00p", None))
    assert decision.outcome.code == 4 and decision.authenticated is None


def test_authenticator_refusal_is_left_to_the_authenticator_to_report():
    server = SaslServer(authenticate=lambda *args: False)
    conn, _, events = _negotiate(
        server, sasl_frame(0x41, [symbol("PLAIN"), b"\x00dev1\x00pw", None])
    )
    assert isinstance(events[0], ConnectionError)
    assert decode_sasl_frames(conn.data_to_send())[0][2][0] == 1  # outcome auth
    assert server.failure_summary() is None  # it logged its own line
