from __future__ import annotations

import inspect
import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import (
    MAX_LABEL_VALUES,
    FastHistogram,
    HotValue,
    Metrics,
    NullMetrics,
    hot_value,
)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_after_a_known_sequence() -> None:
    m = Metrics(process_metrics=False)
    for _ in range(3):
        m.on_device_connect("amqp", "amqp")
    m.on_device_disconnect("amqp", "amqp")
    m.on_device_connect("mqtt", "mqtt")
    m.on_upstream_state("iothub", "connecting")
    m.on_upstream_state("iothub", "open", "connecting")
    m.on_upstream_state("iothub", "connecting")
    m.on_upstream_state("iothub", None, "connecting")
    m.on_tls_handshake_failure("iothub", "certificate_verify_failed")
    m.on_reconnect("iothub")
    m.on_reconnect("iothub")
    m.on_link_open("devices/", "in")
    m.on_link_open("devices/", "out")
    m.on_link_close("devices/", "out")
    for _ in range(10):
        m.on_message("devices/", "in", 1024)
    m.on_message("devices/", "out", 10)
    for outcome in ("accepted",) * 9 + ("rejected",):
        m.on_disposition(outcome, "in")
    m.on_disposition("released", "out")
    m.on_attach_refused("amqp:not-found")
    m.on_protocol_error("amqp:decode-error", side="device")
    m.observe_relay_latency(0.00002)
    m.relay_latency("mqtt").observe(0.002)
    m.on_mqtt_packet("PUBLISH", "in")
    m.on_reload(True)
    m.on_reload(False)

    assert value(m, "iotgw_device_connections_open", listener="amqp", protocol="amqp") == 2
    assert value(m, "iotgw_device_connections_total", listener="amqp", protocol="amqp") == 3
    assert value(m, "iotgw_device_connections_total", listener="mqtt", protocol="mqtt") == 1
    assert value(m, "iotgw_upstream_connections", connector="iothub", state="open") == 1
    assert value(m, "iotgw_upstream_connections", connector="iothub", state="connecting") == 0
    assert value(m, "iotgw_upstream_connections_opened_total", connector="iothub") == 1
    assert (
        value(
            m,
            "iotgw_tls_handshake_failures_total",
            connector="iothub",
            reason="certificate_verify_failed",
        )
        == 1
    )
    assert value(m, "iotgw_reconnects_total", connector="iothub") == 2
    assert value(m, "iotgw_links_open", route="devices/", direction="in") == 1
    assert value(m, "iotgw_links_open", route="devices/", direction="out") == 0
    assert value(m, "iotgw_links_total", route="devices/", direction="out") == 1
    assert value(m, "iotgw_messages_total", route="devices/", direction="in") == 10
    assert value(m, "iotgw_message_bytes_total", route="devices/", direction="in") == 10240
    assert value(m, "iotgw_messages_total", route="devices/", direction="out") == 1
    assert value(m, "iotgw_dispositions_total", outcome="accepted", direction="in") == 9
    assert value(m, "iotgw_dispositions_total", outcome="rejected", direction="in") == 1
    assert value(m, "iotgw_dispositions_total", outcome="released", direction="out") == 1
    assert value(m, "iotgw_attach_refusals_total", reason="amqp:not-found") == 1
    assert (
        value(
            m,
            "iotgw_protocol_errors_total",
            protocol="amqp",
            side="device",
            kind="amqp:decode-error",
        )
        == 1
    )
    assert value(m, "iotgw_relay_latency_seconds_bucket", protocol="amqp", le="2.5e-05") == 1
    assert value(m, "iotgw_relay_latency_seconds_bucket", protocol="amqp", le="1e-05") == 0
    assert value(m, "iotgw_relay_latency_seconds_count", protocol="mqtt") == 1
    assert value(m, "iotgw_mqtt_packets_total", type="PUBLISH", direction="in") == 1
    assert value(m, "iotgw_config_reloads_total", result="rejected") == 1


def test_latency_buckets_span_10us_to_100ms() -> None:
    m = Metrics(process_metrics=False)
    m.observe_relay_latency(0.001)
    les = {dict(k[1])["le"] for k in samples(m) if k[0] == "iotgw_relay_latency_seconds_bucket"}
    bounds = sorted(float(le) for le in les if le != "+Inf")
    assert bounds[0] == 1e-05 and bounds[-1] == 0.1 and len(bounds) >= 10


def test_no_device_ids_in_labels_by_default() -> None:
    m = Metrics(process_metrics=False)
    m.on_message("devices/", "in", 10, device="secret-device-7")
    m.set_token_expiry(1800, device="secret-device-7")
    assert "secret-device-7" not in generate_latest(m.registry).decode()
    assert value(m, "iotgw_token_expiry_seconds") == pytest.approx(1800, abs=1)


def test_device_labels_when_enabled_and_forget() -> None:
    m = Metrics(process_metrics=False, device_labels=True)
    m.on_message("devices/", "in", 10, device="dev1")
    m.on_message("devices/", "in", 5, device="dev1")
    m.set_token_expiry(900, device="dev1")
    m.set_token_expiry(300, device="dev2")
    assert value(m, "iotgw_device_messages_total", device="dev1", direction="in") == 2
    assert value(m, "iotgw_device_message_bytes_total", device="dev1", direction="in") == 15
    assert value(m, "iotgw_device_token_expiry_seconds", device="dev2") == pytest.approx(300, abs=1)
    assert value(m, "iotgw_token_expiry_seconds") == pytest.approx(300, abs=1)  # the soonest
    m.set_token_expiry(600)  # the AMQP router's soonest
    assert value(m, "iotgw_token_expiry_seconds") == pytest.approx(300, abs=1)
    m.forget_device("dev2")
    assert value(m, "iotgw_token_expiry_seconds") == pytest.approx(600, abs=1)
    m.set_token_expiry(None)
    assert value(m, "iotgw_token_expiry_seconds") == pytest.approx(900, abs=1)
    m.forget_device("dev1")
    assert "dev1" not in generate_latest(m.registry).decode()
    assert math.isnan(value(m, "iotgw_token_expiry_seconds"))


def test_token_expiry_is_nan_until_set() -> None:
    m = Metrics(process_metrics=False)
    assert math.isnan(value(m, "iotgw_token_expiry_seconds"))
    m.on_token_renewal_failure("dev1")
    assert value(m, "iotgw_token_renewal_failures_total") == 1


def test_label_cardinality_is_bounded() -> None:
    m = Metrics(process_metrics=False)
    for i in range(MAX_LABEL_VALUES + 50):
        m.on_message(
            f"devices/d{i}/messages/events", "in", 1
        )  # a caller passing addresses by mistake
        m.on_attach_refused(f"reason-{i}")
    assert value(m, "iotgw_messages_total", route="other", direction="other") == 50
    assert value(m, "iotgw_attach_refusals_total", reason="other") == 50


def test_injected_registry_and_process_metrics() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg, gateway_id="edge-1", version="1.2.3")
    assert m.registry is reg
    text = generate_latest(reg).decode()
    assert 'iotgw_build_info{gateway_id="edge-1",version="1.2.3"} 1.0' in text
    assert "process_resident_memory_bytes" not in text  # an injected registry is left as given
    assert "process_resident_memory_bytes" in generate_latest(Metrics().registry).decode()


def test_mqtt_observer_adapter() -> None:
    m = Metrics(process_metrics=False)
    obs = m.mqtt_observer("mqtt", route="mqtt")
    obs.on_packet("in", "CONNECT")
    obs.on_packet("in", "PUBLISH", 300)
    obs.on_packet("out", "PUBACK")
    obs.on_close("device closed")
    assert value(m, "iotgw_mqtt_packets_total", type="PUBLISH", direction="in") == 1
    assert value(m, "iotgw_messages_total", route="mqtt", direction="in") == 1
    assert value(m, "iotgw_message_bytes_total", route="mqtt", direction="in") == 300
    assert value(m, "iotgw_mqtt_sessions_closed_total", reason="device closed") == 1
    obs.on_close("upstream_protocol_error")
    obs.on_upstream_connect_failure("iothub-mqtt", "certificate_verify_failed")
    assert (
        value(
            m,
            "iotgw_protocol_errors_total",
            protocol="mqtt",
            side="upstream",
            kind="upstream_protocol_error",
        )
        == 1
    )
    assert (
        value(
            m,
            "iotgw_tls_handshake_failures_total",
            connector="iothub-mqtt",
            reason="certificate_verify_failed",
        )
        == 1
    )
    obs.on_upstream_open("iothub-mqtt")
    obs.on_upstream_open("iothub-mqtt")
    obs.on_upstream_close("iothub-mqtt")
    assert value(m, "iotgw_upstream_connections", connector="iothub-mqtt", state="open") == 1
    assert value(m, "iotgw_upstream_connections_opened_total", connector="iothub-mqtt") == 2


def test_null_metrics_has_the_same_interface() -> None:
    public = {n for n in dir(Metrics) if not n.startswith("_")}
    for name in public:
        assert hasattr(NullMetrics, name), name
        real = (
            inspect.signature(getattr(Metrics, name)) if callable(getattr(Metrics, name)) else None
        )
        if real is not None:
            assert (
                inspect.signature(getattr(NullMetrics, name)).parameters.keys()
                == real.parameters.keys()
            ), name
    null = NullMetrics()
    null.on_message("r", "in", 1)
    null.relay_latency().observe(0.1)
    null.mqtt_observer().on_packet("in", "PUBLISH", 1)


@pytest.mark.parametrize("amount", [0.0, 0.000007, 0.00002, 0.0031, 0.1, 5.0])
def test_fast_histogram_equals_that_many_single_observations(amount: float) -> None:
    """FastHistogram reaches into prometheus_client's histogram fields: pin that it
    gives exactly what `count` calls of observe() give, buckets, count and sum."""
    one_by_one = Metrics(process_metrics=False)
    batched = Metrics(process_metrics=False)
    for _ in range(7):
        one_by_one.relay_latency("amqp").observe(amount)
    FastHistogram(batched.relay_latency("amqp")).observe(amount, 7)
    expected = samples(one_by_one)
    got = samples(batched)
    keys = [
        k
        for k in expected
        if k[0].startswith("iotgw_relay_latency_seconds") and not k[0].endswith("_created")
    ]
    assert keys
    for key in keys:
        assert got[key] == pytest.approx(expected[key]), key


def test_hot_values_count_what_the_counters_would() -> None:
    """Hot-path children get a lock-free value (HotValue reaches into
    prometheus_client's children): pin that a scrape shows exactly what plain
    counters show, whichever call created the child first."""
    plain = Metrics(process_metrics=False)
    hot = Metrics(process_metrics=False)
    plain.on_mqtt_packet("PUBLISH", "in", 3)
    plain._messages_metric.labels("mqtt", "in").inc(3)
    plain._bytes_metric.labels("mqtt", "in").inc(900)
    plain._dispositions.get("accepted", "in").inc(5)
    plain._messages_metric.labels("devices/", "out").inc(2)
    plain._bytes_metric.labels("devices/", "out").inc(10)
    hot.on_mqtt_packet("PUBLISH", "in", 1)  # the child exists before it is made hot
    packets, messages, nbytes = hot.mqtt_counters("PUBLISH", "in", "mqtt")
    packets.inc(2)
    messages.inc(3)
    nbytes.inc(900)
    hot.on_disposition("accepted", "in", 4)
    hot.on_disposition("accepted", "in")
    hot.on_message("devices/", "out", 10, count=2)
    assert type(packets) is HotValue and type(messages) is HotValue
    assert hot_value(hot._mqtt_packets.get("PUBLISH", "in")) is packets  # one value per child
    expected = samples(plain)
    got = samples(hot)
    keys = [k for k in expected if not k[0].endswith("_created") and not math.isnan(expected[k])]
    assert keys
    for key in keys:
        assert got.get(key, 0.0) == pytest.approx(expected[key]), key


def test_hot_value_leaves_other_children_alone() -> None:
    class Double:
        def __init__(self) -> None:
            self.total = 0.0

        def inc(self, amount: float = 1) -> None:
            self.total += amount

    child = Double()
    assert hot_value(child) is child
    value = HotValue(2.0)
    value.inc(3)
    assert value.get() == 5.0


def test_mqtt_on_batch_is_on_packets_plus_latency() -> None:
    separate = Metrics(process_metrics=False)
    together = Metrics(process_metrics=False)
    obs = separate.mqtt_observer("mqtt", route="mqtt")
    obs.on_packets("in", "PUBLISH", 3, 900)
    obs.on_relay_latency(0.0004)
    obs.on_packets("out", "PUBACK", 2, 8)
    obs.on_relay_latency(0.002)
    batch = together.mqtt_observer("mqtt", route="mqtt")
    batch.on_batch("in", "PUBLISH", 3, 900, 0.0004)
    batch.on_batch("out", "PUBACK", 2, 8, 0.002)
    expected = samples(separate)
    got = samples(together)
    keys = [k for k in expected if not k[0].endswith("_created") and not math.isnan(expected[k])]
    assert ("iotgw_mqtt_packets_total", (("direction", "in"), ("type", "PUBLISH"))) in keys
    for key in keys:
        assert got.get(key, 0.0) == pytest.approx(expected[key]), key
