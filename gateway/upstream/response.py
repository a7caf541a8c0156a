"""A module's answer as the seam hands it over: one interface over both transports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from gateway.core.problems import BadGateway, GatewayError, UpstreamTimeout
from gateway.upstream import h1


class UpstreamResponse:
    """A module's answer whose body the caller reads (streamed) or drops."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        raise NotImplementedError

    def content_length(self) -> int | None:
        """The answer's declared size (``None``: unknown, chunked or absent)."""
        raise NotImplementedError

    def iter_chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, ``None`` at its end. Unlike ``iter_chunks`` it may
        be cancelled and called again (the stream timer interrupts a wait for a heartbeat)."""
        raise NotImplementedError

    async def read_sized(self) -> bytes:
        """The whole body of an answer with a ``Content-Length`` (small: the caller checks)."""
        raise NotImplementedError

    async def read(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (larger → BadGateway)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise BadGateway("The module's answer is larger than the gateway buffers.")
            parts.append(chunk)
        return b"".join(parts)

    def bound(self, timeout: float) -> None:
        """The rest of the body within ``timeout`` seconds from now (else a timeout, as a
        whole-exchange deadline would be): for an answer asked for ``head_only``."""
        raise NotImplementedError

    def release(self) -> None:
        """Return the connection to the pool (body fully read) or drop it (not read)."""
        raise NotImplementedError

    def close(self) -> None:
        """Abort: the upstream connection is closed, its request cancelled."""
        raise NotImplementedError


def body_error(exc: BaseException) -> GatewayError:
    """The body read's error ladder (the head arrived; the rest did not)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The module did not finish its answer in time.")
    return BadGateway(f"The module's answer broke off: {type(exc).__name__}.")


class H1UpstreamResponse(UpstreamResponse):
    """An answer read through ``gateway.upstream.h1`` (request bodies in memory)."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: h1.Response) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers

    def header(self, name: str) -> str | None:
        return self._response.header(name)

    def content_length(self) -> int | None:
        return self._response.content_length()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.iter_chunks():
                yield chunk
        except (TimeoutError, ConnectionError) as exc:
            raise body_error(exc) from exc

    async def next_chunk(self) -> bytes | None:
        try:
            return await self._response.next_chunk()
        except (TimeoutError, ConnectionError) as exc:
            raise body_error(exc) from exc

    async def read_sized(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, ConnectionError) as exc:
            raise body_error(exc) from exc

    def bound(self, timeout: float) -> None:
        self._response.bound(timeout)

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class AiohttpUpstreamResponse(UpstreamResponse):
    """An answer read through aiohttp (streamed request bodies)."""

    __slots__ = ("_deadline", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = list(response.raw_headers)
        self._deadline: float | None = None  # loop time; set by ``bound``

    def bound(self, timeout: float) -> None:
        self._deadline = asyncio.get_running_loop().time() + timeout

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def content_length(self) -> int | None:
        return self._response.content_length

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        if self._deadline is not None:  # each wait bounded, never across a ``yield``
            while (chunk := await self.next_chunk()) is not None:
                yield chunk
            return
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise body_error(exc) from exc

    async def next_chunk(self) -> bytes | None:
        try:
            if self._deadline is None:
                return await self._response.content.readany() or None
            async with asyncio.timeout_at(self._deadline):
                return await self._response.content.readany() or None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise body_error(exc) from exc

    async def read_sized(self) -> bytes:
        try:
            if self._deadline is None:
                return await self._response.read()
            async with asyncio.timeout_at(self._deadline):
                return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise body_error(exc) from exc

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


__all__ = ["AiohttpUpstreamResponse", "H1UpstreamResponse", "UpstreamResponse", "body_error"]
