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


def build_app(name: str) -> web.Application:
    state: dict[str, Any] = {"status": 200, "delay": 0.0}

    async def body_of(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            value = {"raw": raw.decode("utf-8", "replace")}
        return value if isinstance(value, dict) else {"value": value}

    async def faults(request: web.Request) -> web.Response | None:
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        if state["status"] >= 400:
            return web.json_response(
                {"error": "demo failure", "module": name}, status=state["status"]
            )
        return None

    async def health(request: web.Request) -> web.Response:
        if state["status"] >= 400:
            return web.json_response({"status": "down", "module": name}, status=state["status"])
        return web.json_response({"status": "ok", "module": name})

    async def mode(request: web.Request) -> web.Response:
        data = await body_of(request)
        state["status"] = int(data.get("status", 200))
        state["delay"] = float(data.get("delay", 0.0))
        return web.json_response({"module": name, **state})

    async def route_v5(request: web.Request) -> web.Response:
        failed = await faults(request)
        if failed:
            return failed
        data = await body_of(request)
        prompt = data.get("prompt") or data.get("message") or ""
        summary = (data.get("metadata") or {}).get("context_summary", "")
        return web.json_response(
            {
                "module": name,
                "response": f"switch heard: {prompt}",
                "context_summary_seen": summary,
                "session_id": data.get("session_id"),
            }
        )

    async def task(request: web.Request) -> web.StreamResponse:
        failed = await faults(request)
        if failed:
            return failed
        data = await body_of(request)
        if not data.get("stream"):
            return web.json_response({"module": name, "status": "accepted", "task": data})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(data.get("chunks", 5))):
            await response.write(f"data: {json.dumps({'chunk': i, 'module': name})}\n\n".encode())
            await asyncio.sleep(float(data.get("interval", 0.2)))
        await response.write_eof()
        return response

    async def generic(request: web.Request) -> web.Response:
        failed = await faults(request)
        if failed:
            return failed
        data = await body_of(request)
        return web.json_response(
            {
                "module": name,
                "path": request.path,
                "method": request.method,
                "status": "ok",
                "received": data,
            }
        )

    async def shub_openapi(request: web.Request) -> web.Response:
        info = {"title": "shub (demo)", "version": "0"}
        return web.json_response({"openapi": "3.0.0", "info": info, "paths": {}})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", health)
    app.router.add_post("/_demo/mode", mode)
    if name == "switch":
        app.router.add_post("/switch/route-v5", route_v5)
        app.router.add_post("/switch/task", task)
    if name == "shub":
        app.router.add_get("/openapi.json", shub_openapi)
    app.router.add_route("*", "/{tail:.*}", generic)
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
