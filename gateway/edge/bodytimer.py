"""The request-body progress timeout (``VX11_CLIENT_BODY_TIMEOUT``) on one coarse timer.

A client that sends its headers and then trickles (or stops sending) its body would hold
a connection, and once forwarded a backpressure slot and an upstream connection, for as
long as it likes. nginx's ``client_body_timeout`` and Envoy's ``stream_idle_timeout`` bound
the wait for the *next* piece of the body, not the whole upload; so does this.

Why not ``asyncio.timeout`` around each ``receive``: a ``Timeout`` object, a timer handle
scheduled and cancelled, ≈ 5 µs per body read measured here, on every request with a body.
Instead a reader notes the time by which its current wait must end in a dict (two dict
operations) and one sweep per event loop, armed only while someone waits, cancels the
readers whose time has passed. The price is precision: a timeout fires between its
deadline and one sweep interval (a tenth of the timeout, at most 1 s) later.

One reader, ``gateway.edge.body._receive``, uses it for every body message: it puts
``task -> deadline`` in ``waiting``, arms the sweep if needed, and on cancellation asks
``expired(task)`` whether the sweep cancelled it (then the 408 problem is raised).

The task that awaits ``receive`` is the one cancelled, whichever it is (the request's own
task, or aiohttp's task that streams a request body upstream).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.core.conf import gw

#: Sweep at most this often per second and at least once per this many seconds.
MIN_INTERVAL = 0.02
MAX_INTERVAL = 1.0


class BodyWaits:
    """The readers of one event loop that wait for request-body bytes.

    A reader puts ``task -> deadline`` in ``waiting`` (``deadline()`` gives one), calls
    ``arm()`` if ``handle`` is None, and takes its entry out when its wait ends.
    """

    __slots__ = ("fired", "generation", "handle", "interval", "loop", "timeout", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self.fired: set[asyncio.Task[Any]] = set()
        self.handle: asyncio.TimerHandle | None = None
        self.generation = -1
        self.timeout = self.interval = 0.0

    def deadline(self) -> float:
        """When a wait that starts now times out (``loop.time()``)."""
        if self.generation != gw.generation:
            self.generation = gw.generation
            self.timeout = gw.client_body_timeout
            self.interval = max(MIN_INTERVAL, min(MAX_INTERVAL, self.timeout / 10.0))
        return self.loop.time() + self.timeout

    def arm(self) -> None:
        self.handle = self.loop.call_at(self.loop.time() + self.interval, self._sweep)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """After ``CancelledError`` in a wait: True when the cancel was this timeout's.

        The cancel is then taken back (``uncancel``), as ``asyncio.timeout`` does; a task
        cancelled by someone else as well stays cancelled (False).
        """
        if task not in self.fired:
            return False
        self.fired.discard(task)
        return task.uncancel() == 0

    def _sweep(self) -> None:
        now = self.loop.time()
        if self.fired:  # normally emptied by ``expired`` at once
            self.fired = {task for task in self.fired if not task.done()}
        late = [task for task, deadline in self.waiting.items() if deadline <= now]
        for task in late:
            del self.waiting[task]
            self.fired.add(task)
            task.cancel()
        self.handle = None
        if self.waiting:
            self.arm()


_by_loop: dict[asyncio.AbstractEventLoop, BodyWaits] = {}


def waits() -> BodyWaits:
    """This event loop's readers."""
    loop = asyncio.get_running_loop()
    found = _by_loop.get(loop)
    if found is None:
        if len(_by_loop) > 64:  # loops of finished test runs or threads
            for old in [old for old in _by_loop if old.is_closed()]:
                del _by_loop[old]
        found = _by_loop[loop] = BodyWaits(loop)
    return found


__all__ = ["BodyWaits", "waits"]
