"""The access log's buffered writer (``gateway.edge.logsink``) on real pipes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from gateway.edge import logsink
from gateway.edge.logsink import CHUNK, LineSink


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            part = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not part:
            return out
        out += part


def test_without_a_loop_a_line_is_written_at_once() -> None:
    r, w = os.pipe()
    sink = LineSink(w)
    sink.add(b'{"a":1}')
    assert read_all(r) == b'{"a":1}\n'


def test_in_a_loop_lines_wait_for_the_timer_then_go_in_whole_line_chunks() -> None:
    r, w = os.pipe()
    sink = LineSink(w)
    line = b"x" * 999  # 1000 bytes with its newline: four fit in one 4096-byte write

    async def scenario() -> tuple[bytes, bytes]:
        for _ in range(10):
            sink.add(line)
        early = read_all(r)
        await asyncio.sleep(logsink.FLUSH_SECONDS * 3)
        return early, read_all(r)

    early, later = asyncio.run(scenario())
    assert early == b""  # buffered
    assert later == (line + b"\n") * 10
    assert not sink.armed and sink.size == 0


def test_a_full_buffer_is_written_without_waiting(monkeypatch) -> None:
    r, w = os.pipe()
    sink = LineSink(w)
    monkeypatch.setattr(logsink, "HIGH_WATER", 3000)
    writes: list[int] = []
    real = os.write

    def counted(fd: int, data: bytes | memoryview) -> int:
        writes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", counted)

    async def scenario() -> bytes:
        for _ in range(3):
            sink.add(b"y" * 999)
        return read_all(r)

    assert asyncio.run(scenario()) == (b"y" * 999 + b"\n") * 3
    assert writes and max(writes) <= CHUNK and all(n % 1000 == 0 for n in writes)


WRITER = """
import asyncio, json, sys
from gateway.edge.logsink import LineSink
sink = LineSink(1)
async def main():
    for i in range(3000):
        sink.add(json.dumps({"who": sys.argv[1], "i": i, "pad": "z" * 300}).encode())
        if i % 100 == 0:
            await asyncio.sleep(0)
    sink.flush()
asyncio.run(main())
"""


def test_two_processes_on_one_pipe_never_mix_their_lines() -> None:
    r, w = os.pipe()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, name], stdout=w, cwd=os.getcwd())
        for name in ("a", "b")
    ]
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    lines = data.splitlines()
    assert len(lines) == 6000
    seen = [json.loads(line) for line in lines]  # every line whole
    for name in ("a", "b"):
        assert [d["i"] for d in seen if d["who"] == name] == list(range(3000))
