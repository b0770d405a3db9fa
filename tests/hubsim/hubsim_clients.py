"""Device-side helpers for hubsim's tests: real proton and paho clients.

Tokens are computed here with hmac directly, independent of both hubsim and
gateway.auth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import queue
import time
import uuid
from typing import Any
from urllib.parse import quote_plus

import paho.mqtt.client as mqtt
from proton import Message, SSLDomain
from proton.reactor import LinkOption
from proton.utils import BlockingConnection

from tests.waiting import FAILSAFE

HUB_HOST = "myhub.azure-devices.net"
CBS_TYPE = "servicebus.windows.net:sastoken"
TIMEOUT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def sas_token(resource: str, key_b64: str, expiry: int | None = None, policy: str | None = None) -> str:
    expiry = int(time.time()) + 3600 if expiry is None else expiry
    sr = quote_plus(resource)
    digest = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    token = f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(digest).decode())}&se={expiry}"
    return token + (f"&skn={policy}" if policy else "")


def device_uri(identity: str) -> str:
    dev, _, mod = identity.partition("/")
    return f"{HUB_HOST}/devices/{dev}" + (f"/modules/{mod}" if mod else "")


class TargetAddress(LinkOption):
    """Sets a receiver's own target address (the CBS reply-to it listens on)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: Any) -> None:
        link.target.address = self.address

    def test(self, link: Any) -> bool:
        return bool(link.is_receiver)


class AmqpDevice:
    """A python-qpid-proton connection to the hub (BlockingConnection)."""

    def __init__(self, hub: Any, mechs: str = "ANONYMOUS", user: str | None = None,
                 password: str | None = None, cert: tuple[str, str] | None = None) -> None:
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        domain.set_trusted_ca_db(hub.ca_file)
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        if cert is not None:
            domain.set_credentials(cert[0], cert[1], None)
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user, password=password)
        self.conn = BlockingConnection(
            f"amqps://127.0.0.1:{hub.amqp_port}",
            ssl_domain=domain,
            allowed_mechs=mechs,
            virtual_host=HUB_HOST,
            timeout=TIMEOUT,
            **kwargs,
        )
        self.cbs_tx = None
        self.cbs_rx = None
        self.next_id = 0

    def cbs(self, reply_to: str | None = None) -> None:
        options = [TargetAddress(reply_to)] if reply_to else None
        self.cbs_rx = self.conn.create_receiver("$cbs", options=options)
        self.cbs_tx = self.conn.create_sender("$cbs")
        self.reply_to = reply_to

    def put_token(self, audience: str, token: str, token_type: str = CBS_TYPE) -> Message:
        if self.cbs_tx is None:
            self.cbs()
        assert self.cbs_tx is not None and self.cbs_rx is not None
        request = Message(
            id=self.next_id,
            reply_to=self.reply_to,
            properties={"operation": "put-token", "type": token_type, "name": audience},
            body=token,
        )
        self.next_id += 1
        self.cbs_tx.send(request)
        reply = self.cbs_rx.receive(timeout=TIMEOUT)
        assert reply.correlation_id == request.id
        return reply

    def sync(self) -> None:
        """A round trip: everything sent before it has reached the hub when it returns."""
        self.conn.create_sender("$cbs", name=f"sync-{uuid.uuid4()}").close()

    def close(self) -> None:
        self.conn.close()


class MqttDevice:
    """A paho-mqtt device; callbacks land in a queue the test reads with timeouts."""

    def __init__(self, hub: Any, client_id: str, password: str | None, username: str | None = None,
                 cert: tuple[str, str] | None = None, keepalive: int = 30, clean_session: bool = False,
                 will: tuple[str, bytes] | None = None) -> None:
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            reconnect_on_failure=False,
        )
        dev, _, mod = client_id.partition("/")
        username = username or f"{HUB_HOST}/{dev}/" + (f"{mod}/" if mod else "") + "?api-version=2021-04-12"
        self.client.username_pw_set(username, password)
        # Verification stays on: the hub certificate carries 127.0.0.1 in its SANs.
        if cert is not None:
            self.client.tls_set(ca_certs=hub.ca_file, certfile=cert[0], keyfile=cert[1])
        else:
            self.client.tls_set(ca_certs=hub.ca_file)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=0)
        self.client.on_connect = lambda c, u, f, rc, p: self.events.put(("connect", rc))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.events.put(("disconnect", rc))
        self.client.on_message = lambda c, u, m: self.events.put(("message", m.topic, m.payload, m.qos))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback", [r.value for r in rcs]))
        self.client.connect("127.0.0.1", hub.mqtt_port, keepalive=keepalive)
        self.client.loop_start()

    def expect(self, kind: str) -> tuple[Any, ...]:
        while True:
            event = self.events.get(timeout=TIMEOUT)
            if event[0] == kind:
                return event

    def connected(self) -> bool:
        event = self.expect("connect")
        return not event[1].is_failure

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        self.client.subscribe([(f, qos) for f in filters])
        return self.expect("suback")[1]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def stop(self) -> None:
        self.client.loop_stop()
