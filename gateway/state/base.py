"""The state-store interface: what the policies ask of the store, whatever holds it.

As in Django's ``contrib.sessions`` (``SessionBase`` + backends), the semantics are
written once, here and in ``gateway.state.values``; each backend only keeps the state:

- ``gateway.state.memory``: per-process objects (no Redis, and the fallback during an
  outage);
- ``gateway.state.redis_store``: Redis, one Lua script (``gateway/state/lua``) per decision.

Three operations make the interface (one Protocol each, so a policy names only what it
uses): the rate-limit window (:class:`RateLimitStore`), the breaker's steps
(:class:`BreakerStore`), and the combined admission (:class:`AdmissionStore`: the rate
limit and the breaker's first permit in one round trip); the targets' passive outlier
ejection (:class:`OutlierStore`, ``tests/gateway/policies/test_outlier.py``) sits beside
them. Every implementation is called
through one guard (``gateway.state.guard.StoreGuard``) by the policies that use it when the
store is shared (memory stores cannot fail, so the policies call them directly).
Per backend, one contract suite: ``tests/gateway/policies/test_ratelimit.py``,
``test_breaker.py`` and ``test_admission.py`` run the same cases on memory and on a
real Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.state.ejections import Ejection, OutlierConfig, Outliers
from gateway.state.values import BreakerConfig, BreakerStatus, Decision, Permit, Scope, Transition


class RateLimitStore(Protocol):
    """Where the sliding-window log lives. One call decides all scopes of a request atomically."""

    async def hit(
        self, scopes: Sequence[Scope], now: float, *, cost_only_if_all_allowed: bool = True
    ) -> Decision: ...

    async def peek(self, scopes: Sequence[Scope], now: float) -> Decision: ...


class BreakerStore(Protocol):
    """Where breaker state lives; every method is one atomic decision."""

    async def acquire(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> tuple[Permit, Transition | None]: ...

    async def record(
        self, module: str, cfg: BreakerConfig, now: float, *, failure: bool, probe_id: str | None
    ) -> Transition | None: ...

    async def status(self, module: str, cfg: BreakerConfig, now: float) -> BreakerStatus: ...

    async def statuses(
        self, modules: list[str], cfg_for: Callable[[str], BreakerConfig], now: float
    ) -> dict[str, BreakerStatus]: ...

    async def force(self, module: str, action: str, now: float) -> Transition | None: ...

    async def mark_healthy(
        self, module: str, cfg: BreakerConfig, now: float
    ) -> Transition | None: ...

    async def release(self, module: str, probe_id: str) -> None: ...


class AdmissionStore(Protocol):
    """The rate limit and the breaker's first permit, decided in one store call."""

    async def admit(
        self,
        scopes: Sequence[Scope],
        now: float,
        module: str,
        cfg: BreakerConfig,
        breaker_now: float,
        *,
        shadow: bool,
    ) -> tuple[Decision, Permit | None]:
        """Charge ``scopes`` all-or-nothing at ``now``; when admitted (or ``shadow``: a
        shadow-mode limiter peeks even when it would refuse) also answer ``module``'s
        breaker at ``breaker_now`` if that needs no write (closed, or open before its
        recovery time). ``None``: the breaker is left to its own ``acquire``."""
        ...


class OutlierStore(Protocol):
    """Passive outlier ejection per target (SPEC §18), shared by every process that uses
    the store; each method is one atomic step (arithmetic: ``gateway.state.ejections``)."""

    async def record(
        self,
        module: str,
        target: str,
        now: float,
        cfg: OutlierConfig,
        *,
        failure: bool,
        n_targets: int,
        stretch: float,
    ) -> Ejection | None:
        """One gateway result of ``target``: a failure counts towards its ejection (refused
        past ``max_ejection_percent`` of the ``n_targets`` of its pool), a success resets
        the count. ``stretch`` (1 + jitter × U[0, 1)) lengthens an ejection. Returns the
        ejection this result caused, if any."""
        ...

    async def return_early(
        self, module: str, target: str, now: float, cfg: OutlierConfig
    ) -> Ejection | None:
        """A passing active probe ends ``target``'s ejection now (its count decays on)."""
        ...

    async def outliers(self, module: str, now: float, cfg: OutlierConfig) -> Outliers:
        """The module's ejected, failing and down targets and their ejection counts (one
        read)."""
        ...

    async def mark_down(self, module: str, target: str, down: bool, cfg: OutlierConfig) -> bool:
        """The health worker's verdict on ``target`` (SPEC §18): ``down`` until a probe
        passes. Returns whether the flag changed. A down flag keeps the module's state
        alive (``cfg.ttl``) while the worker repeats it."""
        ...


__all__ = ["AdmissionStore", "BreakerStore", "OutlierStore", "RateLimitStore"]
