"""Stub VX11 modules for trying the gateway end to end (``manage.py run_demo_modules``).

Each module listens on its default port and answers its endpoints the way the
real one would in shape: switch echoes the prompt, madre accepts tasks, shub
answers health and readiness. ``POST /_demo/mode {"status": 503}`` makes a
module fail (``{"status": 200}`` heals it) so the breaker can be watched.
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

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: dict[str, Any] = {"status": 200, "delay": 0.0}

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
            return web.json_response(
                {"status": "down", "module": self.name}, status=self.state["status"]
            )
        return web.json_response({"status": "ok", "module": self.name})

    async def mode(self, request: web.Request) -> web.Response:
        data = await body_of(request)
        self.state["status"] = int(data.get("status", 200))
        self.state["delay"] = float(data.get("delay", 0.0))
        return web.json_response({"module": self.name, **self.state})

    async def route_v5(self, request: web.Request) -> web.Response:
        failed = await self.faults(request)
        if failed:
            return failed
        data = await body_of(request)
        prompt = data.get("prompt") or data.get("message") or ""
        summary = (data.get("metadata") or {}).get("context_summary", "")
        return web.json_response(
            {
                "module": self.name,
                "response": f"switch heard: {prompt}",
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
                "module": self.name,
                "path": request.path,
                "method": request.method,
                "status": "ok",
                "received": data,
            }
        )

    async def shub_openapi(self, request: web.Request) -> web.Response:
        info = {"title": "shub (demo)", "version": "0"}
        return web.json_response({"openapi": "3.0.0", "info": info, "paths": {}})


def build_app(name: str) -> web.Application:
    module = DemoModule(name)
    app = web.Application()
    app.router.add_get("/health", module.health)
    app.router.add_get("/ready", module.health)
    app.router.add_post("/_demo/mode", module.mode)
    if name == "switch":
        app.router.add_post("/switch/route-v5", module.route_v5)
        app.router.add_post("/switch/task", module.task)
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
