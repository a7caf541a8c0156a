"""Rate limit and breaker admission in one store round trip.

With shared state in Redis, a proxied request used to make two script calls before going
upstream: the rate limiter's decision, then the breaker's ``acquire``. Each round trip costs
CPU in the gateway (encode, a future, a reply to parse, a timeout budget), so when both
policies keep their state in the same Redis, :class:`Admission` runs one script that holds
both: the rate-limit decision (exactly the same Lua function as
``gateway.policies.ratelimit``) and the breaker's read-only ``peek`` (the first part of
``gateway.policies.breaker``'s acquire).

The peek answers the common cases: a closed breaker (the permit for the first attempt) and
an open breaker before its recovery time (refused). Anything that needs writes — the move
to half-open, a probe lease — is left to the ordinary ``acquire`` in the pipeline's
``forward``, so a permit obtained here never holds anything that would have to be given
back if the request ends early (a client that hangs up, a body that is too large).

Everything the two policies guarantee separately still holds: the rate limit is atomic
across processes; the breaker state read here is the shared one. If the store fails, the
rate limiter answers per its ``fail_mode`` and the breaker falls back to in-process state,
exactly as when called separately; while either is in its retry back-off the two calls are
made separately (each policy probes the store on its own schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.policies.breaker import (
    ACQUIRE_FUNCTIONS,
    CircuitBreaker,
    FallbackBreakerBackend,
    Permit,
    RedisBreakerBackend,
)
from gateway.policies.ratelimit import (
    RATE_LIMIT_FUNCTION,
    Decision,
    RateLimiter,
    RedisRateLimitBackend,
    Scope,
    StoreUnavailable,
)
from gateway.state.resp import Script

# KEYS: the rate-limit scopes, then the breaker's two keys. ARGV: n (number of scopes),
# shadow ('1': peek even when refused), the rate-limit arguments, then the peek's two
# (now, recovery timeout).
# Reply: {rate-limit reply} when refused, else {rate-limit reply, peek reply or nil}.
ADMIT = Script(
    RATE_LIMIT_FUNCTION
    + ACQUIRE_FUNCTIONS
    + """
local n = tonumber(ARGV[1])
local rl_keys, rl_argv, cb_argv = {}, {}, {}
for i = 1, n do rl_keys[i] = KEYS[i] end
local rl_argc = 3 + 3 * n
for i = 1, rl_argc do rl_argv[i] = ARGV[2 + i] end
for i = 1, 2 do cb_argv[i] = ARGV[2 + rl_argc + i] end
local limits = rate_limit(rl_keys, rl_argv)
if ARGV[2] ~= '1' then
  for i = 1, n do
    if limits[3 * i - 2] == 0 then return {limits} end
  end
end
local seen = breaker_peek({KEYS[n + 1], KEYS[n + 2]}, cb_argv)
if seen then return {limits, seen} end
return {limits}
"""
)


@dataclass(frozen=True, slots=True)
class Admitted:
    """The rate-limit decision, and the breaker's permit for the first attempt if known."""

    decision: Decision
    permit: Permit | None


class Admission:
    """Decides rate limit and (when it can) the first breaker permit together."""

    def __init__(self, limiter: RateLimiter, breaker: CircuitBreaker) -> None:
        self.limiter = limiter
        self.breaker = breaker
        limits = limiter.backend
        shared = breaker.backend
        cb = shared.primary if isinstance(shared, FallbackBreakerBackend) else None
        self._combined: tuple[RedisRateLimitBackend, RedisBreakerBackend] | None = None
        if (
            isinstance(limits, RedisRateLimitBackend)
            and isinstance(cb, RedisBreakerBackend)
            and limits.runner is cb.scripts
            and breaker.enabled
        ):
            self._combined = (limits, cb)

    async def admit(self, scopes: Sequence[Scope], module: str | None) -> Admitted:
        """The rate-limit decision for ``scopes``; with ``module``, also peek its breaker.

        Pass ``module`` only when the request will go upstream next, so that the permit
        is for its first attempt.
        """
        combined = self._combined
        shared = self.breaker.backend
        if (
            combined is None
            or module is None
            or not scopes
            or self.limiter.guard.degraded
            or not isinstance(shared, FallbackBreakerBackend)
            or shared.degraded
        ):
            return Admitted(await self.limiter.check(scopes), None)
        limits, cb = combined
        now = self.limiter.now()
        cb_now = self.breaker.clock()
        cfg = self.breaker.config_for(module)
        rl_keys, rl_args = limits.script_call(scopes, now, 1)
        cb_keys, cb_args = cb.peek_call(module, cfg, cb_now)
        shadow = "0" if self.limiter.enforce else "1"
        keys = rl_keys + cb_keys
        args = [len(scopes), shadow, *rl_args, *cb_args]
        try:
            reply = await self.limiter.guard.call(
                lambda: limits.runner.run_script(ADMIT, keys, args)
            )
        except StoreUnavailable as exc:
            shared.mark_unavailable(exc)
            decision = await self.limiter.fallback(scopes, now, consume=True)
            return Admitted(self.limiter.enforced(decision), None)
        decision = self.limiter.enforced(limits.decision(scopes, now, reply[0]))
        permit = None
        if len(reply) > 1:
            # A peek answers closed or open, never a probe: no probe id to hand out.
            permit, transition = cb.acquire_reply(reply[1], module, cfg, cb_now, "")
            self.breaker.emit(transition)  # a peek never moves the breaker: always None
        return Admitted(decision, permit)


__all__ = ["ADMIT", "Admission", "Admitted"]
