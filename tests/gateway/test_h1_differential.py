"""``gateway.upstream.h1`` and h11 read the same hostile byte streams the same way, or h1 refuses.

Hypothesis writes an upstream's answer byte by byte — status lines in and out of range,
interim answers, random header sets with duplicate ``Content-Length``, ``Transfer-Encoding``
variants, obs-fold continuation lines and control characters, chunked bodies with bad
sizes, extensions and trailers, answers cut short, bytes after the answer (a second,
injected answer among them) — and a raw TCP server sends it, split at random points.
``gateway.upstream.h1`` reads it over the socket; h11 (the parser of httpcore and uvicorn, an
independent implementation) reads the same bytes as a client. The properties:

- when h1 gives an answer, h11 gives the same status, header fields and body (field
  values compared as RFC 9110 §5.5 defines them: without surrounding whitespace; the
  transfer coding name case-insensitively, as h11 lowercases it);
- when h1 would put the connection back in its pool, h11 saw nothing but line ends after
  that answer (a pooled connection is never poisoned);
- h1 never hangs: every stream ends with an answer or a refusal before the deadline.
"""

from __future__ import annotations

import asyncio
import string
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.upstream import h1

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
CONTENT_LENGTHS = [b"0", b"1", b"2", b"5", b"10", b" 5", b"5 ", b"5, 5", b"-1", b"+5", b"abc"]
CODINGS = [b"chunked", b"Chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked,"]
EVIL = b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/\r\nContent-Length: 4\r\n\r\nevil"

value_bytes = st.binary(max_size=12) | st.text(
    alphabet='ab :;=,\t"\x00\x01\x7f\x80\xff', max_size=8
).map(lambda text: text.encode("latin-1"))

field = st.one_of(
    st.tuples(
        st.sampled_from([b"Content-Length", b"content-length"]), st.sampled_from(CONTENT_LENGTHS)
    ),
    st.tuples(st.just(b"Transfer-Encoding"), st.sampled_from(CODINGS)),
    st.tuples(st.just(b"Connection"), st.sampled_from([b"close", b"keep-alive", b"upgrade"])),
    st.tuples(
        st.sampled_from([b"X-A", b"Location", b"Set-Cookie", b"Content-Type", b"Upgrade"]),
        value_bytes,
    ),
    st.tuples(st.text(TOKEN, min_size=1, max_size=6).map(str.encode), value_bytes),
    st.tuples(st.sampled_from([b"Bad Name", b"X:Y", b"", b"X\x00", b" X-A"]), st.just(b"v")),
)


@st.composite
def header_block(draw: st.DrawFn) -> bytes:
    lines = []
    for name, value in draw(st.lists(field, max_size=6)):
        line = name + b":" + draw(st.sampled_from([b" ", b"", b"  ", b"\t"])) + value
        if draw(st.integers(0, 9)) == 0:
            line += draw(st.sampled_from([b"\r\n continued", b"\r\n\tcontinued", b"\r\n "]))
        lines.append(line + draw(st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r"])))
    return b"".join(lines) + b"\r\n"


@st.composite
def status_line(draw: st.DrawFn, interim: bool = False) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"]))
    if interim:
        status = draw(st.sampled_from([100, 102, 103, 199, 101]))
    else:
        status = draw(
            st.sampled_from([200, 201, 204, 206, 301, 302, 304, 404, 500, 599, 600, 999, 99, 0])
            | st.integers(0, 999)
        )
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Some Reason", b" \x01bad"]))
    return version + b" %03d" % status + reason + b"\r\n"


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = b""
    for data in draw(st.lists(st.binary(max_size=10), max_size=4)):
        if not data:
            continue
        size = len(data) + draw(st.sampled_from([0] * 10 + [1, -1]))
        digits = (b"%x" % max(size, 0)) if draw(st.booleans()) else (b"%X" % max(size, 0))
        ext = draw(st.sampled_from([b""] * 6 + [b";a=b", b";", b"; x", b';a="q"', b" "]))
        out += digits + ext + b"\r\n" + data + draw(st.sampled_from([b"\r\n"] * 10 + [b"", b"\n"]))
    end = draw(
        st.sampled_from(
            [b"0\r\n\r\n"] * 6
            + [
                b"0\r\nX-Trailer: t\r\n\r\n",
                b"0\r\nLocation: /evil\r\n\r\n",
                b"0\r\n",
                b"",
                b"00\r\n\r\n",
            ]
        )
    )
    return out + end


safe_field = st.tuples(
    st.sampled_from([b"X-A", b"Content-Type", b"Cache-Control", b"x-b"]),
    st.text(alphabet=string.ascii_letters + " ,;=/", max_size=10).map(str.encode),
)


@st.composite
def coherent(draw: st.DrawFn) -> bytes:
    """A well-formed answer (sized, chunked or close-delimited), sometimes after a 1xx,
    and often followed by something."""
    out = b""
    if draw(st.integers(0, 5)) == 0:
        out += b"HTTP/1.1 %d Interim\r\nLink: </a>\r\n\r\n" % draw(st.sampled_from([100, 103]))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500]))
    fields = draw(st.lists(safe_field, max_size=4))
    body = draw(st.binary(max_size=20))
    framing = draw(st.sampled_from(["length", "length", "chunked", "close"]))
    if framing == "length":
        fields.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    if draw(st.booleans()):
        fields.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    fields = draw(st.permutations(fields))
    out += b"HTTP/1.1 %d R\r\n" % status
    out += b"".join(name + b": " + value + b"\r\n" for name, value in fields) + b"\r\n"
    return out + body


@dataclass
class Case:
    method: str
    stream: bytes
    splits: list[int]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    if draw(st.booleans()):
        stream = draw(coherent())
    else:
        stream = b""
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # interim answers
            stream += draw(status_line(interim=True)) + draw(header_block())
        stream += draw(status_line()) + draw(header_block())
        stream += draw(st.binary(max_size=20) | chunked_body())
    stream += draw(st.sampled_from([b""] * 4 + [b"\r\n", b"garbage", EVIL, b"HTTP/1.1 200 OK\r\n"]))
    splits = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    return Case(draw(st.sampled_from(["GET"] * 5 + ["HEAD", "POST"])), stream, splits)


def h11_reads(case: Case) -> tuple[Answer | None, bytes]:
    """h11's answer (``None``: it refuses) and the bytes it saw after that answer."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=case.method, target="/x", headers=[("Host", "m")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(case.stream)
    conn.receive_data(b"")
    status, headers, body = 0, [], b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return (status, headers, body), conn.trailing_data[0]
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return None, b""
    except h11.RemoteProtocolError:
        return None, b""


async def h1_reads(case: Case) -> tuple[Answer | None, bool]:
    """h1's answer over a real socket (``None``: it refuses) and whether it would pool the
    connection."""

    written = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            last = 0
            for cut in [*case.splits, len(case.stream)]:
                writer.write(case.stream[last:cut])
                last = cut
                await writer.drain()
                await asyncio.sleep(0.001)
            written.set()
            await asyncio.sleep(0.02)
        except ConnectionError:
            pass
        finally:
            written.set()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = h1.Pool(limit=1)
    body = b"{}" if case.method == "POST" else None
    try:
        try:
            response = await pool.request(
                case.method, h1.origin(f"http://127.0.0.1:{port}"), "/x", [], body, 3.0, 3.0
            )
            data = b"".join([chunk async for chunk in response.iter_chunks()])
        except ConnectionError:  # UpstreamProtocolError, UpstreamClosed
            return None, False
        conn = response.conn
        # Judge reuse once every byte the module sends has arrived (bytes that trail the
        # answer in a later write must spoil the connection too), before the module closes.
        await written.wait()
        await asyncio.sleep(0.002)
        pooled = conn.complete and conn.error is None and conn.reusable and conn.idle_ok()
        response.release()
        return (response.status, response.headers, data), pooled
    finally:
        pool.close()
        server.close()


def normal(answer: Answer) -> Answer:
    status, headers, body = answer
    fields = []
    for name, value in headers:
        value = value.strip(b" \t")
        if name.lower() == b"transfer-encoding":
            value = value.lower()
        fields.append((name, value))
    return status, fields, body


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases())
def test_h1_reads_what_h11_reads_or_refuses(case: Case) -> None:
    got, pooled = asyncio.run(h1_reads(case))
    expected, after = h11_reads(case)
    event(
        f"h1 {'refuses' if got is None else 'answers'}, h11 {'refuses' if expected is None else 'answers'}{', pooled' if pooled else ''}"
    )
    if got is None:
        return  # refused: a 502, never a wrong answer
    assert expected is not None, f"h1 accepted what h11 refuses: {got}"
    assert normal(got) == normal(expected)
    if pooled:
        assert after.strip(b"\r\n") == b"", f"pooled with {after!r} after the answer"


def test_the_generator_reaches_both_outcomes() -> None:
    """A guard on the test itself: valid answers are generated and read, bad ones refused."""
    valid = Case("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", [10])
    assert asyncio.run(h1_reads(valid)) == ((200, [(b"Content-Length", b"2")], b"ok"), True)
    assert h11_reads(valid)[0] == (200, [(b"Content-Length", b"2")], b"ok")
    poisoned = Case("GET", valid.stream + EVIL, [])
    assert asyncio.run(h1_reads(poisoned))[1] is False
    assert asyncio.run(h1_reads(Case("GET", b"HTTP/1.1 600 X\r\n\r\n", [])))[0] is None


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
