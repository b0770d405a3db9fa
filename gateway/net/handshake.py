"""The bytes device connections may hold before they are authenticated, across all of them.

Each protocol bounds one connection's handshake (the MQTT CONNECT limit, the
AMQP SASL and pre-open frame limits); this bounds their sum, so many
connections at once cannot add up to more memory than a small machine has.

A connection still in its handshake reads only into bytes it holds here
(`Hold.grow_to` before each read); the hold is given back when the handshake
is over, whatever the outcome. Over the budget, a connection WAITS for others
to finish rather than being refused: its handshake timeout keeps running, so
a flood of huge handshakes delays devices by at most that timeout and the
memory stays bounded; a device that cannot get its bytes in time is closed as
any slow handshake is. A connection always gets bytes when it holds none and
nothing else does, so one handshake larger than the budget still progresses.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

__all__ = [
    "DEFAULT_HANDSHAKE_BUDGET",
    "HANDSHAKE_READ",
    "HandshakeBudget",
    "HandshakeStream",
    "Hold",
]

#: Bytes all connections in their handshake may hold together: 512 MQTT CONNECTs
#: at the 16 KiB limit, or thousands of ordinary handshakes of a few hundred bytes.
DEFAULT_HANDSHAKE_BUDGET = 8 * 1024 * 1024
#: Largest single read while in a handshake (the engines ask for less when they know).
HANDSHAKE_READ = 4096


class HandshakeBudget:
    """Bytes held by connections in their handshake; see the module docstring."""

    def __init__(self, limit: int = DEFAULT_HANDSHAKE_BUDGET) -> None:
        if limit < 1:
            raise ValueError("the handshake budget must be positive")
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.waits = 0  # times a connection had to wait (for tests and metrics)
        self._lot = trio.lowlevel.ParkingLot()

    def hold(self) -> Hold:
        """A new connection's share, holding nothing yet."""
        return Hold(self)

    def _take(self, amount: int, current: int) -> bool:
        if self.held + amount > self.limit and self.held > current:
            return False
        self.held += amount
        self.peak = max(self.peak, self.held)
        return True

    def _give(self, amount: int) -> None:
        if amount:
            self.held -= amount
            self._lot.unpark_all()


class Hold:
    """One connection's bytes in the budget."""

    __slots__ = ("budget", "amount")

    def __init__(self, budget: HandshakeBudget) -> None:
        self.budget = budget
        self.amount = 0

    async def grow_to(self, amount: int) -> None:
        """Hold `amount` bytes in all, waiting while the others hold too much."""
        budget = self.budget
        extra = amount - self.amount
        if extra <= 0:
            budget._give(-extra)
            self.amount = amount
            await trio.lowlevel.checkpoint()
            return
        waited = False
        while not budget._take(extra, self.amount):
            if not waited:
                budget.waits += 1
                waited = True
            await budget._lot.park()
        self.amount = amount
        await trio.lowlevel.checkpoint()

    def release(self) -> None:
        """Give everything back (the handshake is over, or the connection ended)."""
        self.budget._give(self.amount)
        self.amount = 0


class HandshakeStream(trio.abc.Stream):
    """A device stream whose reads, until `done()`, come out of a `Hold`.

    Each read is at most `HANDSHAKE_READ` bytes, and first the hold grows to what
    the protocol engine still buffers (`buffered()`) plus that read. After
    `done()` (the handshake is over; also when the connection ends) reads pass
    straight through.
    """

    def __init__(self, stream: trio.abc.Stream, hold: Hold, buffered: Callable[[], int]) -> None:
        self._stream = stream
        self._hold: Hold | None = hold
        self._buffered = buffered
        # Writes are not held: the stream's non-blocking write, if it has one, is
        # offered as is (the AMQP driver writes with it at the end of a loop turn).
        send_nowait = getattr(stream, "send_nowait", None)
        if send_nowait is not None:
            self.send_nowait = send_nowait

    def done(self) -> None:
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        hold = self._hold
        if hold is None:
            return await self._stream.receive_some(max_bytes)
        size = HANDSHAKE_READ if max_bytes is None else min(max_bytes, HANDSHAKE_READ)
        await hold.grow_to(self._buffered() + size)
        return await self._stream.receive_some(size)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.done()
        await self._stream.aclose()
