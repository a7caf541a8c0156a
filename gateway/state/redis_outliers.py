"""Outlier ejection in Redis: shared by every process and host (SPEC §18).

One hash per module (``vx11:od:<module>``) holds each target's consecutive failures
(``c:<target>``), ejection count (``n:``), healthy-since time (``s:``) and ejection end
(``u:``), and the health worker's down flag (``d:``, ``lua/outlier_down.lua``); every
decision is one script (``lua/outlier_record.lua``, ``outlier_return.lua``),
the read is one ``HGETALL`` (``outlier_read.lua``, a script so that it runs on the request
path's pipelined connection like the others). The hash expires ``OutlierConfig.ttl``
seconds after its last write, so a quiet module's state vanishes once it has fully decayed.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from gateway.state.ejections import (
    ACTIVE_PROBE,
    CONSECUTIVE_FAILURES,
    Ejection,
    OutlierConfig,
    Outliers,
    decayed,
)
from gateway.state.resp import Arg, ScriptRunner, script_runner
from gateway.state.scripts import OUTLIER_DOWN, OUTLIER_READ, OUTLIER_RECORD, OUTLIER_RETURN


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisOutlierStore:
    """Outlier ejection in Redis, one hash per module (``lua/outlier_*.lua``), expiring
    ``cfg.ttl`` seconds after its last write; agreed by every process and host."""

    def __init__(
        self, client: redis.asyncio.Redis | ScriptRunner, prefix: str = "vx11:od:"
    ) -> None:
        self.runner = script_runner(client)
        self.prefix = prefix

    async def record(
        self,
        module: str,
        target: str,
        now: float,
        cfg: OutlierConfig,
        *,
        failure: bool,
        n_targets: int,
        stretch: float,
    ) -> Ejection | None:
        args: list[Arg] = [target, repr(now), "1" if failure else "0", cfg.consecutive_failures]
        args += (repr(cfg.base_ejection), repr(cfg.max_ejection))
        args += (repr(cfg.max_ejection_percent), n_targets, cfg.max_count, repr(stretch), cfg.ttl)
        reply = await self.runner.run_script(OUTLIER_RECORD, [self.prefix + module], args)
        if not reply:
            return None
        until, count = float(_text(reply[0])), int(reply[1])
        return Ejection(module, target, True, until, count, CONSECUTIVE_FAILURES, now)

    async def return_early(
        self, module: str, target: str, now: float, cfg: OutlierConfig
    ) -> Ejection | None:
        args: list[Arg] = [target, repr(now), cfg.ttl]
        reply = await self.runner.run_script(OUTLIER_RETURN, [self.prefix + module], args)
        if not reply:
            return None
        return Ejection(module, target, False, now, int(reply[0]), ACTIVE_PROBE, now)

    async def outliers(self, module: str, now: float, cfg: OutlierConfig) -> Outliers:
        raw = await self.runner.run_script(OUTLIER_READ, [self.prefix + module], [])
        return parse_outliers(raw, now, cfg)

    async def mark_down(self, module: str, target: str, down: bool, cfg: OutlierConfig) -> bool:
        args: list[Arg] = [target, "1" if down else "0", cfg.ttl]
        return bool(await self.runner.run_script(OUTLIER_DOWN, [self.prefix + module], args))


def parse_outliers(raw: list[Any], now: float, cfg: OutlierConfig) -> Outliers:
    """A module's hash (``HGETALL``'s flat reply) as the view at ``now`` (also read by
    operators' listings through a client of their own: ``gateway.operations.targets``)."""
    fields = {_text(raw[i]): _text(raw[i + 1]) for i in range(0, len(raw), 2)}
    seen = Outliers()
    for name, value in fields.items():
        kind, target = name[:2], name[2:]
        if kind == "u:" and float(value) > now:
            seen.ejected[target] = float(value)
        elif kind == "c:":  # never beside a running ejection (the scripts see to it)
            seen.failing[target] = int(value)
        elif kind == "n:":
            since = float(fields.get(f"s:{target}") or 0.0)
            count = decayed(int(value), since, now, cfg.base_ejection)[0]
            if count:
                seen.ejections[target] = count
        elif kind == "d:":
            seen.down.add(target)
    return seen


__all__ = ["RedisOutlierStore", "parse_outliers"]
