"""Per-process instances of the policies, built from the settings and the shared store.

``get()`` returns the :class:`Services` of the running event loop (Redis
asyncio clients belong to one loop), rebuilt when the settings are reloaded.
With ``VX11_REDIS_URL`` the breaker, rate limiter and health cache keep their
state in Redis (with an in-process fallback while Redis is unreachable);
without it, in process memory.

Without Redis, breaker actions from other processes (``manage.py breaker``, another
worker's API or admin) arrive as ``BreakerCommand`` rows announced by a configuration
version bump: :class:`BreakerCommands`, a listener of the snapshot watcher, reads each
one this process did not issue (:data:`PROCESS_ID`) in the watcher's thread and applies
it to its in-memory breakers on the server's event loop, off the request path. When a process starts it re-applies each
module's latest ``force_open`` / ``force_closed``, so an override outlives a restart as it
does in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import redis.asyncio as aioredis

from gateway.config.modules import ModuleInfo
from gateway.config.snapshot import holder, watcher
from gateway.core.conf import gw
from gateway.models import BreakerCommand
from gateway.operations import events
from gateway.operations.pools import PoolDetector, outlier_store
from gateway.policies.admission import Admission
from gateway.policies.backpressure import PriorityLimiter
from gateway.policies.balancer import Balancer
from gateway.policies.breaker import (
    BreakerBackend,
    BreakerConfig,
    CircuitBreaker,
    FallbackBreakerBackend,
    MemoryBreakerBackend,
    RedisBreakerBackend,
    Transition,
)
from gateway.policies.bulkheads import Bulkheads
from gateway.policies.ratelimit import (
    MemoryRateLimitBackend,
    RateLimitBackend,
    RateLimiter,
    RedisRateLimitBackend,
)
from gateway.policies.respcache import (
    MemoryResponseCache,
    RedisResponseCache,
    ResponseCache,
    SingleFlight,
)
from gateway.policies.retry import RetryBudget
from gateway.state import store
from gateway.state.loops import PerLoop
from gateway.state.memory import MemoryOutlierStore
from gateway.state.resp import ScriptRunner

log = logging.getLogger("gateway.services")
#: This process, as named in the ``BreakerCommand`` rows it issued (and applied) itself.
PROCESS_ID = uuid.uuid4().hex


def breaker_config(module: str) -> BreakerConfig:
    """Defaults from ``VX11_CB_*``, overridden per module by its ``Module`` row."""
    snap = holder.cached
    info = snap.modules.get(module) if snap is not None else None
    cfg = _default_config()
    if info is None:
        return cfg
    key = (snap.serial if snap else 0, module, gw.generation)
    cached = _config_cache.get(key)
    if cached is not None:
        return cached
    cfg = module_config(info)
    if len(_config_cache) > 1000:
        _config_cache.clear()
    _config_cache[key] = cfg
    return cfg


def module_config(info: ModuleInfo | None) -> BreakerConfig:
    """The breaker settings of one module (``None``: the ``VX11_CB_*`` defaults), uncached.

    Management code that loaded the module table itself (not through the snapshot
    holder) passes the module's entry here.
    """
    cfg = _default_config()
    if info is None:
        return cfg
    changes = info.breaker_overrides()
    return replace(cfg, **changes) if changes else cfg


_config_cache: dict[tuple[int, str, int], BreakerConfig] = {}
_defaults: dict[int, BreakerConfig] = {}


def _default_config() -> BreakerConfig:
    cfg = _defaults.get(gw.generation)
    if cfg is None:
        cfg = BreakerConfig(
            failure_threshold=gw.cb_failure_threshold,
            recovery_timeout=gw.cb_recovery_timeout,
            half_open_max_calls=gw.cb_half_open_max_calls,
            success_threshold=gw.cb_success_threshold,
        )
        _defaults.clear()
        _defaults[gw.generation] = cfg
    return cfg


@dataclass
class Services:
    breaker: CircuitBreaker
    limiter: RateLimiter
    backpressure: PriorityLimiter
    bulkheads: Bulkheads  # per-module caps (SPEC §10), inside ``backpressure``
    budget: RetryBudget
    cache: SingleFlight
    generation: int
    admission: Admission
    balancer: Balancer  # module pools (SPEC §18): one per process, every loop's attempts
    outliers: PoolDetector  # outlier ejection over the shared store, views ≤ 1 s old


def _current(services: Services) -> bool:
    return services.generation == gw.generation


#: The running loop's services; rebuilt when the settings generation changes.
_by_loop: PerLoop[Services] = PerLoop(fresh=_current)
_memory_lock = threading.Lock()
#: In-memory state shared by every event loop of this process, per settings generation.
_memory: dict[type[Any], tuple[int, Any]] = {}


def _process_wide[T](kind: type[T]) -> T:
    """One ``kind()`` per process and settings generation (a reload starts it afresh).

    Services are per event loop, but in-memory state must not be: a reset or force
    done by the management API (a sync view running its coroutine on a loop of its
    own), a cache clear from the admin, or ``GET /vx11/rate-limit/status`` must act on
    what the proxy's loop uses. Memory decisions never ``await`` and the backends lock
    themselves where needed, so sharing one object across loops is safe.
    """
    with _memory_lock:
        generation, value = _memory.get(kind, (-1, None))
        if generation != gw.generation or value is None:
            value = kind()
            _memory[kind] = (gw.generation, value)
        return cast(T, value)


def memory_breaker_backend() -> MemoryBreakerBackend:
    return _process_wide(MemoryBreakerBackend)


def memory_response_cache() -> MemoryResponseCache:
    return _process_wide(MemoryResponseCache)


def memory_outlier_store() -> MemoryOutlierStore:
    """This process's outlier state (no Redis): the health worker's down flags and the
    operators' listings read the one the request path uses."""
    return _process_wide(MemoryOutlierStore)


def process_balancer() -> Balancer:
    """This process's pools (every loop's): requests in flight per target for listings."""
    return _process_wide(Balancer)


def memory_rate_limit_backend() -> MemoryRateLimitBackend:
    return _process_wide(MemoryRateLimitBackend)


#: How long the watcher waits for the server's loop to apply a batch (it is not blocked:
#: the loop only ``await``\s memory decisions, and events are queued, not written).
APPLY_TIMEOUT = 5.0


class BreakerCommands:
    """Applies the ``BreakerCommand`` rows other processes wrote (a watcher listener).

    The rows are read in the watcher's thread; the forces run on the server's event loop
    (:meth:`serve_on`, from the ASGI lifespan) where the proxy uses the same in-memory
    breakers and the events queue lives. A process with no server loop (a management
    command, an in-process test server) applies them in the watcher's thread.
    """

    def __init__(self) -> None:
        self.cursor: int | None = None  # the last row seen; None until the first look
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def serve_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The server's event loop (None when it stops)."""
        self.loop = loop

    def pending(self) -> list[tuple[str, str]]:
        """The (module, action) pairs to apply now, oldest first (synchronous).

        ``id > cursor`` skips nothing: ``queue_command`` inserts under the configuration
        version row's lock, so rows commit in id order (``gateway.api.breakers``).
        """
        with self._lock:
            rows = list(
                BreakerCommand.objects.filter(id__gt=self.cursor or 0)
                .order_by("id")
                .values_list("id", "module", "action", "origin")
            )
            first, self.cursor = (
                self.cursor is None,
                max((r[0] for r in rows), default=self.cursor or 0),
            )
        if first:  # a process starting: only each module's standing override matters
            latest = {module: (action, origin) for _, module, action, origin in rows}
            return [
                (module, action)
                for module, (action, origin) in latest.items()
                if action in ("force_open", "force_closed") and origin != PROCESS_ID
            ]
        return [(module, action) for _, module, action, origin in rows if origin != PROCESS_ID]

    def __call__(self) -> None:
        if store.shared():
            return  # with Redis, actions go to the shared state directly
        todo = self.pending()
        if not todo:
            return
        log.info("applying breaker actions from other processes: %s", todo)
        loop = self.loop
        if loop is not None and loop.is_running():
            try:
                done = asyncio.run_coroutine_threadsafe(force_on_loop(todo), loop)
            except RuntimeError:  # the loop closed meanwhile
                pass
            else:
                # Waited for: a first snapshot load serves only once the overrides are in.
                done.result(APPLY_TIMEOUT)
                return
        apply_breaker_actions(todo)


def breaker_backend(
    client: aioredis.Redis | None, *, scripts: ScriptRunner | None = None, timeout: float
) -> BreakerBackend:
    """Where breakers keep state: with ``client``, the shared Redis behind the store guard,
    falling back to this process's memory; without, this process's memory.

    ``scripts``: where the decision scripts run (default: through ``client``).
    """
    if client is None:
        return memory_breaker_backend()
    return FallbackBreakerBackend(
        RedisBreakerBackend(client, scripts=scripts), memory_breaker_backend(), timeout=timeout
    )


def breaker_facade(
    backend: BreakerBackend,
    config_for: Callable[[str], BreakerConfig] = breaker_config,
    *,
    on_transition: Callable[[Transition], None] = events.breaker_transition,
) -> CircuitBreaker:
    """The one way a :class:`CircuitBreaker` is built (proxy, management, commands)."""
    return CircuitBreaker(
        backend,
        config_for,
        clock=time.time,
        on_transition=on_transition,
        enabled=gw.cb_enabled,
    )


def _breaker(on_transition: Callable[[Transition], None]) -> CircuitBreaker:
    return breaker_facade(memory_breaker_backend(), on_transition=on_transition)


async def force_on_loop(actions: list[tuple[str, str]]) -> None:
    """On the server's loop: force its in-memory breakers; events go to its queue."""
    breaker = _breaker(events.breaker_transition)
    for module, action in actions:
        await breaker.force(module, action)


def apply_breaker_actions(actions: list[tuple[str, str]]) -> None:
    """Force this process's in-memory breakers (synchronous, from a thread with no loop).

    For a process with no server loop. Transitions are recorded and published after the
    decisions, from this thread.
    """
    happened: list[Transition] = []
    breaker = _breaker(happened.append)

    async def run() -> None:
        for module, action in actions:
            await breaker.force(module, action)

    asyncio.run(run())
    for transition in happened:
        events.breaker_transition(transition)


breaker_commands = BreakerCommands()
watcher.listeners.append(breaker_commands)


def build() -> Services:
    limiter_backend: RateLimitBackend
    cache_backend: ResponseCache
    timeout = gw.store_timeout
    if store.shared():
        client = store.async_client()
        scripts = store.script_client()
        breaker = breaker_facade(breaker_backend(client, scripts=scripts, timeout=timeout))
        limiter_backend = RedisRateLimitBackend(scripts)
        cache_backend = RedisResponseCache(client)
        ejections = outlier_store(_process_wide(MemoryOutlierStore), scripts, timeout=timeout)
    else:
        breaker = breaker_facade(breaker_backend(None, timeout=timeout))
        limiter_backend = memory_rate_limit_backend()
        cache_backend = memory_response_cache()
        ejections = outlier_store(_process_wide(MemoryOutlierStore))
    limiter = RateLimiter(
        limiter_backend,
        fail_mode=gw.rate_limit_fail_mode,
        store_timeout=timeout,
        enforce=gw.rate_limit_enforce,
    )
    return Services(
        breaker=breaker,
        limiter=limiter,
        backpressure=PriorityLimiter(gw.max_inflight, gw.queue_max),
        bulkheads=Bulkheads(gw.module_queue_max),
        budget=RetryBudget(ratio=gw.retry_budget_ratio, min_retries=gw.retry_budget_min),
        cache=SingleFlight(cache_backend, store_timeout=timeout),
        generation=gw.generation,
        admission=Admission(limiter, breaker),
        balancer=_process_wide(Balancer),
        outliers=PoolDetector(ejections, _process_wide(Balancer)),
    )


def get() -> Services:
    """The running event loop's policies (built on first use, and after a reload)."""
    return _by_loop.get(build)


def module_usage() -> dict[str, tuple[int, int]]:
    """Each module's bulkhead in this process, ``(in flight, queued)``, over its loops.

    Only modules with a cap count (the others have no limiter): what ``GET /vx11/modules``
    and the dashboard show next to ``max_concurrent``.
    """
    found: dict[str, tuple[int, int]] = {}
    for services in list(_by_loop.values()):
        for name, (inflight, queued) in services.bulkheads.usage().items():
            have = found.get(name, (0, 0))
            found[name] = (have[0] + inflight, have[1] + queued)
    return found


def bulkhead_view(modules: dict[str, ModuleInfo]) -> dict[str, dict[str, int]]:
    """``{module: {max_concurrent, inflight, queued}}`` for each module with a cap, in this
    process (the cap is per process too): the dashboard's "in flight / cap"."""
    usage = module_usage()
    view: dict[str, dict[str, int]] = {}
    for name, info in modules.items():
        if info.max_concurrent:
            inflight, queued = usage.get(name, (0, 0))
            view[name] = {
                "max_concurrent": info.max_concurrent,
                "inflight": inflight,
                "queued": queued,
            }
    return view


def reset() -> None:
    _by_loop.clear()
    _config_cache.clear()
    _memory.clear()
