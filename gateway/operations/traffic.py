"""Traffic series per module for the dashboard's graphs (SPEC §14).

Per proxied request :func:`record` does O(1) work in memory: one counter row per module
per 10 s bucket (requests, errors, rate-limit rejections, and a fixed log-bucket latency
histogram). With ``VX11_REDIS_URL`` a background task (every ``FLUSH_SECONDS``) adds what
this process counted since the last flush to per-bucket hashes in Redis (``HINCRBY``, one
pipeline per flush, a TTL of ``KEEP_SECONDS``), so :func:`series` reads the sum over every
process and host; without Redis it reads this process's own counters. Percentiles come
from the summed histograms, as Prometheus' ``histogram_quantile`` computes them.

What counts: an *error* is an answer 5xx (gateway errors 502/503/504 included); 4xx are
the caller's and do not count, as in Kong's and Grafana's dashboards; 499 (the client
left) is no error. A *rate-limit rejection* is an answer 429.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from typing import Any

from gateway.core.clock import Clock
from gateway.state import store

log = logging.getLogger("gateway.traffic")

BUCKET_SECONDS = 10
KEEP_SECONDS = 16 * 60
FLUSH_SECONDS = 2.0
KEY_PREFIX = "vx11:traffic:"
#: Upper bounds (ms) of the latency buckets: 0.25 ms doubling to 16.4 s, then +Inf.
BOUNDS_MS: tuple[float, ...] = tuple(0.25 * 2**i for i in range(17))
REQUESTS, ERRORS, LIMITED = 0, 1, 2
FIRST_BUCKET = 3
WIDTH = FIRST_BUCKET + len(BOUNDS_MS) + 1
MAX_MODULES = 200  # bounded memory and hash size, whatever a configuration holds


def _row() -> list[int]:
    return [0] * WIDTH


class Traffic:
    """One process's counters; ``clock``: wall seconds (buckets line up across hosts)."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.local: dict[int, dict[str, list[int]]] = {}
        self.pending: dict[int, dict[str, list[int]]] = {}
        self._task: asyncio.Task[None] | None = None

    def record(self, module: str | None, status: int, seconds: float) -> None:
        """Count one answer (the proxy's ``record``): a few dict and list operations."""
        if module is None:
            return
        start = int(self.clock()) // BUCKET_SECONDS * BUCKET_SECONDS
        index = FIRST_BUCKET + bisect.bisect_left(BOUNDS_MS, seconds * 1000.0)
        shared = store.shared()  # without Redis nothing is pending: nothing to flush
        for table in (self.local, self.pending) if shared else (self.local,):
            bucket = table.get(start)
            if bucket is None:
                bucket = table[start] = {}
                if table is self.local:
                    self._prune(start)
            row = bucket.get(module)
            if row is None:
                if len(bucket) >= MAX_MODULES:
                    continue
                row = bucket[module] = _row()
            row[REQUESTS] += 1
            row[index] += 1
            if status >= 500:
                row[ERRORS] += 1
            elif status == 429:
                row[LIMITED] += 1
        if shared and self._task is None:
            self._start()

    def _prune(self, now: int) -> None:
        for start in [s for s in self.local if s <= now - KEEP_SECONDS]:
            del self.local[start]

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop (a tool or a test): flush() is called by hand
        self._task = loop.create_task(self._flush_forever(), name="vx11-traffic")

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:  # Redis away: the counts wait for the next flush
                log.warning("traffic not flushed", extra={"error": type(exc).__name__})

    async def flush(self) -> int:
        """Add the counts since the last flush to Redis in one pipeline; the fields written."""
        if not self.pending or not store.shared():
            return 0
        taken, self.pending = self.pending, {}
        written = 0
        try:
            async with store.async_client().pipeline(transaction=False) as pipe:
                for start, bucket in taken.items():
                    key = f"{KEY_PREFIX}{start}"
                    for module, row in bucket.items():
                        for i, value in enumerate(row):
                            if value:
                                pipe.hincrby(key, f"{module}|{i}", value)
                                written += 1
                    pipe.expire(key, KEEP_SECONDS)
                await pipe.execute()
        except Exception:
            self._merge_back(taken)
            raise
        return written

    def _merge_back(self, taken: dict[int, dict[str, list[int]]]) -> None:
        for start, bucket in taken.items():
            into = self.pending.setdefault(start, {})
            for module, row in bucket.items():
                have = into.setdefault(module, _row())
                for i, value in enumerate(row):
                    have[i] += value

    async def buckets(self, minutes: int) -> dict[int, dict[str, list[int]]]:
        """The counters of the last ``minutes``, summed over every process when shared."""
        now = int(self.clock()) // BUCKET_SECONDS * BUCKET_SECONDS
        starts = list(range(now - minutes * 60 + BUCKET_SECONDS, now + 1, BUCKET_SECONDS))
        if not store.shared():
            return {s: self.local[s] for s in starts if s in self.local}
        async with store.async_client().pipeline(transaction=False) as pipe:
            for start in starts:
                pipe.hgetall(f"{KEY_PREFIX}{start}")
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        found: dict[int, dict[str, list[int]]] = {}
        for start, reply in zip(starts, replies, strict=True):
            for field, value in reply.items():
                module, _, index = field.decode().rpartition("|")
                if not index.isdigit() or int(index) >= WIDTH:
                    continue
                found.setdefault(start, {}).setdefault(module, _row())[int(index)] += int(value)
        return found

    async def series(self, minutes: int = 15) -> dict[str, Any]:
        """Per module, one point per bucket: the dashboard's JSON (``GET /vx11/traffic``)."""
        minutes = max(1, min(minutes, 15))
        found = await self.buckets(minutes)
        now = int(self.clock()) // BUCKET_SECONDS * BUCKET_SECONDS
        starts = list(range(now - minutes * 60 + BUCKET_SECONDS, now + 1, BUCKET_SECONDS))
        modules = sorted({m for bucket in found.values() for m in bucket})
        out: dict[str, Any] = {}
        for module in modules:
            rows = [found.get(s, {}).get(module) for s in starts]
            out[module] = {
                "requests": [r[REQUESTS] if r else 0 for r in rows],
                "requests_per_second": [r[REQUESTS] / BUCKET_SECONDS if r else 0 for r in rows],
                "error_percent": [error_percent(r) for r in rows],
                "p50_ms": [percentile(r, 0.50) for r in rows],
                "p99_ms": [percentile(r, 0.99) for r in rows],
                "rate_limited": [r[LIMITED] if r else 0 for r in rows],
                "totals": totals([r for r in rows if r]),
            }
        return {
            "bucket_seconds": BUCKET_SECONDS,
            "start": starts[0],
            "times": starts,
            "shared": store.shared(),
            "modules": out,
        }


def error_percent(row: list[int] | None) -> float | None:
    if not row or not row[REQUESTS]:
        return None
    return round(100.0 * row[ERRORS] / row[REQUESTS], 2)


def percentile(row: list[int] | None, q: float) -> float | None:
    """The ``q`` quantile (ms) of a row's histogram, interpolated inside its bucket."""
    if not row or not row[REQUESTS]:
        return None
    counts = row[FIRST_BUCKET:]
    rank = q * sum(counts)
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = BOUNDS_MS[i] if i < len(BOUNDS_MS) else BOUNDS_MS[-1]
            lower = BOUNDS_MS[i - 1] if 0 < i <= len(BOUNDS_MS) else 0.0
            if i >= len(BOUNDS_MS):
                return upper  # +Inf bucket: the highest finite bound, as Prometheus does
            return round(lower + (upper - lower) * (rank - seen) / count, 3)
        seen += count
    return None


def totals(rows: list[list[int]]) -> dict[str, Any]:
    summed = _row()
    for row in rows:
        for i, value in enumerate(row):
            summed[i] += value
    return {
        "requests": summed[REQUESTS],
        "errors": summed[ERRORS],
        "rate_limited": summed[LIMITED],
        "error_percent": error_percent(summed),
        "p50_ms": percentile(summed, 0.50),
        "p99_ms": percentile(summed, 0.99),
    }


#: The process's counters (the proxy records into it; the endpoint reads it).
traffic = Traffic()
record = traffic.record

__all__ = ["BUCKET_SECONDS", "Traffic", "percentile", "record", "traffic"]
