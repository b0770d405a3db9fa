"""A device's own SASL login, relayed over a fresh upstream connection.

The Device Provisioning Service authenticates each registration in the SASL
layer (PLAIN, user ``{idScope}/registrations/{regId}``, the registration's SAS
token as password), so such a login cannot share a hub connection: the
gateway opens one upstream connection per such device, sends the device's
sasl-init frame as it came, and answers the device with the service's
sasl-outcome code. The protocol side is `gateway.amqp.sasl.SaslRelayClient`.
"""

from __future__ import annotations

import trio

from gateway.amqp.sasl import SaslRelayClient

__all__ = ["PrefixedStream", "relay_sasl_login"]

_READ_SIZE = 65536


async def relay_sasl_login(stream: trio.abc.Stream, relay: SaslRelayClient) -> trio.abc.Stream:
    """Run the SASL exchange on `stream`; `relay.outcome` holds the server's code after.

    Returns the stream to carry on with (bytes the server sent after its outcome
    are read first). Raises trio.BrokenResourceError if the server hangs up
    first, `gateway.amqp.FramingError` on bytes that are not SASL."""
    await stream.send_all(relay.start())
    while relay.outcome is None:
        data = await stream.receive_some(_READ_SIZE)
        if not data:
            raise trio.BrokenResourceError("the server closed the connection during SASL")
        out = relay.receive_data(data)
        if out:
            await stream.send_all(out)
    return PrefixedStream(stream, relay.rest) if relay.rest else stream


class PrefixedStream(trio.abc.Stream):
    """`stream` with `prefix` read before anything else."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            return out
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
