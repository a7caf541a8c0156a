"""Stub VX11 modules for trying the gateway end to end (``manage.py run_demo_modules``).

Each module listens on its default port and answers its endpoints the way the
real one would in shape: switch echoes the prompt, madre accepts tasks and answers
chat (``POST /madre/chat``: the fallback of ``chat`` and ``code``, SPEC §19), shub
answers health and readiness. ``POST /_demo/mode {"status": 503}`` makes a
module fail (``{"status": 200}`` heals it) so the breaker can be watched.

``--replicas N`` runs N replicas of each module on consecutive ports (module ``j`` of
:data:`CODE_MODULES`, in order, on ``base + 10·j`` … ``base + 10·j + N - 1``; base 8100:
madre 8100–8102, switch 8110–8112 …) and tells the gateway to use them as the module's
targets (:func:`replica_env`: ``VX11_MODULE_<NAME>_URL`` lists), so one replica can be made
to fail or stopped and watched being marked down and ejected while the others answer.
Every answer of a replica names it (``"replica": port``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from gateway.config.modules import CODE_MODULES


async def body_of(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (a non-object is wrapped, a non-JSON body kept as text)."""
    raw = await request.read()
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        value = {"raw": raw.decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


class DemoModule:
    """One stub module's handlers and its fault switch (``POST /_demo/mode``)."""

    def __init__(self, name: str, replica: int | None = None) -> None:
        self.name = name
        self.replica = replica  # its port, when it is one of several replicas
        self.state: dict[str, Any] = {"status": 200, "delay": 0.0}

    def who(self) -> dict[str, Any]:
        found: dict[str, Any] = {"module": self.name}
        if self.replica is not None:
            found["replica"] = self.replica
        return found

    async def faults(self, request: web.Request) -> web.Response | None:
        if self.state["delay"]:
            await asyncio.sleep(self.state["delay"])
        if self.state["status"] >= 400:
            return web.json_response(
                {"error": "demo failure", "module": self.name}, status=self.state["status"]
            )
        return None

    async def health(self, request: web.Request) -> web.Response:
        if self.state["status"] >= 400:
            return web.json_response({"status": "down", **self.who()}, status=self.state["status"])
        return web.json_response({"status": "ok", **self.who()})

    async def mode(self, request: web.Request) -> web.Response:
        data = await body_of(request)
        self.state["status"] = int(data.get("status", 200))
        self.state["delay"] = float(data.get("delay", 0.0))
        return web.json_response({**self.who(), **self.state})

    async def chat(self, request: web.Request) -> web.Response:
        """switch's ``/switch/route-v5`` and madre's ``/madre/chat``: the prompt heard."""
        failed = await self.faults(request)
        if failed:
            return failed
        data = await body_of(request)
        prompt = data.get("prompt") or data.get("message") or ""
        summary = (data.get("metadata") or {}).get("context_summary", "")
        return web.json_response(
            {
                **self.who(),
                "response": f"{self.name} heard: {prompt}",
                "context_summary_seen": summary,
                "session_id": data.get("session_id"),
            }
        )

    async def task(self, request: web.Request) -> web.StreamResponse:
        failed = await self.faults(request)
        if failed:
            return failed
        data = await body_of(request)
        if not data.get("stream"):
            return web.json_response({"module": self.name, "status": "accepted", "task": data})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(data.get("chunks", 5))):
            chunk = json.dumps({"chunk": i, "module": self.name})
            await response.write(f"data: {chunk}\n\n".encode())
            await asyncio.sleep(float(data.get("interval", 0.2)))
        await response.write_eof()
        return response

    async def generic(self, request: web.Request) -> web.Response:
        failed = await self.faults(request)
        if failed:
            return failed
        data = await body_of(request)
        return web.json_response(
            {
                **self.who(),
                "path": request.path,
                "method": request.method,
                "status": "ok",
                "received": data,
            }
        )

    async def shub_openapi(self, request: web.Request) -> web.Response:
        info = {"title": "shub (demo)", "version": "0"}
        return web.json_response({"openapi": "3.0.0", "info": info, "paths": {}})


def build_app(name: str, replica: int | None = None) -> web.Application:
    module = DemoModule(name, replica)
    app = web.Application()
    app.router.add_get("/health", module.health)
    app.router.add_get("/ready", module.health)
    app.router.add_post("/_demo/mode", module.mode)
    if name == "switch":
        app.router.add_post("/switch/route-v5", module.chat)
        app.router.add_post("/switch/task", module.task)
    if name == "madre":
        app.router.add_post("/madre/chat", module.chat)
    if name == "shub":
        app.router.add_get("/openapi.json", module.shub_openapi)
    app.router.add_route("*", "/{tail:.*}", module.generic)
    return app


async def serve(modules: dict[str, int], host: str = "127.0.0.1") -> list[web.AppRunner]:
    runners = []
    for name, port in modules.items():
        runner = web.AppRunner(build_app(name), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    return runners


def default_ports() -> dict[str, int]:
    return {name: int(url.rsplit(":", 1)[1]) for name, url in CODE_MODULES.items()}


#: The first replica port of the first module with ``--replicas`` (clear of 8000–8011).
REPLICA_BASE = 8100


def replica_ports(
    modules: list[str], replicas: int, base: int = REPLICA_BASE
) -> dict[str, list[int]]:
    """``replicas`` consecutive ports per module: module ``j`` of :data:`CODE_MODULES` (in
    order; others after them) from ``base + 10·j``. At most 10 replicas."""
    if not 1 <= replicas <= 10:
        raise ValueError("replicas must be 1 to 10")
    order = [*CODE_MODULES, *sorted(set(modules) - set(CODE_MODULES))]
    return {name: [base + 10 * order.index(name) + i for i in range(replicas)] for name in modules}


def replica_env(ports: dict[str, list[int]], host: str = "127.0.0.1") -> dict[str, str]:
    """The gateway's targets for the replicas: ``VX11_MODULE_<NAME>_URL`` lists."""
    return {
        f"VX11_MODULE_{name.upper()}_URL": ",".join(f"http://{host}:{p}" for p in found)
        for name, found in ports.items()
    }


async def serve_replicas(
    ports: dict[str, list[int]], host: str = "127.0.0.1"
) -> dict[tuple[str, int], web.AppRunner]:
    """Every replica, each its own app and fault switch; by (module, port)."""
    runners: dict[tuple[str, int], web.AppRunner] = {}
    try:
        for name, found in ports.items():
            for port in found:
                runner = web.AppRunner(build_app(name, port), access_log=None)
                await runner.setup()
                runners[(name, port)] = runner
                await web.TCPSite(runner, host, port).start()
    except BaseException:
        for runner in runners.values():
            await runner.cleanup()
        raise
    return runners
