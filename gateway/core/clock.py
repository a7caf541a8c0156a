"""The clock type policies take, so tests can inject a ``FakeClock`` instead of sleeping."""

from __future__ import annotations

from collections.abc import Callable

#: Returns seconds as a float: ``time.time`` where state is shared across hosts,
#: ``time.monotonic`` where it stays inside one process.
Clock = Callable[[], float]

__all__ = ["Clock"]
