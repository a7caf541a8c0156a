"""A buffered line writer for the access log: one ``write`` per ~4 KiB, not per request.

Why: through ``logging`` (a ``LogRecord``, the handler's lock, a formatter, a write and a
flush per line) the access log cost ≈ 30 µs of CPU per proxied request, a quarter of the
whole request (py-spy, ``bench.ab --env VX11_ACCESS_LOG=true``). nginx's ``access_log …
buffer=size flush=time`` is the answer the field settled on: lines are appended to a buffer
and written when it fills or when ``FLUSH_SECONDS`` have passed (one loop timer, armed by
the first line of a quiet period), and at exit.

Each ``os.write`` carries whole lines and at most ``PIPE_BUF`` (4096) bytes, so the lines of
several worker processes sharing one pipe (a container's stdout) never interleave inside a
line: POSIX makes a pipe write of at most ``PIPE_BUF`` bytes atomic. The price: a process
killed with SIGKILL loses at most the last ``FLUSH_SECONDS`` of lines (SIGTERM flushes).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import select

#: How long a line may wait in the buffer.
FLUSH_SECONDS = 0.1
#: The most bytes of one ``os.write`` (POSIX ``PIPE_BUF``: atomic on a pipe).
CHUNK = getattr(select, "PIPE_BUF", 4096)
#: Buffered bytes that make a write happen at once.
HIGH_WATER = 64 * 1024


class LineSink:
    """Lines for one file descriptor, written in whole-line chunks of at most ``CHUNK``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[bytes] = []
        self.size = 0
        self.armed = False

    def add(self, line: bytes) -> None:
        """Queue one line (without its newline)."""
        self.lines.append(line + b"\n")
        self.size += len(line) + 1
        if self.size >= HIGH_WATER:
            self.flush()
        elif not self.armed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a command, a test): write now
                self.flush()
                return
            self.armed = True
            loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write every queued line now."""
        self.armed = False
        lines, self.lines, self.size = self.lines, [], 0
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > CHUNK:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(OSError):  # a closed stdout must not fail requests
            while view:
                view = view[os.write(self.fd, view) :]


#: The access log's sink: standard output.
stdout = LineSink(1)
atexit.register(stdout.flush)

__all__ = ["CHUNK", "FLUSH_SECONDS", "HIGH_WATER", "LineSink", "stdout"]
