"""`DeviceCbs` and `GatewayCbs` on their own, against stand-ins for the links,
deliveries, device, binding and upstream (no engine, no I/O): which request a
hub reply belongs to, which audience is authorised, failure replies to the
device, the message-id/reply-to rewrite and restore, holding a reply until the
request's outcome, detaches. The CBS messages are built and read with
python-qpid-proton. The end-to-end behaviour is in test_cbs_order.py,
test_core.py and test_credentials.py.
"""

from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from proton import Message as ProtonMessage

from gateway.amqp import LinkState, LocalProtocolError
from gateway.amqp.errors import AMQPError
from gateway.amqp.performatives import Accepted, Rejected, Source, Target
from gateway.amqp.types import Described, Symbol
from gateway.router import cbs
from gateway.router.cbs import DeviceCbs, GatewayCbs, PendingPut, parse_request
from gateway.router.linkpair import RESOURCE_LIMIT

AUDIENCE = "myhub.azure-devices.net/devices/d1"
TOKEN = "SharedAccessSignature sr=x&sig=y&se=1"


# ------------------------------------------------------------------------ stand-ins


class FakeDelivery:
    def __init__(self, settled: bool = False) -> None:
        self.settled = settled
        self.remote_settled = False
        self.context: Any = None
        self.outcomes: list[Any] = []

    def settle(self, state: Any) -> None:
        self.settled = True
        self.outcomes.append(state)


class FakeLink:
    def __init__(self, name: str = "l", receiver: bool = False,
                 state: LinkState = LinkState.ATTACHED, target: str | None = None,
                 snd_settle_mode: int | None = None, remote: bool = True,
                 credit: int = 0, terminus: Any = None) -> None:  # fmt: skip
        self.name = name
        self.is_receiver = receiver
        self.state = state
        self.credit = credit
        self.context: Any = None
        self.remote_attach = (
            SimpleNamespace(snd_settle_mode=snd_settle_mode,
                            target=terminus if target is None else Target(address=target))
            if remote else None
        )  # fmt: skip
        self.calls: list[tuple[Any, ...]] = []
        self.sent: list[tuple[bytes, bytes, bool, FakeDelivery]] = []
        self.refuse = False

    @property
    def is_open(self) -> bool:
        return self.state is LinkState.ATTACHED

    @property
    def remote_target(self) -> Any:
        return self.remote_attach.target if self.remote_attach is not None else None

    def answer_attach(self, source: Any = None, target: Any = None) -> None:
        self.calls.append(("answer", source, target))

    def flow(self, credit: int) -> None:
        self.calls.append(("flow", credit))

    def detach(self, error: Any = None, closed: bool = True) -> None:
        self.calls.append(("detach", error, closed))
        self.state = LinkState.DETACH_SENT

    def send_transfer(self, tag: bytes, payload: bytes, *, settled: bool) -> FakeDelivery:
        if self.refuse:
            raise LocalProtocolError("link is not attached")
        d = FakeDelivery(settled)
        self.sent.append((tag, payload, settled, d))
        return d


class FakeRouter:
    container_id = "gw"

    def __init__(self) -> None:
        self.started: list[tuple[Any, ...]] = []
        self.requests: list[tuple[Any, ...]] = []

    def start_soon(self, fn: Any, *args: Any) -> bool:
        self.started.append((fn, *args))
        return True

    def forward_cbs_request(self, device: Any, connector: str, req: Any, delivery: Any,
                            settled: bool) -> None:  # fmt: skip
        self.requests.append((device, connector, req, delivery, settled))


class FakeDevice:
    def __init__(self, router: FakeRouter, id: str = "dev1") -> None:
        self.id = id
        self.router = router
        self.closed = False
        self.cbs: DeviceCbs | None = DeviceCbs(self)
        self.tokens: list[tuple[str, str, Any]] = []
        self.wakes = 0

    def remember_token(self, connector: str, audience: str, request: Any) -> None:
        self.tokens.append((connector, audience, request))

    def wake(self) -> None:
        self.wakes += 1


class FakeBinding:
    def __init__(self, device: FakeDevice, connector: str = "hub") -> None:
        self.device = device
        self.connector = connector
        self.authorised: list[str] = []
        self.finished = 0

    def authorise(self, audience: str) -> None:
        self.authorised.append(audience)

    def put_finished(self) -> None:
        self.finished += 1


class FakeSession:
    def __init__(self) -> None:
        self.links: list[tuple[str, bool, Any, Any, FakeLink]] = []

    def attach(self, name: str, receiver: bool, source: Any, target: Any) -> FakeLink:
        link = FakeLink(name, receiver, LinkState.ATTACH_SENT)
        self.links.append((name, receiver, source, target, link))
        return link


class FakeUpstream:
    id = "up1"

    def __init__(self, router: FakeRouter) -> None:
        self.router = router
        self.session = FakeSession()
        self.dropped: list[Any] = []
        self.wakes = 0

    def control_session(self) -> FakeSession:
        return self.session

    def drop_cbs(self, gw: Any) -> None:
        self.dropped.append(gw)

    def wake(self) -> None:
        self.wakes += 1


# ------------------------------------------------------------------------ messages


def encoded(msg: ProtonMessage) -> bytes:
    return bytes(msg.encode())


def decoded(raw: bytes) -> ProtonMessage:
    msg = ProtonMessage()
    msg.decode(raw)
    return msg


def request_bytes(message_id: Any = "dev-msg-1", reply_to: str = "dev-reply",
                  audience: str = AUDIENCE) -> bytes:  # fmt: skip
    return encoded(ProtonMessage(
        id=message_id, reply_to=reply_to, subject="s",
        properties={"operation": "put-token", "type": cbs.SAS_TOKEN_TYPE, "name": audience},
        body=TOKEN,
    ))  # fmt: skip


def reply_bytes(correlation_id: Any, status: Any = 200, description: str = "OK",
                to: str | None = None) -> bytes:  # fmt: skip
    return encoded(ProtonMessage(
        correlation_id=correlation_id, address=to, subject="keep",
        properties={"status-code": status, "status-description": description},
    ))  # fmt: skip


def event(payload: bytes = b"", settled: bool = False, aborted: bool = False,
          delivery: FakeDelivery | None = None) -> SimpleNamespace:  # fmt: skip
    return SimpleNamespace(payload=payload, settled=settled, aborted=aborted,
                           delivery=delivery or FakeDelivery(settled))  # fmt: skip


# ------------------------------------------------------------------------ fixtures


class World:
    """A gateway CBS pair on one upstream, and devices with their $cbs reply links."""

    def __init__(self) -> None:
        self.router = FakeRouter()
        self.upstream = FakeUpstream(self.router)
        self.gw = GatewayCbs(self.upstream)
        self.gw.sender.state = LinkState.ATTACHED
        self.gw.receiver.state = LinkState.ATTACHED
        self.gw.receiver.credit = cbs.GATEWAY_CBS_CREDIT

    def device(self, id: str = "dev1", reply_to: str = "dev-reply") -> tuple[FakeDevice, FakeLink]:
        device = FakeDevice(self.router, id)
        rx = FakeLink(f"{id}-rx", receiver=False, target=reply_to)
        assert device.cbs is not None
        device.cbs.attach(rx, SimpleNamespace(source=Source(address="$cbs"),
                                              target=Target(address=reply_to)), "hub")  # fmt: skip
        return device, rx

    def forward(self, device: FakeDevice, raw: bytes, settled: bool = False,
                audience: str | None = AUDIENCE, keep_request: bool = False,
                on_done: Any = None) -> tuple[PendingPut, FakeDelivery, FakeDelivery]:  # fmt: skip
        """A device request, as the router forwards it: (pending, device's, upstream's)."""
        req = parse_request(raw)
        device_delivery = FakeDelivery(settled)
        pending = PendingPut(
            FakeBinding(device), audience, req.properties.message_id, req.properties.reply_to,
            True, None if settled else device_delivery, on_done, req if keep_request else None,
        )
        d = self.gw.forward(req, pending, settled)
        return pending, device_delivery, d

    def reply(self, raw: bytes, settled: bool = True) -> SimpleNamespace:
        ev = event(raw, settled=settled)
        self.gw.on_reply(ev)
        return ev


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setattr(GatewayCbs, "_serial", itertools.count(7))
    return World()


def sent_ids(link: FakeLink) -> list[Any]:
    return [decoded(payload).correlation_id for _, payload, _, _ in link.sent]


# ------------------------------------------------------------------------ GatewayCbs


def test_gateway_link_pair_and_ids(world: World) -> None:
    (sname, srecv, ssrc, stgt, slink), (rname, rrecv, rsrc, rtgt, rlink) = world.upstream.session.links
    assert world.gw.reply_to == "cbs-gw-7"
    assert (sname, srecv, ssrc.address, stgt.address) == ("$cbs-sender-gw-7", False, "cbs-gw-7", "$cbs")
    assert (rname, rrecv, rsrc.address, rtgt.address) == ("$cbs-receiver-gw-7", True, "$cbs", "cbs-gw-7")
    assert (slink, rlink) == (world.gw.sender, world.gw.receiver)
    assert slink.context is world.gw and rlink.context is world.gw
    assert world.upstream.wakes == 1
    assert [world.gw.next_message_id() for _ in range(2)] == ["gw:7:1", "gw:7:2"]
    # the next pair on the same gateway gets other names and ids
    other = GatewayCbs(FakeUpstream(world.router))
    assert other.reply_to == "cbs-gw-8" and other.next_message_id() == "gw:8:1"


def test_gateway_grants_credit_on_its_reply_link_only(world: World) -> None:
    world.gw.on_attach(world.gw.sender)
    assert world.gw.sender.calls == [] and world.upstream.wakes == 1
    world.gw.receiver.state = LinkState.DETACH_RCVD
    world.gw.on_attach(world.gw.receiver)
    assert world.gw.receiver.calls == []
    world.gw.receiver.state = LinkState.ATTACHED
    world.gw.on_attach(world.gw.receiver)
    assert world.gw.receiver.calls == [("flow", cbs.GATEWAY_CBS_CREDIT)] and cbs.GATEWAY_CBS_CREDIT == 100
    assert world.upstream.wakes == 2


@pytest.mark.parametrize("state", list(LinkState))
def test_gateway_usable_while_both_links_attach_or_are_attached(world: World, state: LinkState) -> None:
    ok = state in (LinkState.ATTACH_SENT, LinkState.ATTACHED)
    assert world.gw.usable
    world.gw.sender.state = state
    assert world.gw.usable is ok
    world.gw.sender.state = LinkState.ATTACH_SENT
    world.gw.receiver.state = state
    assert world.gw.usable is ok


def test_forward_rewrites_message_id_and_reply_to_only(world: World) -> None:
    device, _ = world.device()
    assert device.cbs is not None
    tx = FakeLink(receiver=True, credit=16)
    tx.context = ("cbs", "hub")
    device.cbs.on_request(tx, event(request_bytes()))  # type: ignore[arg-type]
    assert device.cbs._waiting
    req = world.router.requests[0][2]
    pending = PendingPut(FakeBinding(device), AUDIENCE, "dev-msg-1", "dev-reply", True)
    world.gw.forward(req, pending, False)
    assert device.cbs._waiting == []  # forwarded: the hub answers it, not the gateway
    tag, payload, settled, _ = world.gw.sender.sent[0]
    out = decoded(payload)
    assert (out.id, out.reply_to, out.subject, out.body) == ("gw:7:1", "cbs-gw-7", "s", TOKEN)
    assert out.properties == {"operation": "put-token", "type": cbs.SAS_TOKEN_TYPE, "name": AUDIENCE}
    assert tag == bytes(8) and settled is False
    assert world.gw.pending == {"gw:7:1": pending}
    world.gw.forward(parse_request(request_bytes("m2")), PendingPut(FakeBinding(device), None,
                     "m2", "dev-reply", True), True)  # fmt: skip
    tag, payload, settled, _ = world.gw.sender.sent[1]
    assert tag == (1).to_bytes(8, "big") and settled is True and decoded(payload).id == "gw:7:2"
    assert list(world.gw.pending) == ["gw:7:1", "gw:7:2"]
    assert world.upstream.wakes == 3


def test_forward_of_the_gateways_own_request_leaves_the_device_waiting_list(world: World) -> None:
    device, _ = world.device()
    assert device.cbs is not None
    req = parse_request(request_bytes())
    device.cbs._waiting.append((req, FakeDelivery(), False))
    world.gw.forward(req, PendingPut(FakeBinding(device), AUDIENCE, "x", "y", False), False)
    assert len(device.cbs._waiting) == 1
    # and a device without $cbs served locally is no obstacle
    device.cbs = None
    world.gw.forward(req, PendingPut(FakeBinding(device), AUDIENCE, "x", "y", True), False)
    assert len(world.gw.pending) == 2


def test_unsettled_request_is_linked_to_the_device_delivery(world: World) -> None:
    device, _ = world.device()
    _, dd, d = world.forward(device, request_bytes())
    assert d.context is dd and dd.context is d
    # settled requests, and ones with no device delivery, are not linked
    _, dd2, d2 = world.forward(device, request_bytes("m2"), settled=True)
    assert d2.context is None and dd2.context is None
    req = parse_request(request_bytes("m3"))
    own = PendingPut(FakeBinding(device), AUDIENCE, "m3", "r", False)
    assert world.gw.forward(req, own, False).context is None
    dd4 = FakeDelivery()
    p4 = PendingPut(FakeBinding(device), AUDIENCE, "m4", "r", True, dd4)
    d4 = world.gw.forward(parse_request(request_bytes("m4")), p4, True)
    assert d4.context is None and dd4.context is None


def test_put_token_on_the_gateways_behalf(world: World) -> None:
    device, _ = world.device()
    pending = PendingPut(FakeBinding(device), AUDIENCE, None, None, False)
    d = world.gw.put_token(AUDIENCE, TOKEN, pending)
    tag, payload, settled, sent = world.gw.sender.sent[0]
    assert sent is d and settled is False and tag == bytes(8)
    out = decoded(payload)
    assert (out.id, out.address, out.reply_to, out.body) == ("gw:7:1", "$cbs", "cbs-gw-7", TOKEN)
    assert out.properties["name"] == AUDIENCE
    assert world.gw.pending == {"gw:7:1": pending}


def test_too_many_unanswered_requests_drop_the_oldest(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cbs, "MAX_PENDING", 2)
    device, _ = world.device()
    done: list[tuple[str, Any, Any]] = []
    pendings = [
        world.forward(device, request_bytes(f"m{i}"),
                      on_done=lambda s, t, i=i: done.append((f"m{i}", s, t)))[0]  # fmt: skip
        for i in range(2)
    ]
    assert list(world.gw.pending) == ["gw:7:1", "gw:7:2"] and done == []
    world.forward(device, request_bytes("m2"))
    assert list(world.gw.pending) == ["gw:7:2", "gw:7:3"]
    assert done == [("m0", None, "no reply from the hub")]
    assert pendings[0].binding.finished == 1 and pendings[1].binding.finished == 0


def test_reply_goes_to_the_device_whose_request_it_answers(world: World) -> None:
    # Two devices with the same message-id and reply-to (SDKs reuse them).
    d1, rx1 = world.device("dev1")
    d2, rx2 = world.device("dev2")
    done: list[Any] = []
    p1, _, _ = world.forward(d1, request_bytes(), settled=True, on_done=lambda *a: done.append(("1", *a)))
    p2, _, _ = world.forward(d2, request_bytes(), settled=True, on_done=lambda *a: done.append(("2", *a)))
    world.reply(reply_bytes("gw:7:2", 401, "Unauthorized", to="cbs-gw-7"))
    assert rx1.sent == [] and len(rx2.sent) == 1
    out = decoded(rx2.sent[0][1])
    assert (out.correlation_id, out.address, out.subject) == ("dev-msg-1", "dev-reply", "keep")
    assert out.properties == {"status-code": 401, "status-description": "Unauthorized"}
    assert done == [("2", 401, "Unauthorized")] and p2.binding.finished == 1
    assert p2.binding.authorised == [] and p1.binding.authorised == []
    assert list(world.gw.pending) == ["gw:7:1"]
    world.reply(reply_bytes("gw:7:1", 200, "OK"))
    assert len(rx1.sent) == 1 and len(rx2.sent) == 1
    out = decoded(rx1.sent[0][1])
    assert (out.correlation_id, out.address) == ("dev-msg-1", None)  # the hub set no `to`
    assert p1.binding.authorised == [AUDIENCE] and done[-1] == ("1", 200, "OK")
    assert world.gw.pending == {}
    # a second reply for the same request is for an unknown one now
    world.reply(reply_bytes("gw:7:1", 200, "OK"))
    assert len(rx1.sent) == 1 and p1.binding.finished == 1


def test_device_message_id_of_another_type_comes_back_as_it_was(world: World) -> None:
    device, rx = world.device()
    world.forward(device, request_bytes(message_id=42), settled=True)
    out_req = decoded(world.gw.sender.sent[0][1])
    assert out_req.id == "gw:7:1"
    world.reply(reply_bytes("gw:7:1"))
    assert decoded(rx.sent[0][1]).correlation_id == 42


@pytest.mark.parametrize("status,authorised", [(200, True), (202, True), (201, False), (401, False),
                                               (404, False), ("oops", False)])  # fmt: skip
def test_which_replies_authorise_the_audience(world: World, status: Any, authorised: bool) -> None:
    device, _ = world.device()
    p, _, _ = world.forward(device, request_bytes(), settled=True, keep_request=True)
    world.reply(reply_bytes("gw:7:1", status))
    assert p.binding.authorised == ([AUDIENCE] if authorised else [])
    assert device.tokens == ([("hub", AUDIENCE, p.request)] if authorised else [])


def test_authorised_without_an_audience_or_a_request_to_remember(world: World) -> None:
    device, _ = world.device()
    p, _, _ = world.forward(device, request_bytes(), settled=True, audience=None, keep_request=True)
    p2, _, _ = world.forward(device, request_bytes("m2"), settled=True, audience="", keep_request=True)
    p3, _, _ = world.forward(device, request_bytes("m3"), settled=True)  # request not kept
    for n in (1, 2, 3):
        world.reply(reply_bytes(f"gw:7:{n}", 200))
    assert p.binding.authorised == [] and p2.binding.authorised == []
    assert p3.binding.authorised == [AUDIENCE] and device.tokens == []
    assert (p.binding.finished, p2.binding.finished, p3.binding.finished) == (1, 1, 1)


def test_the_remembered_token_is_under_the_bindings_connector(world: World) -> None:
    device, _ = world.device()
    req = parse_request(request_bytes())
    p = PendingPut(FakeBinding(device, "other"), AUDIENCE, "dev-msg-1", "dev-reply", True, request=req)
    world.gw.forward(req, p, True)
    world.reply(reply_bytes("gw:7:1", 200))
    assert device.tokens == [("other", AUDIENCE, req)]


def test_replies_that_match_no_request_are_dropped(world: World, caplog: pytest.LogCaptureFixture) -> None:
    device, rx = world.device()
    p, _, _ = world.forward(device, request_bytes(), settled=True)
    caplog.set_level(logging.INFO, "gateway.router.cbs")
    world.reply(reply_bytes("gw:7:2"))
    world.reply(reply_bytes(None))
    world.reply(reply_bytes("dev-msg-1"))  # the device's id is not the one the hub saw
    assert rx.sent == [] and p.binding.finished == 0 and list(world.gw.pending) == ["gw:7:1"]
    assert [r.getMessage() for r in caplog.records] == [
        "upstream up1: CBS reply for an unknown request dropped"] * 3  # fmt: skip
    caplog.clear()
    ev = world.reply(b"\x00\x53\x73\xc0\xff", settled=False)  # malformed properties
    assert ev.delivery.outcomes == [Accepted()] and list(world.gw.pending) == ["gw:7:1"]
    with pytest.raises(AMQPError) as exc:
        cbs.parse_reply(b"\x00\x53\x73\xc0\xff")
    assert caplog.records[0].getMessage() == f"upstream up1: malformed CBS reply dropped: {exc.value}"
    # an aborted transfer is no reply at all
    ev = event(reply_bytes("gw:7:1"), aborted=True)
    world.gw.on_reply(ev)
    assert ev.delivery.outcomes == [] and rx.sent == [] and list(world.gw.pending) == ["gw:7:1"]


def test_reply_deliveries_are_accepted_and_credit_renewed(world: World) -> None:
    device, _ = world.device()
    for i in range(3):
        world.forward(device, request_bytes(f"m{i}"), settled=True)
    recv = world.gw.receiver
    recv.credit = 50
    assert world.reply(reply_bytes("gw:7:1"), settled=False).delivery.outcomes == [Accepted()]
    assert recv.calls == []
    recv.credit = 49
    assert world.reply(reply_bytes("gw:7:2"), settled=True).delivery.outcomes == []
    assert recv.calls == [("flow", 100)]
    recv.state = LinkState.DETACH_RCVD
    world.reply(reply_bytes("gw:7:3"))
    assert recv.calls == [("flow", 100)]


def test_the_gateways_own_put_gets_no_reply_relayed(world: World) -> None:
    device, rx = world.device()
    done: list[Any] = []
    world.gw.put_token(AUDIENCE, TOKEN, PendingPut(FakeBinding(device), AUDIENCE, None, None, False,
                                                   on_done=lambda *a: done.append(a)))  # fmt: skip
    world.reply(reply_bytes("gw:7:1", 200))
    assert rx.sent == [] and done == [(200, "OK")]


def test_no_reply_relayed_to_a_closed_device_or_one_without_cbs(world: World) -> None:
    device, rx = world.device()
    p, _, _ = world.forward(device, request_bytes(), settled=True)
    world.forward(device, request_bytes("m2"), settled=True)
    device.closed = True
    world.reply(reply_bytes("gw:7:1"))
    device.closed = False
    device.cbs = None
    world.reply(reply_bytes("gw:7:2"))
    assert rx.sent == [] and p.binding.finished == 1 and p.binding.authorised == [AUDIENCE]


def test_reply_before_the_requests_outcome_is_held_until_it(world: World) -> None:
    device, rx = world.device()
    p, dd, d = world.forward(device, request_bytes())
    world.reply(reply_bytes("gw:7:1"))
    assert rx.sent == [] and world.gw.held == {dd: p}
    assert world.router.started == [(world.gw._release_later, dd)]
    assert p.binding.finished == 1  # the hub did answer: only the relay waits
    world.gw.on_disposition()  # some other request's outcome
    assert rx.sent == []
    dd.settle(Accepted())  # the router relayed the hub's outcome
    world.gw.on_disposition()
    assert len(rx.sent) == 1 and decoded(rx.sent[0][1]).correlation_id == "dev-msg-1"
    assert world.gw.held == {} and p.held_reply is None
    world.gw.on_disposition()
    world.gw._release(dd)
    assert len(rx.sent) == 1


def test_reply_after_the_requests_outcome_goes_at_once(world: World) -> None:
    device, rx = world.device()
    _, dd, _ = world.forward(device, request_bytes())
    dd.settle(Accepted())
    world.reply(reply_bytes("gw:7:1"))
    assert len(rx.sent) == 1 and world.gw.held == {} and world.router.started == []
    # a request whose upstream delivery is gone (context cleared) does not wait either
    _, dd2, _ = world.forward(device, request_bytes("m2"))
    dd2.context = None
    world.reply(reply_bytes("gw:7:2"))
    assert len(rx.sent) == 2 and world.gw.held == {}


def test_held_replies_go_when_the_link_is_dropped_or_the_device_closes(world: World) -> None:
    device, rx = world.device()
    _, dd, _ = world.forward(device, request_bytes())
    world.reply(reply_bytes("gw:7:1"))
    dd.context = None  # the upstream delivery was dropped
    world.gw.on_disposition()
    assert len(rx.sent) == 1 and world.gw.held == {}
    _, dd2, _ = world.forward(device, request_bytes("m2"))
    world.reply(reply_bytes("gw:7:2"))
    device.closed = True
    world.gw.on_disposition()
    assert world.gw.held == {} and len(rx.sent) == 1  # released, but not to a closed device


def test_too_many_held_replies_release_the_oldest(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cbs, "MAX_PENDING", 2)
    device, rx = world.device()
    dds = []
    for i in range(3):
        dds.append(world.forward(device, request_bytes(f"m{i}"))[1])
        world.reply(reply_bytes(f"gw:7:{i + 1}"))
        if i == 1:
            assert rx.sent == [] and list(world.gw.held) == dds
    assert sent_ids(rx) == ["m0"] and list(world.gw.held) == dds[1:]


async def test_held_reply_released_after_hold_reply_max(world: World, autojump_clock: Any) -> None:
    device, rx = world.device()
    _, dd, _ = world.forward(device, request_bytes())
    world.reply(reply_bytes("gw:7:1"))
    fn, request = world.router.started[0]
    start = trio.current_time()
    await fn(request)
    assert trio.current_time() - start == cbs.HOLD_REPLY_MAX == 2.0
    assert sent_ids(rx) == ["dev-msg-1"] and world.gw.held == {}


def test_reply_to_a_device_without_a_reply_link_is_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    device, rx = world.device()
    rx.state = LinkState.DETACHED
    p, _, _ = world.forward(device, request_bytes(), settled=True)
    caplog.set_level(logging.INFO, "gateway.router.cbs")
    world.reply(reply_bytes("gw:7:1"))
    assert [r.getMessage() for r in caplog.records] == ["device dev1: CBS reply dropped, no CBS receiver link"]
    assert p.binding.finished == 1


def test_hub_detaching_a_cbs_link_fails_what_is_in_flight(world: World) -> None:
    device, rx = world.device()
    done: list[Any] = []
    world.forward(device, request_bytes(), on_done=lambda *a: done.append(a))
    _, dd, _ = world.forward(device, request_bytes("m2"))
    world.reply(reply_bytes("gw:7:2"))  # held: the request is not settled yet
    world.gw.sender.state = LinkState.DETACH_RCVD
    world.gw.on_detach(world.gw.sender, "error")
    assert world.gw.sender.calls == [("detach", None, True)]
    assert done == [(None, "upstream CBS link lost")] and world.gw.pending == {}
    assert sent_ids(rx) == ["m2"] and world.gw.held == {}  # the hub answered that one
    assert world.upstream.dropped == [world.gw]
    # a link we detached ourselves is not detached again
    world.gw.receiver.state = LinkState.DETACHED
    world.gw.on_detach(world.gw.receiver, None)
    assert world.gw.receiver.calls == [] and world.upstream.dropped == [world.gw] * 2


@pytest.mark.parametrize("state", [LinkState.DETACH_SENT, LinkState.DETACHED])
def test_close_detaches_the_links_still_open(world: World, state: LinkState) -> None:
    device, _ = world.device()
    done: list[Any] = []
    world.forward(device, request_bytes(), on_done=lambda *a: done.append(a))
    world.gw.sender.state = state
    world.gw.receiver.state = LinkState.DETACH_RCVD
    world.gw.close()
    assert world.gw.sender.calls == [] and world.gw.receiver.calls == [("detach", None, True)]
    assert done == [(None, "upstream CBS link lost")] and world.gw.pending == {}


# ------------------------------------------------------------------------ DeviceCbs


def attach_msg(address: str = "x") -> Any:
    return SimpleNamespace(source=Source(address=address), target=Target(address="$cbs"))


def test_device_attach_and_detach() -> None:
    device = FakeDevice(FakeRouter())
    dc = device.cbs
    assert dc is not None
    tx, rx = FakeLink("tx", receiver=True), FakeLink("rx", receiver=False)
    a = attach_msg()
    dc.attach(tx, a, "hub")
    assert tx.context == ("cbs", "hub") and tx.calls == [("answer", a.source, a.target), ("flow", 16)]
    assert cbs.DEVICE_CBS_CREDIT == 16 and device.wakes == 1
    dc.attach(rx, a, "hub2")
    assert rx.context == ("cbs", "hub2") and rx.calls == [("answer", a.source, a.target)]
    assert (dc.senders, dc.receivers, device.wakes) == ([tx], [rx], 2)
    tx.state = LinkState.DETACH_RCVD
    dc.detached(tx, False)
    assert tx.calls[-1] == ("detach", None, False) and dc.senders == [] and device.wakes == 3
    rx.state = LinkState.DETACH_RCVD
    dc.detached(rx, True)
    assert rx.calls[-1] == ("detach", None, True) and dc.receivers == []
    other = FakeLink("o", state=LinkState.DETACHED)
    dc.detached(other, True)  # already detached, not ours: nothing to do
    assert other.calls == [] and device.wakes == 5


def device_with_links(reply_to: str = "dev-reply") -> tuple[FakeDevice, DeviceCbs, FakeLink, FakeLink]:
    device = FakeDevice(FakeRouter())
    assert device.cbs is not None
    tx, rx = FakeLink("tx", receiver=True, credit=16), FakeLink("rx", target=reply_to)
    device.cbs.attach(tx, attach_msg(), "hub")
    device.cbs.attach(rx, attach_msg(), "hub")
    tx.calls.clear()
    rx.calls.clear()
    return device, device.cbs, tx, rx


def test_device_request_is_handed_to_the_router() -> None:
    device, dc, tx, _ = device_with_links()
    ev = event(request_bytes(), settled=False)
    dc.on_request(tx, ev)  # type: ignore[arg-type]
    (dev, connector, req, delivery, settled), = device.router.requests
    assert (dev, connector, delivery, settled) == (device, "hub", ev.delivery, False)
    assert (req.operation, req.audience, req.properties.message_id) == ("put-token", AUDIENCE, "dev-msg-1")
    assert dc._waiting == [(req, ev.delivery, False)] and device.wakes == 3
    ev2 = event(request_bytes("m2"), settled=1)  # type: ignore[arg-type]
    dc.on_request(tx, ev2)  # type: ignore[arg-type]
    assert dc._waiting[1][2] is True
    assert tx.calls == []  # 16 credits left: no top-up yet
    dc.on_request(tx, event(request_bytes(), aborted=True))  # type: ignore[arg-type]
    assert len(device.router.requests) == 2 and len(dc._waiting) == 2


@pytest.mark.parametrize("credit,state,flows", [(7, LinkState.ATTACHED, True), (8, LinkState.ATTACHED, False),
                                                (0, LinkState.DETACH_RCVD, False)])  # fmt: skip
def test_device_request_link_credit_is_topped_up(credit: int, state: LinkState, flows: bool) -> None:
    _, dc, tx, _ = device_with_links()
    tx.credit, tx.state = credit, state
    dc.on_request(tx, event(request_bytes()))  # type: ignore[arg-type]
    assert tx.calls == ([("flow", 16)] if flows else [])


def test_malformed_device_request_is_rejected() -> None:
    device, dc, tx, _ = device_with_links()
    ev = event(b"\x00\x53\x73\xc0\xff", settled=False)
    dc.on_request(tx, ev)  # type: ignore[arg-type]
    (outcome,) = ev.delivery.outcomes
    assert isinstance(outcome, Rejected) and outcome.error is not None
    assert str(outcome.error.condition) == "amqp:decode-error"
    assert str(outcome.error.description).startswith("malformed CBS request: ")
    assert device.router.requests == [] and dc._waiting == [] and device.wakes == 3
    settled = event(b"\x00\x53\x73\xc0\xff", settled=True)
    dc.on_request(tx, settled)  # type: ignore[arg-type]
    assert settled.delivery.outcomes == []


@pytest.mark.parametrize("condition,status", [(RESOURCE_LIMIT, 500), ("amqp:not-found", 503)])
def test_failed_request_is_rejected_and_answered(condition: str, status: int) -> None:
    device, dc, tx, rx = device_with_links()
    ev = event(request_bytes(), settled=False)
    dc.on_request(tx, ev)  # type: ignore[arg-type]
    wakes = device.wakes
    dc.fail_request(ev.delivery, condition, "no upstream")  # type: ignore[arg-type]
    (outcome,) = ev.delivery.outcomes
    assert isinstance(outcome, Rejected) and outcome.error is not None
    assert (str(outcome.error.condition), outcome.error.description) == (condition, "no upstream")
    (tag, payload, settled, _), = rx.sent
    out = decoded(payload)
    assert (out.correlation_id, out.address) == ("dev-msg-1", "dev-reply")
    assert out.properties == {"status-code": status, "status-description": "no upstream"}
    assert dc._waiting == [] and device.wakes > wakes


def test_failed_request_already_settled_is_only_answered() -> None:
    _, dc, tx, rx = device_with_links()
    ev = event(request_bytes(), settled=False)
    dc.on_request(tx, ev)  # type: ignore[arg-type]
    ev.delivery.remote_settled = True
    dc.fail_request(ev.delivery, RESOURCE_LIMIT, "full")  # type: ignore[arg-type]
    assert ev.delivery.outcomes == [] and sent_ids(rx) == ["dev-msg-1"]
    ev2 = event(request_bytes("m2"), settled=False)
    dc.on_request(tx, ev2)  # type: ignore[arg-type]
    ev2.delivery.settled = True
    dc.fail_request(ev2.delivery, RESOURCE_LIMIT, "full")  # type: ignore[arg-type]
    assert ev2.delivery.outcomes == [] and sent_ids(rx) == ["dev-msg-1", "m2"]


def test_which_waiting_request_a_failure_answers() -> None:
    _, dc, tx, rx = device_with_links()
    evs = [event(request_bytes("unsettled"), settled=False), event(request_bytes("s1"), settled=True),
           event(request_bytes("s2"), settled=True), event(request_bytes("u2"), settled=False)]  # fmt: skip
    for ev in evs:
        dc.on_request(tx, ev)  # type: ignore[arg-type]
    reqs = {req.properties.message_id: req for req, _, _ in dc._waiting}
    dc.fail_request(None, RESOURCE_LIMIT, "full")  # the oldest one sent settled
    dc.fail_request(evs[3].delivery, RESOURCE_LIMIT, "full")  # type: ignore[arg-type]
    dc.fail_request(None, RESOURCE_LIMIT, "full", reqs["s2"])
    assert sent_ids(rx) == ["s1", "u2", "s2"]
    assert [r.properties.message_id for r, _, _ in dc._waiting] == ["unsettled"]
    # the request named wins over the delivery
    dc.fail_request(evs[3].delivery, RESOURCE_LIMIT, "full", reqs["unsettled"])  # type: ignore[arg-type]
    assert sent_ids(rx)[-1] == "unsettled" and dc._waiting == []
    # nothing waiting: nothing to answer
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    dc.fail_request(FakeDelivery(), RESOURCE_LIMIT, "full")  # type: ignore[arg-type]
    assert len(rx.sent) == 4


def test_forwarded_request_leaves_the_waiting_list() -> None:
    _, dc, tx, rx = device_with_links()
    for mid in ("a", "b", "c"):
        dc.on_request(tx, event(request_bytes(mid), settled=True))  # type: ignore[arg-type]
    reqs = [r for r, _, _ in dc._waiting]
    dc.forwarded(reqs[1])
    dc.forwarded(parse_request(request_bytes("a")))  # equal bytes, another request
    assert [r for r, _, _ in dc._waiting] == [reqs[0], reqs[2]]
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    assert sent_ids(rx) == ["a", "c"]


def test_failure_reply_without_a_reply_link_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    device, dc, tx, rx = device_with_links()
    dc.on_request(tx, event(request_bytes(), settled=True))  # type: ignore[arg-type]
    rx.state = LinkState.DETACH_SENT
    caplog.set_level(logging.INFO, "gateway.router.cbs")
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    assert rx.sent == [] and dc._waiting == []
    assert [r.getMessage() for r in caplog.records] == ["device dev1: CBS status reply dropped, no CBS receiver link"]


def test_reply_link_chosen_by_reply_to() -> None:
    device = FakeDevice(FakeRouter())
    dc = device.cbs
    assert dc is not None
    r1, r2 = FakeLink("r1", target="one"), FakeLink("r2", target="two")
    nameless = FakeLink("r0", remote=False)
    for link in (r1, nameless, r2):
        dc.attach(link, attach_msg(), "hub")
    assert dc.deliver_reply(b"a", "one") and dc.deliver_reply(b"b", "two")
    assert dc.deliver_reply(b"c", "none") and dc.deliver_reply(b"d", None)
    assert [p for _, p, _, _ in r1.sent] == [b"a"] and [p for _, p, _, _ in r2.sent] == [b"b", b"c", b"d"]
    # the tags count across the links, 8 bytes each
    assert [t for t, _, _, _ in r1.sent + r2.sent] == [bytes(8)] + [n.to_bytes(8, "big") for n in (1, 2, 3)]
    r2.state = LinkState.DETACH_SENT  # only open links are candidates
    wakes = device.wakes
    assert dc.deliver_reply(b"e", "two") and [p for _, p, _, _ in r1.sent] == [b"a"]
    assert [p for _, p, _, _ in nameless.sent] == [b"e"] and device.wakes == wakes + 1
    nameless.state = r1.state = LinkState.DETACHED
    assert not dc.deliver_reply(b"f", "one") and device.wakes == wakes + 1


@pytest.mark.parametrize("mode,remote,settled", [(0, True, False), (1, True, True), (2, True, True),
                                                 (None, True, True), (None, False, True)])  # fmt: skip
def test_reply_settled_as_the_devices_attach_asks(mode: Any, remote: bool, settled: bool) -> None:
    dc = DeviceCbs(FakeDevice(FakeRouter()))  # type: ignore[arg-type]
    link = FakeLink(snd_settle_mode=mode, remote=remote)
    dc.attach(link, attach_msg(), "hub")
    assert dc.deliver_reply(b"x", None)
    assert link.sent[0][2] is settled


def test_reply_on_a_link_that_refuses_it() -> None:
    device = FakeDevice(FakeRouter())
    dc = device.cbs
    assert dc is not None
    link = FakeLink()
    dc.attach(link, attach_msg(), "hub")
    link.refuse = True
    wakes = device.wakes
    assert dc.deliver_reply(b"x", None) is False and device.wakes == wakes


@pytest.mark.parametrize("gone", [LinkState.DETACH_SENT, LinkState.DETACHED])
def test_device_cbs_close(gone: LinkState) -> None:
    _, dc, tx, rx = device_with_links()
    dc.on_request(tx, event(request_bytes(), settled=True))  # type: ignore[arg-type]
    rx.state = gone
    dc.close()
    assert tx.calls == [("detach", None, True)] and rx.calls == []
    assert dc.senders == [] and dc.receivers == [] and dc._waiting == []
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    assert rx.sent == []


def test_reply_goes_on_the_link_the_request_named(world: World) -> None:
    # The device has two reply links; its request names the first (not the newest).
    device, rx1 = world.device("dev1", "first")
    assert device.cbs is not None
    rx2 = FakeLink("rx2", target="second")
    device.cbs.attach(rx2, SimpleNamespace(source=None, target=None), "hub")
    world.forward(device, request_bytes(reply_to="first"), settled=True)
    world.reply(reply_bytes("gw:7:1", to="cbs-gw-7"))
    assert len(rx1.sent) == 1 and rx2.sent == []
    assert decoded(rx1.sent[0][1]).address == "first"
    # the same for a held reply, released by the request's outcome
    _, dd, _ = world.forward(device, request_bytes("m2", reply_to="first"))
    world.reply(reply_bytes("gw:7:2"))
    dd.settle(Accepted())
    world.gw.on_disposition()
    assert sent_ids(rx1) == ["dev-msg-1", "m2"] and rx2.sent == []


def test_failure_reply_goes_on_the_link_the_request_named() -> None:
    device, dc, tx, rx1 = device_with_links("first")
    rx2 = FakeLink("rx2", target="second")
    dc.attach(rx2, attach_msg(), "hub")
    dc.on_request(tx, event(request_bytes(reply_to="first"), settled=True))  # type: ignore[arg-type]
    dc.fail_request(None, RESOURCE_LIMIT, "full")
    assert sent_ids(rx1) == ["dev-msg-1"] and rx2.sent == []


def test_reply_link_with_a_target_of_another_kind() -> None:
    # A terminus this library does not interpret (a coordinator, say) has no address.
    dc = DeviceCbs(FakeDevice(FakeRouter()))  # type: ignore[arg-type]
    odd = FakeLink("odd", terminus=Described(Symbol("amqp:coordinator:list"), []))
    named = FakeLink("named", target="dev-reply")
    dc.attach(named, attach_msg(), "hub")
    dc.attach(odd, attach_msg(), "hub")
    assert dc.deliver_reply(b"x", "dev-reply") and [p for _, p, _, _ in named.sent] == [b"x"]
    assert dc.deliver_reply(b"y", "other") and [p for _, p, _, _ in odd.sent] == [b"y"]


@pytest.mark.parametrize("closed", [True, False])
def test_no_reply_held_for_a_closed_device_or_one_without_cbs(world: World, closed: bool) -> None:
    device, rx = world.device()
    p, _, _ = world.forward(device, request_bytes())  # unsettled: a reply would be held
    if closed:
        device.closed = True
    else:
        device.cbs = None
    world.reply(reply_bytes("gw:7:1"))
    assert world.gw.held == {} and world.router.started == [] and p.held_reply is None
    assert rx.sent == [] and p.binding.finished == 1
