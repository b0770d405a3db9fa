"""An epoll selector for python-qpid-proton's Container.

proton's Python reactor waits with select.select(), which fails for file
descriptors above 1023 and rescans every selectable on each update (quadratic
in the number of connections). A bench device process holds thousands of
connections, so `install()` swaps in this selector: epoll registrations kept in
step with each selectable's reading/writing flags, deadlines in a heap.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time
from typing import Any

_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class EpollSelector:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._selectables: set[Any] = set()
        self._fd_of: dict[Any, int] = {}
        self._by_fd: dict[int, Any] = {}
        self._masks: dict[int, int] = {}
        self._deadlines: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()

    @property
    def selectables(self) -> int:
        return len(self._selectables)

    def add(self, selectable: Any) -> None:
        self._selectables.add(selectable)
        self.update(selectable)

    def remove(self, selectable: Any) -> None:
        self._selectables.discard(selectable)
        fd = self._fd_of.pop(selectable, None)
        if fd is not None and self._by_fd.get(fd) is selectable:
            del self._by_fd[fd]
            if self._masks.pop(fd, 0):
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass  # already closed: epoll dropped it

    def update(self, selectable: Any) -> None:
        if selectable not in self._selectables:
            return
        deadline = selectable.deadline
        if deadline:
            heapq.heappush(self._deadlines, (deadline, next(self._seq), selectable))
        fd = selectable.fileno()
        if fd is None or fd < 0:
            return
        self._fd_of[selectable] = fd
        self._by_fd[fd] = selectable
        mask = (select.EPOLLIN if selectable.reading else 0) | (
            select.EPOLLOUT if selectable.writing else 0
        )
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        try:
            if not mask:
                self._epoll.unregister(fd)
            elif not old:
                self._epoll.register(fd, mask)
            else:
                self._epoll.modify(fd, mask)
        except FileExistsError:
            self._epoll.modify(fd, mask)
        except FileNotFoundError:
            if mask:
                self._epoll.register(fd, mask)
        self._masks[fd] = mask

    def _earliest(self) -> float | None:
        heap = self._deadlines
        while heap:
            deadline, _, selectable = heap[0]
            if selectable in self._selectables and selectable.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def select(self, timeout: float | None) -> tuple[list[Any], list[Any], list[Any]]:
        now = time.time()
        deadline = self._earliest()
        if deadline is not None:
            until = max(0.0, deadline - now)
            wait = until if timeout is None else max(0.0, min(timeout, until))
        else:
            wait = -1.0 if timeout is None else max(0.0, timeout)
        try:
            events = self._epoll.poll(wait)
        except InterruptedError:
            events = []
        readable: list[Any] = []
        writable: list[Any] = []
        for fd, flags in events:
            selectable = self._by_fd.get(fd)
            if selectable is None:
                continue
            if flags & _READ and selectable.reading:
                readable.append(selectable)
            if flags & _WRITE and selectable.writing:
                writable.append(selectable)
        expired: list[Any] = []
        now = time.time()
        heap = self._deadlines
        while heap and heap[0][0] < now:
            deadline, _, selectable = heapq.heappop(heap)
            if (selectable in self._selectables and selectable.deadline == deadline
                    and selectable not in expired):  # fmt: skip
                expired.append(selectable)
        return readable, writable, expired


def install() -> None:
    """Make every Container created from now on use EpollSelector."""
    from proton import _io

    _io.IO.Selector = EpollSelector  # type: ignore[misc]
