"""Active health checks: the schedule, the prober, the leader lease and the worker command."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from django.core.management import call_command
from prometheus_client import REGISTRY

from gateway.config.modules import ModuleInfo
from gateway.models import ModuleHealth
from gateway.operations import events
from gateway.operations import registry as services
from gateway.operations.health import (
    LEASE_KEY,
    HealthChecker,
    HealthSchedule,
    LocalLease,
    ModuleState,
    RedisLease,
    probe,
    probe_transport,
)
from tests.conftest import MODULE_NAMES, OPERATOR_TOKEN, wait_until
from tests.servers import ROOT, GatewayProcess, free_port, fresh_database_url

MIDDLE = 0.5  # rng value that gives no jitter
STEP = 0.25


def delays(schedule: HealthSchedule, outcomes: list[bool]) -> list[float]:
    """The (unjittered) delay after each probe outcome, from a healthy module."""
    state = ModuleState("up")
    out = []
    for ok in outcomes:
        state = schedule.after(state, ok)
        out.append(schedule.next_delay(state, lambda: MIDDLE))
    return out


# --------------------------------------------------------------------------- schedule


def test_a_healthy_module_is_probed_every_interval():
    assert delays(HealthSchedule(), [True, True, True]) == [5.0, 5.0, 5.0]


def test_failures_probe_every_second_then_back_off_doubling_up_to_the_maximum():
    got = delays(HealthSchedule(), [False] * 10)
    # 2 incident probes at 1 s; from the 3rd failure the module "stays down": 2, 4, 8 … 60.
    assert got == [1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_recovery_is_confirmed_at_the_incident_interval_then_back_to_normal():
    schedule = HealthSchedule()
    got = delays(schedule, [False] * 6 + [True, True, True])
    assert got[6:] == [1.0, 5.0, 5.0]
    state = ModuleState("up")
    for ok in [False] * 6 + [True]:
        state = schedule.after(state, ok)
    assert schedule.phase(state) == "recovering" and state.status == "up"


def test_a_pass_in_the_middle_of_an_incident_resets_the_backoff():
    got = delays(HealthSchedule(), [False, False, False, False, True, False])
    assert got == [1.0, 1.0, 2.0, 4.0, 1.0, 1.0]


def test_down_after_and_maximum_are_configurable():
    schedule = HealthSchedule(interval=10, incident_interval=0.5, max_backoff=3, down_after=1)
    assert delays(schedule, [False] * 5) == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_jitter_stays_within_ten_percent_and_never_above_the_maximum():
    schedule = HealthSchedule()
    healthy = ModuleState("up")
    assert schedule.next_delay(healthy, lambda: 0.0) == pytest.approx(4.5)
    assert schedule.next_delay(healthy, lambda: 1.0) == pytest.approx(5.5)
    down = ModuleState("down", consecutive_failures=20, incident=True)
    assert schedule.next_delay(down, lambda: 1.0) == 60.0
    assert schedule.next_delay(down, lambda: 0.0) == pytest.approx(54.0)


def test_a_module_down_for_days_does_not_overflow():
    down = ModuleState("down", consecutive_failures=100_000, incident=True)
    assert HealthSchedule().next_delay(down, lambda: MIDDLE) == 60.0


def test_schedule_reads_the_knobs(gw_env):
    gw_env.set(
        VX11_HEALTH_INTERVAL=7, VX11_HEALTH_INCIDENT_INTERVAL=0.5, VX11_HEALTH_MAX_BACKOFF=30
    )
    s = HealthSchedule.from_settings()
    assert (s.interval, s.incident_interval, s.max_backoff) == (7.0, 0.5, 30.0)


# --------------------------------------------------------------------------- checker


def health_probes(upstream) -> int:
    return sum(1 for seen in upstream.seen if seen.path == "/health")


def table_of(*infos: ModuleInfo):
    async def modules() -> dict[str, ModuleInfo]:
        return {info.name: info for info in infos}

    return modules


async def turn(checker: HealthChecker) -> float:
    wait = await checker.step()
    await checker.drain()
    return wait


async def test_checker_follows_the_schedule_on_a_fake_clock(upstream, clock):
    healthy = {"ok": True}

    async def health(request):
        from aiohttp import web

        return web.json_response({}, status=200 if healthy["ok"] else 503)

    upstream.route("GET", "/health", health)
    passes: list[str] = []

    async def mark(module: str) -> None:
        passes.append(module)

    async with probe_transport() as client:
        checker = HealthChecker(
            client,
            modules=table_of(ModuleInfo("switch", upstream.url)),
            persist=False,
            clock=clock,
            wall=clock,
            rng=lambda: MIDDLE,
            mark_healthy=mark,
        )

        async def probes_at(offsets: list[float]) -> list[float]:
            """Advance 0.25 s at a time (exact in binary floating point); the offsets (from
            now) at which a probe happened."""
            start, seen, done = clock.now, health_probes(upstream), []
            while clock.now - start < offsets[-1] + 0.05:
                await turn(checker)
                if health_probes(upstream) > seen:
                    seen = health_probes(upstream)
                    done.append(clock.now - start)
                clock.advance(STEP)
            return done

        assert await probes_at([0.0, 5.0, 10.0]) == [0.0, 5.0, 10.0]
        assert passes == ["switch"] * 3
        healthy["ok"] = False
        # From the last pass at t=10 (5 s before) the next probe is due now; then 1, 1, 2, 4.
        clock.advance(5.0 - STEP)
        assert await probes_at([0, 1, 2, 4, 8]) == [0.0, 1.0, 2.0, 4.0, 8.0]
        assert checker.states["switch"].consecutive_failures == 5
        healthy["ok"] = True
        clock.advance(8.0 - STEP)
        # Back up: confirmed 1 s later, then every 5 s again.
        assert await probes_at([0, 1, 6]) == [0.0, 1.0, 6.0]
        assert checker.states["switch"] == ModuleState("up", 0, 3, False)


async def test_checker_probes_only_enabled_modules(upstream, clock):
    async with probe_transport() as client:
        checker = HealthChecker(
            client,
            modules=table_of(
                ModuleInfo("switch", upstream.url),
                ModuleInfo("madre", upstream.url, "/madre/health", enabled=False),
            ),
            persist=False,
            clock=clock,
            wall=clock,
            mark_healthy=_noop,
        )
        await turn(checker)
    assert [s.path for s in upstream.seen] == ["/health"]


async def _noop(module: str) -> None:
    return None


async def test_probe_reports_status_latency_and_errors_without_sending_credentials(upstream):
    upstream.respond("GET", "/health", status=503)
    async with probe_transport() as client:
        failed = await probe(client, ModuleInfo("switch", upstream.url), 2.0)
        dead = await probe(client, ModuleInfo("madre", f"http://127.0.0.1:{free_port()}"), 2.0)
    assert (failed.ok, failed.error) == (False, "HTTP 503") and failed.latency_ms is not None
    assert (dead.ok, dead.error, dead.latency_ms) == (False, "connection failed", None)
    sent = {k.lower() for k in upstream.seen[-1].headers}
    assert not sent & {"x-vx11-token", "authorization", "x-vx11-gw-token"}


async def test_a_slow_module_times_out(upstream):
    upstream.respond("GET", "/health", delay=1.0)
    async with probe_transport() as client:
        result = await probe(client, ModuleInfo("switch", upstream.url), 0.2)
    assert (result.ok, result.error) == (False, "timeout after 0.2 s")


@pytest.mark.db_backend
async def test_probe_results_are_stored_exported_and_announced(
    transactional_db, upstream, clock, gw_env
):
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(events.GROUP, channel)
    info = ModuleInfo("hermes", upstream.url)

    async def next_event():
        message = await asyncio.wait_for(layer.receive(channel), 5)
        return message["event"]

    async with probe_transport() as client:
        checker = HealthChecker(
            client, modules=table_of(info), clock=clock, wall=clock, mark_healthy=_noop
        )
        await checker.check(info)
        row = await ModuleHealth.objects.aget(module="hermes")
        assert (row.status, row.consecutive_failures, row.last_error) == ("up", 0, "")
        assert row.latency_ms is not None and row.last_check is not None
        assert row.last_check.timestamp() == clock.now
        assert REGISTRY.get_sample_value("vx11_module_up", {"module": "hermes"}) == 1.0
        event = await next_event()
        assert event["type"] == "module.health" and event["module"] == "hermes"
        assert (event["status"], event["consecutive_failures"], event["last_check"]) == (
            "up",
            0,
            clock.now,
        )

        upstream.respond("GET", "/health", status=500)
        for _ in range(3):
            clock.advance(1)
            await checker.check(info)
        row = await ModuleHealth.objects.aget(module="hermes")
        assert (row.status, row.consecutive_failures, row.last_error) == ("down", 3, "HTTP 500")
        assert REGISTRY.get_sample_value("vx11_module_up", {"module": "hermes"}) == 0.0
        went_down, declared_down = await next_event(), await next_event()
        assert (went_down["status"], went_down["consecutive_failures"]) == ("down", 1)
        assert (declared_down["status"], declared_down["consecutive_failures"]) == ("down", 3)
        await events.flush()

        # A restarted checker continues from the stored state (the backoff goes on).
        fresh = HealthChecker(
            client, modules=table_of(info), clock=clock, wall=clock, mark_healthy=_noop
        )
        await fresh.check(info)
        assert fresh.states["hermes"].consecutive_failures == 4
    await layer.group_discard(events.GROUP, channel)


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
async def test_a_passing_probe_moves_an_open_breaker_to_half_open(
    transactional_db, upstream, gw_env, redis_url, shared
):
    gw_env.set(VX11_REDIS_URL=redis_url if shared else None)
    breaker = services.get().breaker
    for _ in range(3):
        await breaker.record("switch", status=503, error=False)
    assert (await breaker.status("switch")).state == "open"
    info = ModuleInfo("switch", upstream.url)
    async with probe_transport() as client:
        checker = HealthChecker(client, modules=table_of(info), persist=False)
        upstream.respond("GET", "/health", status=503)
        await checker.check(info)
        assert (await breaker.status("switch")).state == "open"  # a failing probe: no change
        upstream.respond("GET", "/health", status=200)
        await checker.check(info)
    status = await breaker.status("switch")
    assert status.state == "half_open" and status.retry_after == 0.0
    await events.flush()


async def test_failing_probes_never_count_as_breaker_failures(transactional_db, upstream, gw_env):
    upstream.respond("GET", "/health", status=503)
    info = ModuleInfo("switch", upstream.url)
    async with probe_transport() as client:
        checker = HealthChecker(client, modules=table_of(info), persist=False)
        for _ in range(5):
            await checker.check(info)
    status = await services.get().breaker.status("switch")
    assert (status.state, status.failure_count) == ("closed", 0)


# --------------------------------------------------------------------------- leader lease


async def _poll(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_one_lease_holder_and_a_standby_takes_over_when_it_stops_renewing(redis_url):
    first, second = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    try:
        a, b = RedisLease(first, ttl=0.5), RedisLease(second, ttl=0.5)
        assert await a.hold() is True
        assert await b.hold() is False
        assert await a.hold() is True  # renewal by the holder
        # a "dies": it renews no more. b takes over once the lease expires.
        assert await _poll(b.hold)
        assert await a.hold() is False and a.held is False
        assert await b.hold() is True
    finally:
        await first.aclose()
        await second.aclose()


async def test_renewal_extends_the_lease_and_needs_our_token(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    try:
        lease = RedisLease(client, ttl=5.0)
        assert await lease.hold()
        await client.pexpire(LEASE_KEY, 100)
        assert await lease.hold()
        assert await client.pttl(LEASE_KEY) > 1000
        await client.set(LEASE_KEY, "someone-else", px=5000)
        assert await lease.hold() is False
        await lease.release()
        assert await client.get(LEASE_KEY) == b"someone-else"  # release never deletes others'
    finally:
        await client.aclose()


async def test_a_released_lease_is_taken_at_once(redis_url):
    first, second = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    try:
        a, b = RedisLease(first, ttl=30), RedisLease(second, ttl=30)
        assert await a.hold() and not await b.hold()
        await a.release()
        assert await b.hold()
    finally:
        await first.aclose()
        await second.aclose()


async def test_only_the_leader_probes_and_the_standby_takes_over(redis_url, upstream, clock):
    first, second = aioredis.Redis.from_url(redis_url), aioredis.Redis.from_url(redis_url)
    info = ModuleInfo("switch", upstream.url)
    try:
        async with probe_transport() as client:
            leader, standby = (
                HealthChecker(
                    client,
                    lease=RedisLease(redis, ttl=0.5),
                    modules=table_of(info),
                    persist=False,
                    clock=clock,
                    wall=clock,
                    mark_healthy=_noop,
                )
                for redis in (first, second)
            )
            await turn(leader)
            await turn(standby)
            assert health_probes(upstream) == 1
            clock.advance(6)
            await turn(standby)
            assert health_probes(upstream) == 1  # the standby never probes while led

            async def standby_probed() -> bool:
                await turn(standby)
                return health_probes(upstream) == 2

            assert await _poll(standby_probed)  # the leader stopped renewing: takeover
            assert standby.lease.held
    finally:
        await first.aclose()
        await second.aclose()


async def test_without_redis_the_worker_is_the_leader(upstream, clock):
    async with probe_transport() as client:
        checker = HealthChecker(
            client,
            lease=LocalLease(),
            persist=False,
            clock=clock,
            modules=table_of(ModuleInfo("switch", upstream.url)),
            mark_healthy=_noop,
        )
        await turn(checker)
    assert health_probes(upstream) == 1


# --------------------------------------------------------------------------- the command


@pytest.mark.db_backend
def test_run_health_checks_once_prints_a_table_and_stores_results(
    transactional_db, gw_env, upstream
):
    dead = f"http://127.0.0.1:{free_port()}"
    gw_env.set(**{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES})
    gw_env.set(VX11_MODULE_MCP_URL=dead)
    out = io.StringIO()
    call_command("run_health_checks", "--once", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["MODULE", "STATUS", "LATENCY_MS", "FAILURES", "ERROR"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == set(MODULE_NAMES)
    assert rows["mcp"][1:4] == ["down", "-", "1"] and "connection failed" in lines[1 + 4]
    assert rows["switch"][1] == "up" and float(rows["switch"][2]) >= 0
    assert lines[-1] == "9 module(s) probed: 8 up, 1 down"
    stored = dict(ModuleHealth.objects.values_list("module", "status"))
    assert stored == {name: "down" if name == "mcp" else "up" for name in MODULE_NAMES}


class Worker:
    """``manage.py run_health_checks`` in its own OS process, output to a file."""

    def __init__(self, env: dict[str, str], log_path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "run_health_checks"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self):
        return self.log_path.read_text()

    def leads(self) -> bool:
        return "leader lease acquired" in self.output()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.mark.reliability
def test_worker_processes_elect_one_leader_take_over_and_stop_cleanly(
    tmp_path, redis_url, upstream
):
    env = {
        **os.environ,
        "DATABASE_URL": fresh_database_url(os.environ.get("DATABASE_URL"), str(tmp_path)),
        "VX11_REDIS_URL": redis_url,
        "VX11_TOKEN": OPERATOR_TOKEN,
        "VX11_HEALTH_INTERVAL": "0.5",
        "VX11_HEALTH_INCIDENT_INTERVAL": "0.2",  # lease: renewed every 0.2 s, TTL 0.6 s
        "PYTHONUNBUFFERED": "1",
        **{f"VX11_MODULE_{name.upper()}_URL": upstream.url for name in MODULE_NAMES},
    }
    GatewayProcess.migrate(env)
    store = sync_redis.Redis.from_url(redis_url)
    workers = [Worker(env, tmp_path / "a.log"), Worker(env, tmp_path / "b.log")]
    try:
        assert wait_until(lambda: any(w.leads() for w in workers), timeout=30)
        assert wait_until(lambda: health_probes(upstream) >= 9, timeout=30)
        leaders = [w for w in workers if w.leads()]
        assert len(leaders) == 1, [w.output()[-1000:] for w in workers]
        leader, standby = leaders[0], next(w for w in workers if w is not leaders[0])
        held_by = store.get(LEASE_KEY)
        assert held_by is not None

        # The leader dies without a word: the standby takes over once the lease expires.
        leader.proc.kill()
        leader.proc.wait(5)
        assert wait_until(standby.leads, timeout=10), standby.output()[-2000:]
        assert store.get(LEASE_KEY) not in (None, held_by)
        probes = health_probes(upstream)
        assert wait_until(lambda: health_probes(upstream) >= probes + 9, timeout=10)

        # SIGTERM: a clean stop within a second or two, the lease released.
        standby.proc.send_signal(signal.SIGTERM)
        assert standby.proc.wait(10) == 0
        out = standby.output()
        assert "leader lease released" in out and "health checks stopped" in out, out[-2000:]
        assert store.get(LEASE_KEY) is None
        assert "Traceback" not in out
    finally:
        for worker in workers:
            worker.close()
        store.close()
