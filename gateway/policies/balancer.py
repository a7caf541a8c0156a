"""The choice of a module's target (SPEC §18): least request, round robin, session affinity.

A module is a pool of targets (replicas). Per process, :class:`Balancer` keeps one
:class:`Pool` per module: a :class:`TargetView` per target with what the choice reads —
weight, enabled, active health, the end of an outlier ejection, requests in flight in this
process — and the round-robin state. The caller keeps the views current (the snapshot's
targets through :meth:`Balancer.pool`, health and ejections through :meth:`Pool.set_healthy`
and :meth:`Pool.set_ejected`) and counts each attempt in flight (:meth:`TargetView.acquire`,
:meth:`TargetView.release`).

Which targets may be chosen (:meth:`Pool.choose`):

- disabled targets never;
- ejected or unhealthy ones never while a healthy one remains; when none is healthy the
  pool **panics** and spreads over every enabled target (the module's breaker is then the
  guard: replicas may be serving while their probes fail);
- targets in ``exclude`` (the ones a retry must avoid, SPEC §7) only when no other
  candidate of that set remains (Envoy's ``previous_hosts`` retry predicate gives up the
  same way: a retry then goes back to a target that failed rather than to an ejected one).

How one is chosen among the candidates (``lb``):

- ``least_request`` (default): with equal weights, power of two random choices on the
  requests in flight (Envoy's ``LEAST_REQUEST``: two distinct random candidates, the one
  with fewer in flight; Mitzenmacher's result: nearly as good as a full scan, and without
  the herd a full scan causes when every process sends to the same least-loaded target).
  With unequal weights, Envoy's other mode: a weighted schedule on the effective weight
  ``weight / (in_flight + 1) ** bias`` (``active_request_bias``, 1.0), run here as a smooth
  weighted round robin over the effective weights at the time of the choice;
- ``round_robin``: nginx's smooth weighted round robin (weights 5, 1, 1 give
  a a b a c a a, never a burst of a light target);
- ``session``: weighted rendezvous (highest random weight) hashing of the request's key:
  score ``-weight / ln(h)``, ``h`` a stable hash of (key, target) in (0, 1); a key keeps its
  target while that target is a candidate, and removing a target moves only its own keys
  (no ring to rebuild, no virtual nodes). No key: ``least_request``.

Cost: a pool with one enabled target returns it before anything else (no filtering, no
random numbers); with several healthy targets and no exclusions the candidates are a tuple
kept on the pool, so a choice allocates nothing. ``python -m gateway.policies.balancer``
prints µs per choice.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Protocol

LEAST_REQUEST = "least_request"
ROUND_ROBIN = "round_robin"
SESSION = "session"
LB_POLICIES = (LEAST_REQUEST, ROUND_ROBIN, SESSION)

_M64 = (1 << 64) - 1
_TO_UNIT = 2.0**-53


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and host (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _mix(z: int) -> int:
    """splitmix64's finalizer: (key hash XOR target seed) to an independent 64-bit value."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class TargetSpec(Protocol):
    """What the configuration says of a target (the snapshot's target rows)."""

    @property
    def key(self) -> str:
        """``host:port``: the metric label, the ``X-VX11-Target`` value, the store's name."""
        ...

    @property
    def url(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def enabled(self) -> bool: ...


class TargetView:
    """One target as this process's choice sees it (mutable; kept across config changes)."""

    __slots__ = (
        "current",
        "ejected_until",
        "enabled",
        "healthy",
        "in_flight",
        "key",
        "seed",
        "url",
        "weight",
    )

    def __init__(self, key: str, url: str = "", weight: int = 100, *, enabled: bool = True) -> None:
        self.key = key
        self.url = url or f"http://{key}"
        self.weight = weight
        self.enabled = enabled
        self.healthy = True  # active health (the health worker's last verdict)
        self.ejected_until = 0.0  # outlier ejection's end (epoch seconds; 0: not ejected)
        self.in_flight = 0  # attempts in flight to it from this process
        self.current = 0.0  # smooth weighted round robin's running weight
        self.seed = stable_hash(key)  # rendezvous: this target's share of the hash

    def __repr__(self) -> str:
        return f"TargetView({self.key!r}, weight={self.weight}, in_flight={self.in_flight})"

    def acquire(self) -> None:
        """An attempt to this target starts (pair with :meth:`release`)."""
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def smooth_weighted(candidates: Sequence[TargetView]) -> TargetView:
    """nginx's smooth weighted round robin (``ngx_http_upstream_get_peer``)."""
    best = candidates[0]
    total = 0
    for t in candidates:
        t.current += t.weight
        total += t.weight
        if t.current > best.current:
            best = t
    best.current -= total
    return best


def least_loaded_weighted(candidates: Sequence[TargetView], bias: float) -> TargetView:
    """The smooth schedule on Envoy's effective weight ``weight / (in_flight + 1) ** bias``."""
    best = candidates[0]
    total = 0.0
    for t in candidates:
        effective = t.weight / (t.in_flight + 1) ** bias
        t.current += effective
        total += effective
        if t.current > best.current:
            best = t
    best.current -= total
    return best


def rendezvous(candidates: Sequence[TargetView], key: str, *, weighted: bool) -> TargetView:
    """The highest random weight of ``key`` (``weighted``: ``-weight / ln h``, else ``h``)."""
    base = stable_hash(key)
    best = candidates[0]
    best_score = -1.0
    for t in candidates:
        h = ((_mix(base ^ t.seed) >> 11) + 0.5) * _TO_UNIT  # in (0, 1)
        score = -t.weight / math.log(h) if weighted else h
        if score > best_score:
            best, best_score = t, score
    return best


class Pool:
    """One module's targets in this process, and the choice among them."""

    __slots__ = (
        "_down",
        "_ejected_end",
        "_equal",
        "_single",
        "bias",
        "enabled",
        "module",
        "rng",
        "specs",
        "targets",
    )

    def __init__(
        self,
        module: str,
        targets: Iterable[TargetView],
        *,
        rng: random.Random | None = None,
        bias: float = 1.0,
        specs: object = None,
    ) -> None:
        self.module = module
        self.targets = tuple(targets)
        self.enabled = tuple(t for t in self.targets if t.enabled)
        self._single = self.enabled[0] if len(self.enabled) == 1 else None
        self._equal = len({t.weight for t in self.enabled}) <= 1
        self.rng = rng or random.Random()
        self.bias = bias
        self.specs = specs  # what it was built from (Balancer.pool's identity check)
        self._down = 0
        self._ejected_end = 0.0
        self._recount()

    def _recount(self) -> None:
        self._down = sum(1 for t in self.enabled if not t.healthy)
        self._ejected_end = max((t.ejected_until for t in self.enabled), default=0.0)

    def set_healthy(self, key: str, healthy: bool) -> None:
        """The health worker's verdict on ``key``."""
        for t in self.targets:
            if t.key == key:
                t.healthy = healthy
        self._recount()

    def set_ejected(self, ejected: Mapping[str, float]) -> None:
        """The outlier view: target key → end of its ejection (absent: not ejected)."""
        for t in self.targets:
            t.ejected_until = ejected.get(t.key, 0.0)
        self._recount()

    def candidates(self, now: float, exclude: Collection[str] = ()) -> Sequence[TargetView]:
        """The targets a choice at ``now`` picks from (the rules in the module docstring)."""
        if not self._down and now >= self._ejected_end and not exclude:
            return self.enabled
        live = [t for t in self.enabled if t.healthy and t.ejected_until <= now]
        if not live:  # panic: no healthy target, spread over every enabled one
            live = list(self.enabled)
        if exclude:
            others = [t for t in live if t.key not in exclude]
            if others:
                return others
        return live

    def panicking(self, now: float) -> bool:
        """No enabled target is healthy and un-ejected (the choice spreads over all)."""
        return bool(self.enabled) and not any(
            t.healthy and t.ejected_until <= now for t in self.enabled
        )

    def choose(
        self,
        lb: str = LEAST_REQUEST,
        now: float = 0.0,
        *,
        key: str | None = None,
        exclude: Collection[str] = (),
    ) -> TargetView | None:
        """The target for one attempt; ``None`` only when no target is enabled.

        ``key``: the session key (``lb="session"``); ``exclude``: keys of targets this
        request already tried (retries go elsewhere when they can)."""
        single = self._single
        if single is not None:
            return single
        found = self.candidates(now, exclude)
        if len(found) <= 1:
            return found[0] if found else None
        if lb == SESSION and key is not None:
            return rendezvous(found, key, weighted=not self._equal)
        if lb == ROUND_ROBIN:
            return smooth_weighted(found)
        if not self._equal:
            return least_loaded_weighted(found, self.bias)
        n = len(found)
        rand = self.rng.random
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a, b = found[i], found[j]
        return b if b.in_flight < a.in_flight else a


class Balancer:
    """This process's pools, one per module, kept across configuration changes."""

    __slots__ = ("_pools", "bias", "rng")

    def __init__(self, rng: random.Random | None = None, *, bias: float = 1.0) -> None:
        self.rng = rng or random.Random()
        self.bias = bias
        self._pools: dict[str, Pool] = {}

    def pool(self, module: str, specs: Sequence[TargetSpec]) -> Pool:
        """``module``'s pool for these target specs (the same object while the snapshot's
        tuple is the same one: one dict lookup). A changed list keeps each surviving
        target's in-flight count, health, ejection and round-robin state."""
        pool = self._pools.get(module)
        if pool is not None and pool.specs is specs:
            return pool
        old = {t.key: t for t in pool.targets} if pool is not None else {}
        views = []
        for spec in specs:
            view = old.get(spec.key) or TargetView(spec.key, spec.url)
            view.url, view.weight, view.enabled = spec.url, spec.weight, spec.enabled
            views.append(view)
        pool = self._pools[module] = Pool(module, views, rng=self.rng, bias=self.bias, specs=specs)
        return pool

    def pools(self) -> dict[str, Pool]:
        """Every module's pool (operators' listing: in flight per target)."""
        return dict(self._pools)


def _bench() -> None:  # pragma: no cover - a measurement, run by hand
    import timeit

    rng = random.Random(1)
    one = Pool("m", [TargetView("a:1")], rng=rng)
    three = Pool("m", [TargetView(f"h{i}:80") for i in range(3)], rng=rng)
    weighted = Pool("m", [TargetView(f"h{i}:80", weight=100 * (i + 1)) for i in range(3)])
    cases = {
        "1 target": lambda: one.choose(LEAST_REQUEST, 1.0),
        "3 targets least_request": lambda: three.choose(LEAST_REQUEST, 1.0),
        "3 targets least_request weighted": lambda: weighted.choose(LEAST_REQUEST, 1.0),
        "3 targets round_robin": lambda: three.choose(ROUND_ROBIN, 1.0),
        "3 targets session": lambda: three.choose(SESSION, 1.0, key="conversation-42"),
        "3 targets, 1 excluded": lambda: three.choose(LEAST_REQUEST, 1.0, exclude=("h0:80",)),
    }
    for name, call in cases.items():
        n = 200_000
        best = min(timeit.repeat(call, number=n, repeat=5))
        print(f"{name:36s} {best / n * 1e6:6.3f} µs per choice")


if __name__ == "__main__":
    _bench()


__all__ = [
    "LB_POLICIES",
    "LEAST_REQUEST",
    "ROUND_ROBIN",
    "SESSION",
    "Balancer",
    "Pool",
    "TargetSpec",
    "TargetView",
    "least_loaded_weighted",
    "rendezvous",
    "smooth_weighted",
    "stable_hash",
]
