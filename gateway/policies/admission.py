"""Rate limit and breaker admission in one store round trip.

With shared state in Redis, a proxied request used to make two script calls before going
upstream: the rate limiter's decision, then the breaker's ``acquire``. Each round trip costs
CPU in the gateway (encode, a future, a reply to parse, a timeout budget), so when both
policies keep their state in the same store, :class:`Admission` asks the store for both at
once: the state store's combined admission (``gateway.state.base.AdmissionStore``; in
Redis ``admit.lua``, made of exactly the rate limiter's Lua function and the breaker's
read-only ``peek``, the first part of its acquire).

The peek answers the common cases: a closed breaker (the permit for the first attempt) and
an open breaker before its recovery time (refused). Anything that needs writes — the move
to half-open, a probe lease — is left to the ordinary ``acquire`` in the pipeline's
``forward``, so a permit obtained here never holds anything that would have to be given
back if the request ends early (a client that hangs up, a body that is too large).

Everything the two policies guarantee separately still holds: the rate limit is atomic
across processes; the breaker state read here is the shared one. If the store fails, the
rate limiter answers per its ``fail_mode`` and the breaker falls back to in-process state,
exactly as when called separately; while either is in its retry back-off the two calls are
made separately (each policy probes the store on its own schedule, through its own guard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.policies.breaker import CircuitBreaker, Permit
from gateway.policies.ratelimit import Decision, RateLimiter, Scope
from gateway.state.base import AdmissionStore
from gateway.state.guard import StoreGuard, StoreUnavailable
from gateway.state.redis_store import combined


# Not frozen (made per request; docs/PERFORMANCE.md "fourth pass"), never changed.
@dataclass(slots=True)
class Admitted:
    """The rate-limit decision, and the breaker's permit for the first attempt if known."""

    decision: Decision
    permit: Permit | None


class Admission:
    """Decides rate limit and (when it can) the first breaker permit together."""

    def __init__(
        self, limiter: RateLimiter, breaker: CircuitBreaker, store: AdmissionStore | None = None
    ) -> None:
        """``store``: the combined operation to use; by default the one the two policies'
        stores offer together (none when they are not one shared store)."""
        self.limiter = limiter
        self.breaker = breaker
        self._limits_guard = limiter.guard
        self._breaker_guard: StoreGuard | None = breaker.guard
        self._store: AdmissionStore | None = None
        if breaker.enabled and self._breaker_guard is not None:
            self._store = store or combined(limiter.backend, breaker.store)

    async def admit(self, scopes: Sequence[Scope], module: str | None) -> Admitted:
        """The rate-limit decision for ``scopes``; with ``module``, also peek its breaker.

        Pass ``module`` only when the request will go upstream next, so that the permit
        is for its first attempt.
        """
        store = self._store
        breaker_guard = self._breaker_guard
        limits_guard = self._limits_guard
        if (
            store is None
            or breaker_guard is None
            or module is None
            or not scopes
            or limits_guard.degraded
            or breaker_guard.degraded
        ):
            return Admitted(await self.limiter.check(scopes), None)
        limiter = self.limiter
        now = limiter.now()
        breaker_now = self.breaker.clock()
        cfg = self.breaker.config_for(module)
        shadow = not limiter.enforce
        try:
            decision, permit = await limits_guard.call(
                lambda: store.admit(scopes, now, module, cfg, breaker_now, shadow=shadow)
            )
        except StoreUnavailable as exc:
            breaker_guard.mark_unavailable(exc)
            decision = await limiter.fallback(scopes, now, consume=True)
            return Admitted(limiter.enforced(decision), None)
        return Admitted(limiter.enforced(decision), permit)


__all__ = ["Admission", "Admitted"]
