"""Timeouts for shared-store calls that charge the store, not our own event loop.

A request-path store call gets ``VX11_STORE_TIMEOUT`` (50 ms) before the caller falls back
to in-process state. Measured with ``asyncio.wait_for``, that budget also pays for time the
event loop spent running *other* work: under a burst of concurrent requests (or a GC
pause) the loop is busy for tens of milliseconds, the store's answer sits unread in the
socket, the timer fires, and a healthy store is declared unavailable — each process then
limits on its own and lets its own half-open probes through (a burst of 200 over two hosts
admitted up to 157 against a global limit of 100; tests/reliability/test_multihost.py).

:func:`store_call` spends the budget in small steps. A step is charged to the store only
when the store answered nothing in this process during it (:func:`answered`, called by the
shared client on every reply, error replies included), and only at its scheduled
length, however late the loop got round to it. So a store that does not answer while the
loop is responsive still times out after ``timeout``, as before; a store that keeps
answering, or a loop that is too busy to read the answers, stretches the wait — up to
``cap`` seconds of wall time, whatever happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

#: The budget is spent in this many steps (a call that answers within the first step costs
#: one timer, as ``asyncio.wait_for`` does).
STEPS = 5


class _Answers:
    """How many store calls of this process have been answered (any loop, any caller)."""

    count = 0


class _Budget:
    """Moves an ``asyncio.timeout`` to "now" once ``timeout`` seconds have been charged."""

    def __init__(self, cm: asyncio.Timeout, timeout: float, cap: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.cm = cm
        self.step = timeout / STEPS
        self.left = timeout
        self.give_up_at = self.loop.time() + cap
        self.answers = _Answers.count
        self.handle: asyncio.TimerHandle | None = None
        self._schedule()

    def _schedule(self) -> None:
        when = self.loop.time() + min(self.step, self.left)
        self.handle = self.loop.call_at(min(when, self.give_up_at), self._tick)

    def _tick(self) -> None:
        if _Answers.count == self.answers:  # the store said nothing during this step
            self.left -= self.step  # the scheduled length, not the loop's lateness
        self.answers = _Answers.count
        if self.left <= 1e-9 or self.loop.time() >= self.give_up_at:
            self.handle = None
            self.cm.reschedule(self.loop.time())  # expires: TimeoutError in the caller
            return
        self._schedule()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def answered() -> None:
    """Note that the store answered a command (the shared client calls it on every reply)."""
    _Answers.count += 1


def default_cap(timeout: float) -> float:
    """The wall-time bound of one store call: 20 × ``timeout``, at least 1 s."""
    return max(1.0, 20 * timeout)


async def store_call[T](
    factory: Callable[[], Awaitable[T]], timeout: float, *, cap: float | None = None
) -> T:
    """``await factory()`` within ``timeout`` seconds of store time, else ``TimeoutError``.

    ``cap`` (default :func:`default_cap`) bounds the wall time however busy the loop is.
    """
    async with asyncio.timeout(None) as cm:
        budget = _Budget(cm, timeout, default_cap(timeout) if cap is None else cap)
        try:
            result = await factory()
        finally:
            budget.cancel()
    answered()
    return result


__all__ = ["STEPS", "answered", "default_cap", "store_call"]
