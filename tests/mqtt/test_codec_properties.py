"""Property tests: framing is independent of how bytes are split; fields survive."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from gateway.mqtt import MQTT_3_1_1, MQTT_5, PacketReader, encode, filter_covers, topic_matches
from gateway.mqtt.properties import PROPERTY_TYPES, PropertyType, decode_properties

from .strategies import packet_ids, payloads, topic_filters, topic_names

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)


@st.composite
def packets(draw, level: int) -> tuple[bytes, dict]:
    """One client-side packet: (bytes, the fields it must parse to)."""
    kind = draw(
        st.sampled_from(["publish", "subscribe", "unsubscribe", "puback", "pingreq", "pubrel"])
    )
    if kind == "publish":
        qos = draw(st.integers(0, 2))
        pid = draw(packet_ids()) if qos else None
        topic, payload = draw(topic_names()), draw(payloads())
        retain = draw(st.booleans())
        data = encode.publish(
            topic, payload, qos=qos, packet_id=pid, retain=retain, protocol_level=level
        )
        return data, {
            "topic": topic,
            "qos": qos,
            "packet_id": pid,
            "retain": retain,
            "payload": payload,
        }
    if kind == "subscribe":
        pid = draw(packet_ids())
        subs = draw(st.lists(st.tuples(topic_filters(), st.integers(0, 2)), min_size=1, max_size=4))
        return encode.subscribe(pid, subs, protocol_level=level), {
            "packet_id": pid,
            "subscriptions": subs,
        }
    if kind == "unsubscribe":
        pid = draw(packet_ids())
        filters = draw(st.lists(topic_filters(), min_size=1, max_size=4))
        return encode.unsubscribe(pid, filters, protocol_level=level), {
            "packet_id": pid,
            "topic_filters": filters,
        }
    if kind == "puback":
        pid = draw(packet_ids())
        return encode.puback(pid, protocol_level=level), {"packet_id": pid}
    if kind == "pubrel":
        pid = draw(packet_ids())
        return encode.pubrel(pid, protocol_level=level), {"packet_id": pid}
    return encode.pingreq(), {}


@settings(max_examples=200)
@given(
    level=st.sampled_from([MQTT_3_1_1, MQTT_5]),
    data=st.data(),
)
def test_any_split_gives_the_same_packets(level, data):
    items = data.draw(st.lists(packets(level), min_size=1, max_size=8))
    stream = b"".join(raw for raw, _ in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = PacketReader(1 << 20, protocol_level=level)
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[start:cut])
        start = cut
        while (p := reader.next_packet()) is not None:
            out.append(p)
    assert reader.buffered == 0
    assert [bytes(p.raw) for p in out] == [raw for raw, _ in items]
    for p, (_, fields) in zip(out, items, strict=True):
        for name, value in fields.items():
            got = getattr(p, name)
            assert (bytes(got) if name == "payload" else got) == value


@st.composite
def property_lists(draw):
    props = []
    for ident in draw(st.lists(st.sampled_from(sorted(PROPERTY_TYPES)), max_size=8)):
        kind = PROPERTY_TYPES[ident]
        value = {
            PropertyType.BYTE: st.integers(0, 255),
            PropertyType.UINT16: st.integers(0, 65535),
            PropertyType.UINT32: st.integers(0, 2**32 - 1),
            PropertyType.VARINT: st.integers(0, 268435455),
            PropertyType.UTF8: _text,
            PropertyType.BINARY: st.binary(max_size=20),
            PropertyType.UTF8_PAIR: st.tuples(_text, _text),
        }[kind]
        props.append((ident, draw(value)))
    return props


@given(props=property_lists(), payload=payloads(), topic=topic_names())
def test_v5_properties_survive_a_publish(props, payload, topic):
    data = encode.publish(
        topic, payload, qos=1, packet_id=9, protocol_level=MQTT_5, properties=props
    )
    reader = PacketReader(1 << 20, protocol_level=MQTT_5)
    reader.feed(data)
    p = reader.next_packet()
    assert p.properties == props
    assert bytes(p.payload) == payload and p.topic == topic
    block = encode.encode_properties(props)
    # Skip the length prefix (1-4 bytes) and decode the block on its own.
    n = 1
    while block[n - 1] & 0x80:
        n += 1
    assert decode_properties(block, n, len(block)) == props


@given(topic_filter=topic_filters(), topic=topic_names())
def test_topic_matching_agrees_with_paho(topic_filter, topic):
    assert topic_matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)


@st.composite
def topic_for(draw, topic_filter: str) -> str:
    """A topic name the filter matches (wildcards replaced by drawn levels)."""
    levels = []
    for level in topic_filter.split("/"):
        if level == "+":
            levels.append(draw(st.sampled_from(["x", "", "$y", "dev1"])))
        elif level == "#":
            levels.extend(draw(st.lists(st.sampled_from(["x", "", "z"]), max_size=3)))
        else:
            levels.append(level)
    return "/".join(levels) or "t"


@settings(max_examples=300)
@given(pattern=topic_filters(), topic_filter=topic_filters(), data=st.data())
def test_filter_covers_is_sound(pattern, topic_filter, data):
    """If a pattern covers a filter, it matches every topic that filter matches."""
    if filter_covers(pattern, topic_filter):
        topic = data.draw(topic_for(topic_filter))
        if topic_matches(topic_filter, topic):
            assert topic_matches(pattern, topic)


def test_filter_covers_examples():
    assert filter_covers("devices/+/messages/events/#", "devices/d1/messages/events/#")
    assert filter_covers("#", "a/+/b")
    assert filter_covers("a/#", "a")
    assert not filter_covers("a/+", "a/#")
    assert not filter_covers("a/b", "a/+")
    assert not filter_covers("#", "$iothub/twin/res/#")
    assert filter_covers("$iothub/#", "$iothub/twin/res/#")
    assert not filter_covers("$iothub/twin/#", "$iothub/#")
