"""The store's Lua scripts, read once at import from ``gateway/state/lua/*.lua``.

redis-py's ``register_script`` shape: each :class:`~gateway.state.resp.Script` is its
source and SHA-1; callers send ``EVALSHA`` and fall back to ``EVAL`` when the server lost
its script cache (``PipelinedRedis.run_script``, ``RedisPyScripts.run_script``). Shared
Lua functions live in their own files (``rate_limit.lua``, ``breaker.lua``) and are
prepended to each script that calls them, so the combined admission runs exactly the
code the rate limiter and the breaker run alone.
"""

from __future__ import annotations

from pathlib import Path

from gateway.state.resp import Script

LUA_DIR = Path(__file__).with_name("lua")


def lua_source(*names: str) -> str:
    """The files ``names`` (without ``.lua``) of :data:`LUA_DIR`, concatenated in order."""
    return "".join((LUA_DIR / f"{name}.lua").read_text(encoding="utf-8") for name in names)


def load(*names: str) -> Script:
    """One script made of the files ``names``, in order (functions first, body last)."""
    return Script(lua_source(*names))


#: The rate limit alone: ``rate_limit(KEYS, 0, ARGV, 3)``.
RATE_LIMIT_HIT = load("rate_limit", "rate_limit_hit")
#: A breaker acquire (may move open -> half-open and lease a probe slot).
BREAKER_ACQUIRE = load("breaker", "breaker_acquire")
BREAKER_RECORD = load("breaker_record")
BREAKER_FORCE = load("breaker_force")
BREAKER_HEALTHY = load("breaker_healthy")
BREAKER_RELEASE = load("breaker_release")
#: The rate limit and the breaker's read-only peek in one round trip.
ADMIT = load("rate_limit", "breaker", "admit")
#: Passive outlier ejection: one result, an active probe's early return, the module's state.
OUTLIER_RECORD = load("outlier_record")
OUTLIER_RETURN = load("outlier_return")
OUTLIER_READ = load("outlier_read")
#: Active health per target: the worker's down/up verdict (``d:<target>`` in the same hash).
OUTLIER_DOWN = load("outlier_down")

__all__ = [
    "ADMIT",
    "BREAKER_ACQUIRE",
    "BREAKER_FORCE",
    "BREAKER_HEALTHY",
    "BREAKER_RECORD",
    "BREAKER_RELEASE",
    "LUA_DIR",
    "OUTLIER_DOWN",
    "OUTLIER_READ",
    "OUTLIER_RECORD",
    "OUTLIER_RETURN",
    "RATE_LIMIT_HIT",
    "load",
    "lua_source",
]
