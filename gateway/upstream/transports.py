"""The two transports behind the seam (``gateway.upstream.request.Transport``).

- :class:`H1Transport`, for every request whose body is in memory (none, a body that
  arrived in one message, a replayable retry body): ``gateway.upstream.h1``, a lean
  HTTP/1.1 client on ``httptools`` with a keep-alive pool, ≈ 20 µs CPU per round trip
  against aiohttp's ≈ 70 µs (``python -m bench.clients``; docs/PERFORMANCE.md). By default
  it uses this event loop's shared pool (the proxy's); given a pool of its own it keeps
  apart from it (health probes).
- :class:`StreamingTransport`, aiohttp's client for streamed request bodies (large or
  chunked), which it sends with back-pressure: one connection per upload (an idle aiohttp
  connection would take an answer a module sends unasked), the answer's framing held to
  ``gateway.upstream.h1``'s rules.

Both trust what ``gateway.upstream.tls`` trusts. Rules kept here: no redirects followed,
no automatic decompression (bytes and ``Content-Encoding`` pass through together), no
headers added that the client did not send (besides ``Host`` and ``Content-Length``),
bodies streamed both ways. Failures are raised transport-neutral (``ConnectFailed``,
``TimeoutError``, ``ConnectionError``, ``InvalidRequestHead``): the seam maps them.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import aiohttp
import yarl

from gateway.core.conf import gw
from gateway.upstream import h1, tls
from gateway.upstream.h1_conn import ConnectFailed, UpstreamProtocolError
from gateway.upstream.h1_head import (
    FRAMING_NAME_SIZES,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    UNSIZED,
    framing,
)
from gateway.upstream.request import OutboundRequest
from gateway.upstream.response import (
    AiohttpUpstreamResponse,
    H1UpstreamResponse,
    UpstreamResponse,
)


class H1Transport:
    """Bodies in memory (or none) through ``gateway.upstream.h1``.

    ``pool=None``: this event loop's shared pool (``h1.pool()``, sized by
    ``VX11_UPSTREAM_POOL_SIZE`` when it is created). With a pool of its own the transport
    is closed by its owner (``aclose`` or ``async with``).
    """

    __slots__ = ("_pool",)

    def __init__(self, pool: h1.Pool | None = None) -> None:
        self._pool = pool

    async def send(self, origin: str, request: OutboundRequest) -> UpstreamResponse:
        body = request.body
        if body is not None and not isinstance(body, bytes):
            raise TypeError(
                "H1Transport sends bodies in memory; a stream goes by StreamingTransport"
            )
        response = await (self._pool or h1.pool()).request(
            request.method,
            h1.origin(origin),
            request.target,
            request.headers,
            body,
            request.timeout,
            gw.connect_timeout,  # within the deadline: h1 takes the shorter
            request.head_only,
        )
        return H1UpstreamResponse(response)

    async def aclose(self) -> None:
        """Close the idle connections of the transport's own pool (the shared one stays)."""
        if self._pool is not None:
            self._pool.close()

    async def __aenter__(self) -> H1Transport:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_sessions: dict[int, aiohttp.ClientSession] = {}


def session() -> aiohttp.ClientSession:
    """This event loop's aiohttp session for streamed uploads."""
    loop = asyncio.get_running_loop()
    client = _sessions.get(id(loop))
    if client is None or client.closed:
        connector = aiohttp.TCPConnector(
            limit=gw.upstream_pool_size,
            limit_per_host=0,
            ttl_dns_cache=300,
            ssl=tls.client_context(),
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


class StreamingTransport:
    """Streamed request bodies through aiohttp (one connection per upload)."""

    __slots__ = ()

    async def send(self, origin: str, request: OutboundRequest) -> UpstreamResponse:
        method, target, headers, timeout = (
            request.method,
            request.target,
            request.headers,
            request.timeout,
        )
        # The same checks as h1's, before aiohttp sends a byte (InvalidRequestHead).
        h1.request_head(method, h1.origin(origin), target, headers, None)
        connect = min(timeout, gw.connect_timeout)
        try:
            # head_only (streaming routes): the deadline bounds the head, not the body.
            async with asyncio.timeout(timeout if request.head_only else None):
                streamed = await session().request(
                    method,
                    # encoded=True: the path and query go upstream byte for byte (no re-quoting).
                    yarl.URL(origin + target, encoded=True),
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None if request.head_only else timeout, connect=connect
                    ),
                    compress=None,
                    chunked=None,
                )
        except aiohttp.ConnectionTimeoutError as exc:
            if connect < timeout:  # VX11_CONNECT_TIMEOUT, not the deadline: no connection
                raise ConnectFailed(f"connect timed out after {connect:g} s") from exc
            raise
        except TimeoutError:
            raise
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(exc.os_error.strerror or str(exc)) from exc
        except aiohttp.ClientError as exc:
            # Also where our own request-body stream failed (too large, client gone):
            # the caller replaces the problem with the body's own error.
            raise UpstreamProtocolError(type(exc).__name__) from exc
        if not 100 <= streamed.status <= 599:
            streamed.close()
            raise UpstreamProtocolError(f"status {streamed.status}")
        refusal = framing_refusal(streamed.raw_headers)
        if refusal is not None:
            streamed.close()
            raise UpstreamProtocolError(f"invalid answer: {refusal}")
        return AiohttpUpstreamResponse(streamed)


def framing_refusal(headers: tuple[tuple[bytes, bytes], ...]) -> str | None:
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


#: The transports ``gateway.upstream.send`` chooses between.
H1 = H1Transport()
STREAMING = StreamingTransport()


async def close() -> None:
    """Close this loop's shared clients (ASGI lifespan shutdown)."""
    h1.close_pool()
    loop = asyncio.get_running_loop()
    client = _sessions.pop(id(loop), None)
    if client is not None:
        await client.close()


__all__ = [
    "H1",
    "STREAMING",
    "H1Transport",
    "StreamingTransport",
    "close",
    "framing_refusal",
    "session",
]
