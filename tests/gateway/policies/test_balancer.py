"""The choice of a target (SPEC §18): distribution, smoothness, affinity, filtering, panic."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from gateway.policies.balancer import (
    LB_POLICIES,
    LEAST_REQUEST,
    ROUND_ROBIN,
    SESSION,
    Balancer,
    Pool,
    TargetView,
)

NOW = 1_700_000_000.0


def pool(*weights: int, seed: int = 7, disabled: tuple[int, ...] = ()) -> Pool:
    views = [
        TargetView(f"10.0.0.{i}:8002", weight=w, enabled=i not in disabled)
        for i, w in enumerate(weights)
    ]
    return Pool("switch", views, rng=random.Random(seed))


def picks(p: Pool, lb: str, n: int, **kw: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        chosen = p.choose(lb, NOW, **kw)  # type: ignore[arg-type]
        assert chosen is not None
        counts[chosen.key] += 1
    return counts


def keys_of(p: Pool) -> list[str]:
    return [t.key for t in p.targets]


# --------------------------------------------------------------------------- least request


def test_least_request_spreads_evenly_over_three_idle_targets() -> None:
    p = pool(100, 100, 100)
    counts = picks(p, LEAST_REQUEST, 30_000)
    assert set(counts) == set(keys_of(p))
    for key in keys_of(p):
        assert 9_000 < counts[key] < 11_000, counts


def test_least_request_spreads_evenly_under_equal_load() -> None:
    p = pool(100, 100, 100)
    for t in p.targets:
        t.in_flight = 4
    counts = picks(p, LEAST_REQUEST, 30_000)
    for key in keys_of(p):
        assert 9_000 < counts[key] < 11_000, counts


def test_least_request_avoids_a_busy_target() -> None:
    p = pool(100, 100, 100)
    a, b, c = p.targets
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 0
    counts = picks(p, LEAST_REQUEST, 30_000)
    # Two distinct random candidates, the less loaded wins: a never, b only against a.
    assert counts[a.key] == 0
    assert 9_000 < counts[b.key] < 11_000, counts
    assert 19_000 < counts[c.key] < 21_000, counts


def test_least_request_drains_towards_the_fast_targets() -> None:
    """A replica that holds its requests longer gets fewer of them (a small simulation:
    each tick one request arrives; the slow target finishes after 6 ticks, the others 1)."""
    p = pool(100, 100, 100)
    slow = p.targets[0]
    done: list[tuple[int, TargetView]] = []
    counts: Counter[str] = Counter()
    for tick in range(9_000):
        for item in [d for d in done if d[0] <= tick]:
            item[1].release()
            done.remove(item)
        chosen = p.choose(LEAST_REQUEST, NOW)
        assert chosen is not None
        chosen.acquire()
        counts[chosen.key] += 1
        done.append((tick + (6 if chosen is slow else 1), chosen))
    assert counts[slow.key] < 0.6 * min(counts[t.key] for t in p.targets[1:]), counts


def test_weighted_least_request_follows_the_weights_when_idle() -> None:
    p = pool(100, 200, 300)
    counts = picks(p, LEAST_REQUEST, 600)
    assert [counts[k] for k in keys_of(p)] == [100, 200, 300]


def test_weighted_least_request_shifts_away_from_in_flight() -> None:
    p = pool(100, 200, 300)
    heavy = p.targets[2]
    heavy.in_flight = 5  # effective weight 300 / 6 = 50, the others 100 and 200
    counts = picks(p, LEAST_REQUEST, 3_500)
    assert [counts[k] for k in keys_of(p)] == [1_000, 2_000, 500]


# --------------------------------------------------------------------------- round robin


def test_round_robin_is_smooth_and_exact_over_a_cycle() -> None:
    p = pool(5, 1, 1)
    a, b, c = keys_of(p)
    sequence = [t.key for t in (p.choose(ROUND_ROBIN, NOW) for _ in range(7)) if t]
    assert sequence == [a, a, b, a, c, a, a]  # nginx's example for weights 5, 1, 1
    counts = picks(p, ROUND_ROBIN, 7 * 100)
    assert [counts[k] for k in (a, b, c)] == [500, 100, 100]


def test_round_robin_never_bursts_a_light_target_among_heavies() -> None:
    p = pool(100, 100, 1)
    light = p.targets[2].key
    sequence = [t.key for t in (p.choose(ROUND_ROBIN, NOW) for _ in range(201 * 3)) if t]
    at = [i for i, key in enumerate(sequence) if key == light]
    assert len(at) == 3 and at[1] - at[0] == at[2] - at[1] == 201  # one per cycle, evenly
    assert max(len(list(run)) for _, run in itertools.groupby(sequence)) == 1  # no bursts
    # equal weights: strict rotation
    q = pool(1, 1, 1)
    order = [t.key for t in (q.choose(ROUND_ROBIN, NOW) for _ in range(6)) if t]
    assert order == keys_of(q) * 2


# --------------------------------------------------------------------------- session


def owner(p: Pool, key: str) -> str:
    chosen = p.choose(SESSION, NOW, key=key)
    assert chosen is not None
    return chosen.key


@pytest.mark.parametrize("weights", [(100,) * 10, tuple(range(100, 1100, 100))])
def test_removing_one_of_ten_targets_moves_only_its_keys(weights: tuple[int, ...]) -> None:
    full = pool(*weights)
    keys = [f"session-{i}" for i in range(10_000)]
    before = {k: owner(full, k) for k in keys}
    removed = full.targets[3]
    rest = Pool("switch", [t for t in full.targets if t is not removed])
    after = {k: owner(rest, k) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == removed.key}
    assert moved  # it owned some
    # and adding it back restores every key
    assert {k: owner(full, k) for k in keys} == before


def test_session_keys_spread_by_weight() -> None:
    p = pool(100, 200, 300, 400)
    counts = Counter(owner(p, f"user-{i}") for i in range(20_000))
    for target, share in zip(p.targets, (0.1, 0.2, 0.3, 0.4), strict=True):
        assert abs(counts[target.key] / 20_000 - share) < 0.02, counts


def test_session_keys_spread_evenly_with_equal_weights() -> None:
    p = pool(*([100] * 10))
    counts = Counter(owner(p, f"user-{i}") for i in range(10_000))
    assert all(850 < counts[t.key] < 1_150 for t in p.targets), counts


def test_a_session_key_is_stable_across_processes_and_pools() -> None:
    a, b = pool(100, 100, 100, seed=1), pool(100, 100, 100, seed=2)
    assert all(owner(a, f"k{i}") == owner(b, f"k{i}") for i in range(200))


def test_a_session_moves_while_its_target_is_ejected_and_comes_back() -> None:
    p = pool(100, 100, 100)
    home = owner(p, "conversation-1")
    p.set_ejected({home: NOW + 30})
    away = owner(p, "conversation-1")
    assert away != home
    p.set_ejected({})
    assert owner(p, "conversation-1") == home


def test_session_without_a_key_is_least_request() -> None:
    p, q = pool(100, 100, 100, seed=5), pool(100, 100, 100, seed=5)
    for x in (p, q):
        x.targets[0].in_flight = 3
    sessionless = [p.choose(SESSION, NOW, key=None) for _ in range(300)]
    least = [q.choose(LEAST_REQUEST, NOW) for _ in range(300)]
    assert [t.key for t in sessionless if t] == [t.key for t in least if t]
    assert p.targets[0] not in sessionless


# --------------------------------------------------------------------------- filtering


@pytest.mark.parametrize("lb", LB_POLICIES)
def test_disabled_targets_are_never_chosen(lb: str) -> None:
    p = pool(100, 100, 100, disabled=(1,))
    disabled = p.targets[1].key
    for t in p.targets:
        p.set_healthy(t.key, False)  # even in panic
    counts = picks(p, lb, 3_000, key="k") + picks(p, lb, 3_000)
    assert disabled not in counts and len(counts) == 2


def test_a_single_target_is_returned_directly() -> None:
    only = TargetView("10.0.0.9:8002")
    p = Pool("switch", [only, TargetView("10.0.0.8:8002", enabled=False)])
    only.healthy = False
    for lb in LB_POLICIES:
        assert p.choose(lb, NOW, key="k", exclude={only.key}) is only
    assert Pool("switch", [TargetView("a:1", enabled=False)]).choose(LEAST_REQUEST, NOW) is None
    assert Pool("switch", []).choose(ROUND_ROBIN, NOW) is None


@pytest.mark.parametrize("lb", LB_POLICIES)
def test_ejected_and_unhealthy_targets_are_avoided_while_a_healthy_one_remains(
    lb: str,
) -> None:
    p = pool(100, 100, 100)
    a, b, c = keys_of(p)
    p.set_ejected({a: NOW + 30})
    p.set_healthy(b, False)
    assert picks(p, lb, 500, key="k") == Counter({c: 500})
    # the ejection ends by time alone
    later = p.choose(lb, NOW + 31, key="k")
    assert later is not None
    assert {t.key for t in (p.choose(lb, NOW + 31 + i, key=f"k{i}") for i in range(300)) if t} == {
        a,
        c,
    }


@pytest.mark.parametrize("lb", LB_POLICIES)
def test_panic_spreads_over_every_enabled_target(lb: str) -> None:
    p = pool(100, 100, 100, 100, disabled=(3,))
    a, b, c, _ = keys_of(p)
    p.set_ejected({a: NOW + 30, b: NOW + 30})
    p.set_healthy(c, False)
    assert p.panicking(NOW)
    counts = Counter(t.key for t in (p.choose(lb, NOW, key=f"user-{i}") for i in range(3_000)) if t)
    assert set(counts) == {a, b, c}
    p.set_healthy(c, True)
    assert not p.panicking(NOW)


@pytest.mark.parametrize("lb", LB_POLICIES)
def test_a_retry_avoids_the_targets_it_tried(lb: str) -> None:
    p = pool(100, 100, 100)
    a, b, c = keys_of(p)
    assert a not in picks(p, lb, 1_000, key="k", exclude={a})
    assert picks(p, lb, 200, key="k", exclude={a, b}) == Counter({c: 200})
    # every candidate tried: one of them again rather than nothing
    assert sum(picks(p, lb, 30, key="k", exclude={a, b, c}).values()) == 30


def test_a_retry_goes_back_to_a_healthy_target_rather_than_an_ejected_one() -> None:
    p = pool(100, 100)
    a, b = keys_of(p)
    p.set_ejected({b: NOW + 30})
    assert picks(p, LEAST_REQUEST, 50, exclude={a}) == Counter({a: 50})


# --------------------------------------------------------------------------- the pools


@dataclass(frozen=True)
class Spec:
    key: str
    url: str
    weight: int = 100
    enabled: bool = True


def test_the_balancer_keeps_a_pool_while_its_specs_are_the_same_object() -> None:
    balancer = Balancer(random.Random(3))
    specs = (Spec("a:1", "http://a:1"), Spec("b:1", "http://b:1"))
    first = balancer.pool("switch", specs)
    assert balancer.pool("switch", specs) is first
    view = first.choose(LEAST_REQUEST, NOW)
    assert view is not None
    view.acquire()
    view.healthy = False
    changed = (Spec(view.key, "http://changed", weight=300), Spec("c:1", "http://c:1"))
    second = balancer.pool("switch", changed)
    assert second is not first
    kept = next(t for t in second.targets if t.key == view.key)
    assert kept is view  # in flight, health and round-robin state carried over
    assert (kept.in_flight, kept.healthy, kept.weight, kept.url) == (
        1,
        False,
        300,
        "http://changed",
    )
    assert [t.key for t in second.targets] == [view.key, "c:1"]
    kept.release()
    assert kept.in_flight == 0
    assert balancer.pools() == {"switch": second}
