"""One value per running event loop, for the registries that need one.

asyncio objects (connections, queues, futures) belong to the loop that made them, so
per-process singletons are kept per loop. Keying by ``id(loop)`` alone is not enough: a
loop that closed may have its id reused by a new one, which would then be handed the dead
loop's objects. :class:`PerLoop` keeps the loop itself next to the value and treats a
value made for another loop (or, with ``fresh``, one that is no longer current) as absent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator


class PerLoop[T]:
    """``get(make)``: the value of the running loop, made by ``make()`` on first use."""

    __slots__ = ("_lock", "_values", "fresh")

    def __init__(self, fresh: Callable[[T], bool] | None = None) -> None:
        """``fresh(value)``: False when ``value`` is stale and must be made anew (e.g. the
        settings were reloaded since it was built)."""
        self._values: dict[int, tuple[asyncio.AbstractEventLoop, T]] = {}
        self._lock = threading.Lock()
        self.fresh = fresh

    def get(self, make: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        found = self._values.get(id(loop))
        if found is not None and found[0] is loop:
            value = found[1]
            if self.fresh is None or self.fresh(value):
                return value
        value = make()
        with self._lock:
            self._values[id(loop)] = (loop, value)
        return value

    def current(self) -> T | None:
        """The running loop's value, if it has one (never makes one)."""
        loop = asyncio.get_running_loop()
        found = self._values.get(id(loop))
        return found[1] if found is not None and found[0] is loop else None

    def pop(self, loop: asyncio.AbstractEventLoop | None = None) -> T | None:
        """Forget ``loop``'s value (default: the running loop's) and return it."""
        loop = loop or asyncio.get_running_loop()
        with self._lock:
            found = self._values.pop(id(loop), None)
        return found[1] if found is not None and found[0] is loop else None

    def values(self) -> Iterator[T]:
        return (value for _, value in list(self._values.values()))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


__all__ = ["PerLoop"]
