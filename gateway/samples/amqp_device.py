"""A sample AMQP 1.0 device on python-qpid-proton, talking to IoT Hub through iot-gateway.

The device speaks plaintext AMQP to the gateway (or, given --ca-file, TLS straight
to a hub) and does what the Azure IoT SDKs do over AMQP:

1. Claims-based security: it computes a SAS token from its device key and puts
   it on the ``$cbs`` node; the hub answers with a status code.
2. Telemetry, at-least-once: every message is sent unsettled and counts as
   delivered only when the hub accepts it; a released or modified message is
   sent again, a rejected one is not (the hub refused it for good).
3. A cloud-to-device command: it receives one message from its devicebound
   node and accepts it, which completes the message at the hub.

The hub host name stays the real one in the token, the CBS audience and the
link addresses; only the TCP endpoint is the gateway's.

    python -m gateway.samples.amqp_device --host 127.0.0.1 --port 5672 \\
        --hub-host myhub.azure-devices.net --device-id dev1 --key BASE64KEY
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proton import Delivery, Message, SSLDomain, Timeout
from proton.reactor import LinkOption
from proton.utils import BlockingConnection, SendException

from .common import DeviceSettings, Say, device_arguments, device_say, sas_token

CBS_TOKEN_TYPE = "servicebus.windows.net:sastoken"
CBS_REPLY_TO = "cbs"  # the address our CBS receiver listens on (as the Java and Node SDKs do)
MAX_SEND_ATTEMPTS = 3


@dataclass
class Settings(DeviceSettings):
    messages: int = 3
    c2d_timeout: float = 10.0  # how long to wait for a command; 0 = do not wait
    timeout: float = 10.0  # every other step


@dataclass
class SentMessage:
    message_id: str
    encoded: bytes  # the AMQP message exactly as put on the wire
    outcome: str  # accepted | rejected | released | modified
    attempts: int


@dataclass
class ReceivedCommand:
    message_id: Any
    body: bytes
    properties: dict[str, Any]
    outcome: str


@dataclass
class Result:
    """What the device did and saw; ``error`` says where it stopped, if it did."""

    cbs_status: int | None = None
    cbs_description: str = ""
    sent: list[SentMessage] = field(default_factory=list)
    command: ReceivedCommand | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DeviceError(Exception):
    pass


class ReceiverTarget(LinkOption):
    """Gives a receiver its own target address: where the CBS node sends replies."""

    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: Any) -> None:
        link.target.address = self.address

    def test(self, link: Any) -> bool:
        return bool(link.is_receiver)


def run(settings: Settings, say: Say = print) -> Result:
    """Run the whole sample; never raises for a network or protocol failure."""
    result = Result()
    connection: BlockingConnection | None = None
    try:
        connection = connect(settings, say)
        put_token(connection, settings, result, say)
        send_telemetry(connection, settings, result, say)
        if settings.c2d_timeout > 0:
            receive_command(connection, settings, result, say)
    except DeviceError as exc:
        result.error = str(exc)
    except Exception as exc:  # proton reports failures as many exception types
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass  # already gone; nothing left to tell the peer
    if result.error:
        say(f"failed: {result.error}")
    return result


def connect(settings: Settings, say: Say) -> BlockingConnection:
    scheme = "amqps" if settings.ca_file else "amqp"
    url = f"{scheme}://{settings.host}:{settings.port}"
    domain = None
    if settings.ca_file:
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        domain.set_trusted_ca_db(settings.ca_file)
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    connection = BlockingConnection(
        url,
        timeout=settings.timeout,
        ssl_domain=domain,
        allowed_mechs="ANONYMOUS",
        # The AMQP open hostname (and TLS server name) is the hub, not the gateway.
        virtual_host=settings.hub_host,
    )
    say(f"connected to {url} ({'TLS' if domain else 'plaintext'}), SASL ANONYMOUS")
    return connection


def put_token(connection: BlockingConnection, settings: Settings, result: Result, say: Say) -> None:
    audience = f"{settings.hub_host}/devices/{settings.device_id}"
    replies = connection.create_receiver(
        "$cbs", name="$cbs-receiver", options=ReceiverTarget(CBS_REPLY_TO)
    )
    requests = connection.create_sender("$cbs", name="$cbs-sender")
    request = Message(
        id=str(uuid.uuid4()),
        reply_to=CBS_REPLY_TO,
        properties={"operation": "put-token", "type": CBS_TOKEN_TYPE, "name": audience},
        body=sas_token(audience, settings.key),
    )
    requests.send(request)
    reply = replies.receive(timeout=settings.timeout)
    if replies.fetcher.unsettled:  # the hub may send its reply settled: nothing to accept then
        replies.accept()
    if reply.correlation_id != request.id:
        raise DeviceError(f"CBS reply for another request ({reply.correlation_id!r})")
    props = reply.properties or {}
    result.cbs_status = int(props.get("status-code", 0))
    result.cbs_description = str(props.get("status-description", ""))
    say(f"CBS put-token for {audience}: {result.cbs_status} {result.cbs_description}")
    if result.cbs_status not in (200, 202):
        raise DeviceError(
            f"the hub refused the token: {result.cbs_status} {result.cbs_description}"
        )


def telemetry_message(settings: Settings, n: int) -> Message:
    reading = {"deviceId": settings.device_id, "seq": n, "temperature": round(20.5 + n * 0.7, 1)}
    message = Message(
        id=f"{settings.device_id}-{n}",
        body=json.dumps(reading, separators=(",", ":")).encode(),
        content_type="application/json",
        content_encoding="utf-8",
        properties={"temperatureAlert": "false"},  # application properties route messages
    )
    message.inferred = True  # a data section, as the SDKs send telemetry
    return message


def send_telemetry(
    connection: BlockingConnection, settings: Settings, result: Result, say: Say
) -> None:
    address = f"amqps://{settings.hub_host}/devices/{settings.device_id}/messages/events"
    sender = connection.create_sender(address)
    for n in range(1, settings.messages + 1):
        message = telemetry_message(settings, n)
        encoded = message.encode()
        outcome, attempts = send_at_least_once(sender, message, settings.timeout)
        result.sent.append(SentMessage(str(message.id), encoded, outcome, attempts))
        say(f"telemetry {message.id} ({len(encoded)} bytes): {outcome}")
        if outcome != "accepted":
            raise DeviceError(f"telemetry {message.id} was not accepted: {outcome}")


def send_at_least_once(sender: Any, message: Message, timeout: float) -> tuple[str, int]:
    """Send unsettled until the hub accepts; resend when it releases or modifies.

    Returns the last outcome and the number of attempts.
    """
    resend = (Delivery.RELEASED, Delivery.MODIFIED)
    outcome = "unknown"
    attempts = 0
    while attempts < MAX_SEND_ATTEMPTS:
        attempts += 1
        try:
            sender.send(message, timeout=timeout, error_states=[Delivery.REJECTED, *resend])
            return "accepted", attempts
        except SendException as exc:
            outcome = _outcome_name(exc.state)
            if exc.state not in resend:
                break  # rejected: the hub will never take this message
    return outcome, attempts


def receive_command(
    connection: BlockingConnection, settings: Settings, result: Result, say: Say
) -> None:
    address = f"amqps://{settings.hub_host}/devices/{settings.device_id}/messages/devicebound"
    receiver = connection.create_receiver(address, credit=1)
    say(f"waiting up to {settings.c2d_timeout:g} s for a cloud-to-device command")
    try:
        message = receiver.receive(timeout=settings.c2d_timeout)
    except Timeout:
        raise DeviceError("no cloud-to-device command arrived") from None
    receiver.accept()  # completes the message at the hub
    body = _body_bytes(message.body)
    result.command = ReceivedCommand(message.id, body, dict(message.properties or {}), "accepted")
    say(f"command {message.id}: {body.decode(errors='replace')} (accepted)")


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return json.dumps(body, default=str).encode()  # an amqp-value map or list


def _outcome_name(state: Any) -> str:
    names = {
        Delivery.ACCEPTED: "accepted",
        Delivery.REJECTED: "rejected",
        Delivery.RELEASED: "released",
        Delivery.MODIFIED: "modified",
    }
    return names.get(state, str(state))


def main(argv: Sequence[str] | None = None) -> int:
    parser = device_arguments(
        "python -m gateway.samples.amqp_device",
        "Sample AMQP device: CBS put-token, telemetry at-least-once, one C2D command.",
        protocol="AMQP",
        port=5672,
        messages=3,
    )
    parser.add_argument(
        "--c2d-timeout", type=float, default=10.0,
        help="seconds to wait for a cloud-to-device command (0: do not wait)",
    )  # fmt: skip
    settings = Settings(**vars(parser.parse_args(argv)))
    result = run(settings, say=device_say(settings.device_id))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
