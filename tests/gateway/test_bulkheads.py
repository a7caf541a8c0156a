"""Per-module bulkheads (SPEC §10) through the real gateway and a real upstream.

The spawner's ``/spawn`` endpoint is a :class:`Gate`: it holds every call until the test
opens it and counts how many are held at once, so what the gateway lets through is seen
on the upstream's side, not inferred from timings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from aiohttp import web
from asgiref.sync import sync_to_async

from gateway.config.modules import build_modules, env_caps
from gateway.models import Module, Route
from gateway.operations import registry
from gateway.operations.config_apply import import_document
from gateway.operations.config_doc import DocumentError, build_document
from tests.conftest import OPERATOR_TOKEN

H = {"X-VX11-Token": OPERATOR_TOKEN}
CAP = "VX11_MODULE_SPAWNER_MAX_CONCURRENT"


class Gate:
    """An upstream endpoint that holds each call until :meth:`release`; counts them."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.held = 0
        self.peak = 0
        self.order: list[str] = []

    def handler(self, name: str = "call") -> Any:
        async def handle(request: web.Request) -> web.Response:
            self.held += 1
            self.peak = max(self.peak, self.held)
            self.order.append(name)
            try:
                while not self.opened.is_set():
                    await asyncio.sleep(0.01)
            finally:
                self.held -= 1
            return web.json_response({"ok": True, "name": name})

        return handle

    def release(self) -> None:
        self.opened.set()


async def until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


@pytest.fixture
def quiet(gw_env):
    """No rate limits or breakers in the way: only the caps decide."""
    gw_env.set(VX11_RATE_LIMIT_ENABLED="false", VX11_CB_ENABLED="false")
    return gw_env


@pytest.fixture
def gate(upstream) -> Gate:
    g = Gate()
    upstream.route("POST", "/spawn", g.handler("spawn"))
    return g


def set_cap(value: int | None) -> Module:
    """The spawner's row with ``max_concurrent`` (a flushed test database has no rows)."""
    row, _ = Module.objects.update_or_create(name="spawner", defaults={"max_concurrent": value})
    return row


def spawn(client: httpx.AsyncClient) -> Any:
    return client.post("/vx11/route/spawn", json={}, headers=H)


async def test_a_saturated_spawner_leaves_chat_its_slots(gateway, quiet, gate):
    """Cap 2 (env), six held spawns: two reach the module, four queue holding no process
    slot, so chat (another module) answers at once though the process has only 4 slots."""
    quiet.set(VX11_MAX_INFLIGHT="4", **{CAP: "2"})
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        spawns = [asyncio.create_task(spawn(client)) for _ in range(6)]
        assert await until(lambda: gate.held == 2)
        await asyncio.sleep(0.2)  # the other four are queued by now, not at the module
        assert gate.held == 2
        started = time.monotonic()
        chat = await asyncio.wait_for(
            client.post("/vx11/route/chat", json={"prompt": "hi"}, headers=H), 3.0
        )
        assert chat.status_code == 200, chat.text
        assert time.monotonic() - started < 1.0
        modules = (await client.get("/vx11/modules", headers=H)).json()["modules"]
        spawner = next(m for m in modules if m["name"] == "spawner")
        assert (spawner["max_concurrent"], spawner["inflight"], spawner["queued"]) == (2, 2, 4)
        switch = next(m for m in modules if m["name"] == "switch")
        assert (switch["max_concurrent"], switch["inflight"], switch["queued"]) == (0, None, None)
        gate.release()
        answers = await asyncio.gather(*spawns)
    assert [a.status_code for a in answers] == [200] * 6  # the queued ones were served
    assert gate.peak == 2


async def test_a_full_module_queue_sheds_with_the_module_named(gateway, quiet, gate):
    quiet.set(VX11_MODULE_QUEUE_MAX="1", **{CAP: "1"})
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        first = asyncio.create_task(spawn(client))
        assert await until(lambda: gate.held == 1)
        second = asyncio.create_task(spawn(client))  # queued: the module's queue is full
        await asyncio.sleep(0.2)
        shed = await asyncio.wait_for(spawn(client), 3.0)
        gate.release()
        assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
    assert shed.status_code == 503
    body = shed.json()
    assert body["error"] == "service_overloaded"
    assert body["module"] == "spawner" and body["priority"] == "other"
    assert int(shed.headers["retry-after"]) >= 1 and body["retry_after"] >= 1
    assert gate.peak == 1


async def test_health_is_served_first_in_the_module_queue(gateway, quiet, upstream):
    """Cap 1: one call holds the spawner; of those queued, health goes first, then
    analysis, then the earlier "other" call (without the cap all four run at once)."""
    quiet.set(**{CAP: "1"})
    gate = Gate()
    for name in ("other", "analysis", "health"):
        upstream.route("POST", f"/spawn-{name}", gate.handler(name))
        await sync_to_async(Route.objects.create)(
            intent=f"spawn-{name}", module="spawner", endpoint=f"/spawn-{name}", priority=name
        )
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:

        def call(name: str) -> Any:
            return asyncio.create_task(client.post(f"/vx11/route/spawn-{name}", json={}, headers=H))

        calls = [call("other")]
        assert await until(lambda: gate.held == 1)
        for name in ("other", "analysis", "health"):
            calls.append(call(name))
            await asyncio.sleep(0.1)  # queued in this order
        gate.release()  # each call queued next is then answered as soon as it arrives
        answers = await asyncio.gather(*calls)
    assert [a.status_code for a in answers] == [200] * 4
    assert gate.order == ["other", "health", "analysis", "other"]


async def test_a_waiter_in_the_module_queue_leaves_with_504_at_its_deadline(gateway, quiet, gate):
    """The spawn call holds the cap (120 s route); a 0.5 s route to the same module waits."""
    quiet.set(**{CAP: "1"})
    await sync_to_async(Route.objects.create)(
        intent="spawn-quick", module="spawner", endpoint="/spawn", timeout=0.5
    )
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        first = asyncio.create_task(spawn(client))
        assert await until(lambda: gate.held == 1)
        second = await asyncio.wait_for(
            client.post("/vx11/route/spawn-quick", json={}, headers=H), 3.0
        )
        gate.release()
        assert (await first).status_code == 200
    assert second.status_code == 504 and second.json()["error"] == "upstream_timeout"
    assert "waited for capacity" in second.json()["detail"]
    assert gate.peak == 1  # it never reached the module


async def test_shed_by_the_process_cap_the_module_slot_is_given_back(gateway, quiet, upstream):
    """Module slot first, then the process's: refused there (503 without ``module``), the
    call leaves its module slot behind it, so the module's count stays right."""
    quiet.set(VX11_MAX_INFLIGHT="1", VX11_QUEUE_MAX="0", **{CAP: "2"})
    gate = Gate()
    upstream.route("POST", "/switch/task", gate.handler("task"))
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        task = asyncio.create_task(client.post("/vx11/route/task", json={}, headers=H))
        assert await until(lambda: gate.held == 1)  # the one process slot
        refused = await asyncio.wait_for(spawn(client), 3.0)
        usage = registry.module_usage().get("spawner")
        gate.release()
        assert (await task).status_code == 200
    assert refused.status_code == 503 and "module" not in refused.json()
    assert usage == (0, 0)


async def test_a_live_change_of_max_concurrent_takes_effect(gateway, quiet, gate):
    """API (PUT /vx11/config) sets 1; a database write raises it to 3 while two wait, and
    the next call lets them through; 0 removes the module's limiter from the path."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        put = await client.put(
            "/vx11/config?prune=false",
            json={"modules": {"spawner": {"max_concurrent": 1}}},
            headers=H,
        )
        assert put.status_code == 200, put.text
        calls = [asyncio.create_task(spawn(client)) for _ in range(3)]
        assert await until(lambda: gate.held == 1)
        await asyncio.sleep(0.2)
        assert gate.held == 1
        detail = (await client.get("/vx11/modules/spawner", headers=H)).json()
        assert (detail["max_concurrent"], detail["inflight"], detail["queued"]) == (1, 1, 2)

        await sync_to_async(Module.objects.filter(name="spawner").update)(max_concurrent=3)
        calls.append(asyncio.create_task(spawn(client)))  # the first call to see the change
        assert await until(lambda: gate.held == 3)
        await asyncio.sleep(0.2)
        assert gate.held == 3  # the fourth queues at the new cap

        await sync_to_async(Module.objects.filter(name="spawner").update)(max_concurrent=0)
        calls += [asyncio.create_task(spawn(client)) for _ in range(3)]
        assert await until(lambda: gate.held == 6)  # 3 held + 3 past no cap; one still queued
        gate.release()
        answers = await asyncio.gather(*calls)
        detail = (await client.get("/vx11/modules/spawner", headers=H)).json()
    assert [a.status_code for a in answers] == [200] * 7
    assert (detail["max_concurrent"], detail["inflight"], detail["queued"]) == (0, None, None)


async def test_the_module_row_overrides_the_env_and_null_inherits_it(gateway, quiet, gate):
    quiet.set(**{CAP: "1"})
    await sync_to_async(set_cap)(2)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        calls = [asyncio.create_task(spawn(client)) for _ in range(3)]
        assert await until(lambda: gate.held == 2)
        await asyncio.sleep(0.2)
        assert gate.held == 2
        await sync_to_async(set_cap)(None)
        gate.release()
        assert [a.status_code for a in await asyncio.gather(*calls)] == [200] * 3
        detail = (await client.get("/vx11/modules/spawner", headers=H)).json()
    assert detail["max_concurrent"] == 1  # the env's again


async def test_the_inflight_gauge_and_the_dashboard_data_move(gateway, quiet, gate):
    quiet.set(**{CAP: "2"})
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        calls = [asyncio.create_task(spawn(client)) for _ in range(3)]
        assert await until(lambda: gate.held == 2)
        await asyncio.sleep(0.2)
        held = (await client.get("/metrics")).text
        traffic = (await client.get("/vx11/traffic?minutes=1", headers=H)).json()
        gate.release()
        await asyncio.gather(*calls)
        after = (await client.get("/metrics")).text
    assert 'vx11_module_inflight{module="spawner"} 2.0' in held
    assert traffic["bulkheads"]["spawner"] == {"max_concurrent": 2, "inflight": 2, "queued": 1}
    assert "switch" not in traffic["bulkheads"]
    assert 'vx11_module_inflight{module="spawner"} 0.0' in after


def test_no_cap_means_no_module_limiter(http, gw_env, gate):
    """Cap 0 (the default): the calls run as before, and no limiter is ever made."""
    gw_env.set(VX11_RATE_LIMIT_ENABLED="false")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=30) as client:
            calls = [asyncio.create_task(spawn(client)) for _ in range(4)]
            assert await until(lambda: gate.held == 4)
            gate.release()
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 4
    assert "spawner" not in registry.module_usage()


def test_the_dashboard_shows_in_flight_over_the_cap(gateway, gw_env, admin_client):
    gw_env.set(**{CAP: "4"})
    page = admin_client.get("/admin/dashboard/").content.decode()
    assert 'data-field="bulkhead"' in page
    assert "0 / 4" in page and "no cap of its own" in page


def test_the_admin_module_page_edits_max_concurrent(gateway, admin_client):
    row = set_cap(None)
    page = admin_client.get(f"/admin/gateway/module/{row.pk}/change/")
    assert b'name="max_concurrent"' in page.content
    form = {
        "name": "spawner",
        "url": "",
        "health_path": "/health",
        "enabled": "on",
        "max_concurrent": "4",
        "targets-TOTAL_FORMS": "0",  # the page's target inline (no targets)
        "targets-INITIAL_FORMS": "0",
    }
    r = admin_client.post(f"/admin/gateway/module/{row.pk}/change/", form)
    assert r.status_code == 302, r.content[:2000]
    assert Module.objects.get(name="spawner").max_concurrent == 4
    detail = httpx.get(f"{gateway.url}/vx11/modules/spawner", headers=H).json()
    assert detail["max_concurrent"] == 4


def test_one_module_detail_and_an_unknown_one(http):
    switch = http.get("/vx11/modules/switch", headers=H).json()
    assert switch["name"] == "switch" and switch["breaker"]["state"] == "closed"
    assert (switch["max_concurrent"], switch["inflight"], switch["queued"]) == (0, None, None)
    r = http.get("/vx11/modules/nope", headers=H)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert r.json()["module"] == "nope"


# --------------------------------------------------------------------------- configuration


def test_env_caps_are_read_and_invalid_ones_skipped(monkeypatch, caplog):
    monkeypatch.setenv("VX11_MODULE_SPAWNER_MAX_CONCURRENT", "4")
    monkeypatch.setenv("VX11_MODULE_SHUB_MAX_CONCURRENT", " 16 ")
    monkeypatch.setenv("VX11_MODULE_HERMES_MAX_CONCURRENT", "-1")
    monkeypatch.setenv("VX11_MODULE_MADRE_MAX_CONCURRENT", "many")
    assert env_caps() == {"spawner": 4, "shub": 16}
    details = [getattr(r, "detail", "") for r in caplog.records]
    assert any(d.startswith("VX11_MODULE_HERMES_MAX_CONCURRENT:") for d in details)
    table = build_modules([])
    assert table["spawner"].max_concurrent == 4 and table["switch"].max_concurrent == 0


@pytest.mark.django_db
def test_config_export_and_import_carry_max_concurrent():
    set_cap(4)
    doc = build_document()
    assert doc["modules"]["spawner"] == {"max_concurrent": 4}
    assert import_document(doc).changes == []  # export → import: no change
    doc["modules"]["spawner"]["max_concurrent"] = 8
    changed = import_document(doc).changes
    assert [(c.action, c.name, c.fields) for c in changed] == [
        ("changed", "spawner", ("max_concurrent",))
    ]
    assert Module.objects.get(name="spawner").max_concurrent == 8


@pytest.mark.django_db
def test_a_negative_cap_in_a_document_is_refused():
    with pytest.raises(DocumentError) as refused:
        import_document({"modules": {"spawner": {"max_concurrent": -1}}}, prune=False)
    assert any(e.startswith("modules.spawner.max_concurrent:") for e in refused.value.errors)
