"""The one seam for proxied upstream calls.

Two clients, one interface (:class:`UpstreamResponse`):

- ``gateway.upstream.h1`` for every request whose body is in memory (none, a body that arrived in
  one message, a replayable retry body): a lean HTTP/1.1 client on ``httptools`` with a
  keep-alive pool per module, ≈ 20 µs CPU per round trip against aiohttp's ≈ 70 µs
  (``python -m bench.clients``; docs/PERFORMANCE.md);
- aiohttp's client for streamed request bodies (large or chunked), which it sends with
  back-pressure: one connection per upload (an idle aiohttp connection would take an
  answer a module sends unasked), the answer's framing held to ``gateway.upstream.h1``'s rules.

httpx (≈ 800 µs per round trip here) stays where its cost does not matter: health probes,
the demo, tests.

Rules kept here: no redirects followed, no automatic decompression (bytes and
``Content-Encoding`` pass through together), no headers added that the client
did not send (besides ``Host`` and ``Content-Length``), bodies streamed both ways.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import yarl

from gateway.core.conf import gw
from gateway.core.problems import (
    BadGateway,
    GatewayError,
    InvalidRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream import h1
from gateway.upstream.h1_head import (
    FRAMING_NAME_SIZES,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    UNSIZED,
    framing,
)

CHUNK = 64 * 1024
_sessions: dict[int, aiohttp.ClientSession] = {}


def session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    client = _sessions.get(id(loop))
    if client is None or client.closed:
        connector = aiohttp.TCPConnector(
            limit=int(gw.upstream_pool_size),
            limit_per_host=0,
            ttl_dns_cache=300,
            # One connection per upload: aiohttp parses what a module sends on an idle
            # keep-alive connection and hands it to the next request on it (an injected
            # answer). Uploads are large or chunked: one handshake more is nothing.
            force_close=True,
            enable_cleanup_closed=True,
        )
        client = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            # gateway.upstream.h1's limits, as near as aiohttp has them (it has no bound on the
            # whole head: 100 fields of at most 64 KiB each)
            max_line_size=MAX_HEAD_BYTES,
            max_field_size=MAX_HEAD_BYTES,
            max_headers=MAX_FIELDS,
        )
        _sessions[id(loop)] = client
    return client


async def close() -> None:
    """Close this loop's clients (ASGI lifespan shutdown)."""
    h1.close_pool()
    loop = asyncio.get_running_loop()
    client = _sessions.pop(id(loop), None)
    if client is not None:
        await client.close()


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

    def release(self) -> None:
        """Return the connection to the pool (body fully read) or drop it (not read)."""
        raise NotImplementedError

    def close(self) -> None:
        """Abort: the upstream connection is closed, its request cancelled."""
        raise NotImplementedError


def _body_error(exc: BaseException) -> GatewayError:
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
            raise _body_error(exc) from exc

    async def read_sized(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, ConnectionError) as exc:
            raise _body_error(exc) from exc

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class AiohttpUpstreamResponse(UpstreamResponse):
    """An answer read through aiohttp (streamed request bodies)."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = list(response.raw_headers)

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def content_length(self) -> int | None:
        return self._response.content_length

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _body_error(exc) from exc

    async def read_sized(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _body_error(exc) from exc

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


Body = bytes | AsyncIterator[bytes] | None


async def send(
    method: str,
    base_url: str,
    target: str,
    headers: list[tuple[str, str]],
    body: Body,
    timeout: float,
    *,
    unavailable: type[GatewayError] = UpstreamUnavailable,
) -> UpstreamResponse:
    """Send one request to ``base_url`` + ``target`` (path and query, sent byte for byte);
    the answer's body is read later by the caller (streaming).

    ``timeout`` bounds the whole exchange, the body read included. Errors come
    back as gateway problems: connect failure → ``unavailable`` (503), timeout →
    504, an invalid answer (a status outside 100–599 included) → 502, a request that
    cannot be written as HTTP/1.1 (CR/LF/NUL in the target or a header value, a header
    name that is not a token) → 400 before anything is sent. A body in memory (or none)
    goes through ``gateway.upstream.h1``; a streamed body through aiohttp.
    """
    connect_timeout = min(timeout, 10.0)
    if body is None or isinstance(body, bytes):
        try:
            response = await h1.pool(int(gw.upstream_pool_size)).request(
                method, h1.origin(base_url), target, headers, body, timeout, connect_timeout
            )
        except h1.InvalidRequestHead as exc:
            raise InvalidRequest(f"The request cannot be forwarded: {exc}.") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The module did not answer within {timeout:g} s.") from exc
        except h1.ConnectFailed as exc:
            raise unavailable(f"Cannot connect to the module: {exc}.") from exc
        except ConnectionError as exc:
            raise BadGateway(f"The module sent no valid answer: {exc}.") from exc
        return H1UpstreamResponse(response)
    try:  # the same checks as h1's, before aiohttp sends a byte
        h1.request_head(method, h1.origin(base_url), target, headers, None)
    except h1.InvalidRequestHead as exc:
        raise InvalidRequest(f"The request cannot be forwarded: {exc}.") from exc
    try:
        streamed = await session().request(
            method,
            # encoded=True: the path and query go upstream byte for byte (no re-quoting).
            yarl.URL(base_url + target, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=connect_timeout),
            compress=None,
            chunked=None,
        )
    except TimeoutError as exc:
        raise UpstreamTimeout(f"The module did not answer within {timeout:g} s.") from exc
    except aiohttp.ClientConnectorError as exc:
        raise unavailable(f"Cannot connect to the module: {exc.os_error.strerror or exc}.") from exc
    except aiohttp.ClientError as exc:
        # Also where our own request-body stream failed (too large, client gone):
        # the caller replaces this with the body's own error.
        raise BadGateway(f"The module sent no valid answer: {type(exc).__name__}.") from exc
    if not 100 <= streamed.status <= 599:
        streamed.close()
        raise BadGateway(f"The module sent no valid answer: status {streamed.status}.")
    refusal = _framing_refusal(streamed.raw_headers)
    if refusal is not None:
        streamed.close()
        raise BadGateway(f"The module sent no valid answer: invalid answer: {refusal}.")
    return AiohttpUpstreamResponse(streamed)


def _framing_refusal(headers: tuple[tuple[bytes, bytes], ...]) -> str | None:
    """Why ``gateway.upstream.h1`` would refuse this head's framing (a ``Transfer-Encoding`` other
    than exactly one ``chunked``, or with a ``Content-Length``); ``None``: it would not."""
    length = UNSIZED
    for name, value in headers:
        if len(name) in FRAMING_NAME_SIZES:
            found = framing(length, name, value)
            if type(found) is str:
                return found
            length = found  # type: ignore[assignment]  # a str is returned above
    return None
