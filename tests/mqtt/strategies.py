"""Hypothesis strategies for MQTT fields."""

from __future__ import annotations

from hypothesis import strategies as st

# A topic level: any text without '/', the wildcards or U+0000 (surrogates cannot be encoded).
_level = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/+#\x00"),
    max_size=8,
)


@st.composite
def topic_names(draw) -> str:
    levels = draw(st.lists(_level, min_size=1, max_size=5))
    topic = "/".join(levels)
    return topic if topic else "t"


@st.composite
def topic_filters(draw) -> str:
    levels = draw(st.lists(_level | st.just("+"), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    return topic_filter if topic_filter else "#"


def packet_ids():
    return st.integers(1, 65535)


def payloads():
    return st.binary(max_size=600)
