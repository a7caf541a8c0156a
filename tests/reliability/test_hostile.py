"""Hostile input against a real gateway process: fuzzing, raw bytes, huge and slow requests.

Every answer must be a 4xx (a problem+json body when the gateway itself answers; the
HTTP parser's own plain 400 for bytes that are not HTTP), nothing may reach a module it
should not (``echo.seen``), and no token may appear in the gateway's log, which runs at
DEBUG with the access log on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.reliability.conftest import (
    GW_TOKEN,
    TOKEN,
    Gateways,
    RawAnswer,
    await_for,
    figure,
    load,
    manage,
    open_fds,
    percentile,
    pid_of,
    raw_request,
    request_bytes,
    summary,
)
from tests.servers import GatewayProcess, UpstreamServer

pytestmark = pytest.mark.reliability

MAX_BODY = 65536
WRONG_TOKEN = "rel-wrong-token-9d8c7b6a5f4e3d2c"
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@dataclass
class Hostile:
    server: GatewayProcess
    echo: UpstreamServer
    client_token: str

    @property
    def op(self) -> list[tuple[str, str]]:
        return [("X-VX11-Token", TOKEN), ("Content-Type", "application/json")]

    @property
    def gw(self) -> list[tuple[str, str]]:
        return [("X-VX11-GW-Token", GW_TOKEN)]

    async def send(self, data: bytes) -> RawAnswer:
        return await raw_request(self.server.port, data)

    def secrets(self) -> list[str]:
        return [TOKEN, GW_TOKEN, self.client_token, WRONG_TOKEN]


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    """One gateway for the raw-input tests (they change no state), logging at DEBUG."""
    echo = UpstreamServer().start()
    pool = Gateways(tempfile.mkdtemp(prefix="vx11-hostile-"))
    env = pool.env(
        echo.url, VX11_MAX_BODY_BYTES=MAX_BODY, VX11_LOG_LEVEL="DEBUG", VX11_ACCESS_LOG="true"
    )
    client_token = manage(env, "create_api_client", "hostile-app").split()[-1]
    server = pool.start(env)
    try:
        yield Hostile(server, echo, client_token)
    finally:
        pool.stop()
        echo.stop()


@pytest.fixture
def h(hostile: Hostile) -> Iterator[Hostile]:
    """Each test starts with an empty ``echo.seen`` and ends with a clean log."""
    hostile.echo.seen.clear()
    yield hostile
    output = hostile.server.output()
    leaked = [secret for secret in hostile.secrets() if secret in output]
    assert not leaked, f"tokens in the gateway log: {leaked}"
    assert hostile.server.proc is not None and hostile.server.proc.poll() is None


def is_problem(answer: RawAnswer, status: int) -> bool:
    return (
        answer.status == status
        and answer.headers.get("content-type") == "application/problem+json"
        and b'"correlation_id"' in answer.body
    )


# --------------------------------------------------------------------------- fuzzing


@pytest.mark.db_backend  # ./run test runs it again on PostgreSQL (NUL bytes, odd text)
def test_fuzzing_the_openapi_schema_finds_no_server_error(gateways: Gateways, echo):
    """schemathesis draws valid and invalid requests for every operation in /openapi.json.

    No 5xx except the documented upstream ones (502/503/504 on /vx11/route and /shub, e.g.
    a breaker the fuzzer forced open, and 503 on /ready); every error is problem+json.
    Every answer conforms to the schema: a documented status, a documented media type,
    a body that validates against the documented schema.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    conformance = [status_code_conformance, content_type_conformance, response_schema_conformance]

    server = gateways.start(gateways.env(echo.url))
    examples = int(os.environ.get("VX11_FUZZ_EXAMPLES", "20"))
    headers = {"X-VX11-Token": TOKEN, "X-VX11-GW-Token": GW_TOKEN}
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    # Reads and the proxy first, then the writes (which disable routes, force breakers).
    operations.sort(
        key=lambda op: (
            op.method.upper() != "GET" and not op.path.startswith(("/vx11/route/", "/shub/{")),
            "circuit-breaker" in op.path,
        )
    )
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    def fuzz(strategy, test) -> None:
        given(case=strategy)(
            settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(test)
        )()

    def checker(op, mode: GenerationMode):
        def test(case) -> None:
            check(op, mode, case)

        return test

    def check(op, mode: GenerationMode, case) -> None:
        response = case.call(base_url=server.url, headers=headers)
        status = response.status_code
        statuses[status] += 1
        content_type = (response.headers.get("content-type") or [""])[0]
        upstream_error = status in (502, 503, 504) and op.path.startswith(
            ("/vx11/route/", "/shub/{")
        )
        if status >= 500 and not upstream_error and not (op.path == "/ready" and status == 503):
            failures.append(f"{op.label} [{mode.value}] → {status} {response.text[:200]}")
        if status >= 400 and not content_type.startswith("application/problem+json"):
            failures.append(f"{op.label} [{mode.value}] → {status} as {content_type!r}")
        case.validate_response(response, checks=conformance, headers=headers)  # raises

    for op in operations:
        names = {p.name for p in op.iter_parameters() if p.location == "path"}
        fixed: list[dict[str, str] | None] = [None]  # random path parameters: mostly 404s
        if "intent" in names:
            fixed += [{"intent": "chat"}, {"intent": "task"}]
        if "module" in names:
            fixed += [{"module": "switch"}]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for path_parameters in fixed:
                strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)
                with contextlib.suppress(Unsatisfiable):  # nothing to negate in this operation
                    fuzz(strategy, checker(op, mode))

    figure(
        "fuzzing",
        f"{sum(statuses.values())} requests over {len(operations)} operations in "
        f"{time.monotonic() - started:.1f}s: {dict(sorted(statuses.items()))}",
    )
    assert not failures, "\n".join(failures[:20])
    assert sum(statuses.values()) > 10 * len(operations)
    assert "Traceback" not in server.output(), server.output()[-4000:]


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "target",
    [
        "/shub/../admin/",
        "/shub/%2e%2e/admin/",
        "/shub/a/%252e%252e/b",
        "/shub/a%2fb",
        "/shub/a%252fb",
        "/shub/a\\..\\b",
        "/shub/a%5c..%5cb",
        "/shub/a%00b",
        "/shub/./a",
        "/shub/a//b",
        "/shub/%c0%ae%c0%ae/admin",  # overlong UTF-8 for '..'
        "/shub/a%ff/b",  # invalid UTF-8
        "/shub/%25252525252e",  # still changing after four decodings
    ],
)
async def test_traversal_variants_are_refused_before_any_module(h: Hostile, target: str):
    answer = await h.send(request_bytes("GET", target, h.gw))
    assert is_problem(answer, 400), (answer.status, answer.body[:200])
    assert h.echo.seen == []


async def test_bytes_that_are_not_http_are_refused_by_the_parser(h: Hostile):
    """Raw non-ASCII bytes in the path, CR/LF/NUL inside header values, obs-fold."""
    attempts = [
        request_bytes("GET", b"/shub/a\xff/b", h.gw),
        request_bytes("POST", b"/vx11/route/ta\xffsk", h.op, b"{}"),
        request_bytes("GET", b"/vx11/routes/ch\xffat", h.op),
        request_bytes("POST", "/vx11/route/task", [*h.op, ("X-A", "a\rInjected: 1")], b"{}"),
        request_bytes("POST", "/vx11/route/task", [*h.op, ("X-A", "a\nInjected: 1")], b"{}"),
        request_bytes("POST", "/vx11/route/task", [*h.op, ("X-A", "a\r\n folded")], b"{}"),
        request_bytes("POST", "/vx11/route/task", [*h.op, ("X-A", "a\x00b")], b"{}"),
        request_bytes("POST", "/vx11/route/task", [*h.op, ("X-A\x01", "b")], b"{}"),
    ]
    answers = [await h.send(data) for data in attempts]
    assert [a.status for a in answers] == [400] * len(attempts)
    assert h.echo.seen == []


async def test_invalid_utf8_in_credentials_sessions_and_bodies_is_a_4xx(h: Hostile):
    answers = {
        "token": await h.send(
            request_bytes("POST", "/vx11/route/task", [(b"X-VX11-Token", b"\xff\xfe")], b"{}")
        ),
        "api token": await h.send(
            request_bytes("GET", "/vx11/routes", [(b"X-VX11-Token", b"\xff")])
        ),
        "gw token": await h.send(request_bytes("GET", "/shub/x", [(b"X-VX11-GW-Token", b"\xff")])),
        "session": await h.send(
            request_bytes(
                "POST", "/vx11/route/chat", [*h.op, (b"X-VX11-Session", b"a\xffb")], b"{}"
            )
        ),
        "chat body": await h.send(
            request_bytes("POST", "/vx11/route/chat", h.op, b'{"prompt": "\xff\xfe"}')
        ),
        "api body": await h.send(
            request_bytes("POST", "/vx11/routes", h.op, b'{"intent": "\xff", "module": "switch"}')
        ),
        "intent": await h.send(request_bytes("POST", "/vx11/route/ta%ffsk", h.op, b"{}")),
    }
    assert {name: a.status for name, a in answers.items()} == {
        "token": 403,
        "api token": 403,
        "gw token": 403,
        "session": 400,
        "chat body": 400,
        "api body": 400,
        "intent": 404,
    }
    assert all(is_problem(a, a.status) for a in answers.values())
    assert h.echo.seen == []


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    "value",
    [
        b"<script>alert(1)</script>",
        b"abc def",
        b"a" * 129,
        b"abc%0d%0aSet-Cookie: x=1",
        b"abc\xffdef",
        b"abc\tdef",
        b"../../etc/passwd",
        b"",
    ],
)
async def test_correlation_id_injection_attempts_are_replaced(h: Hostile, value: bytes):
    answer = await h.send(
        request_bytes("POST", "/vx11/route/task", [*h.op, (b"X-Correlation-ID", value)], b"{}")
    )
    assert answer.status == 200
    cid = answer.headers["x-correlation-id"]
    assert UUID4.match(cid), cid
    assert [seen.headers["X-Correlation-ID"] for seen in h.echo.seen] == [cid]


async def test_a_valid_correlation_id_is_kept(h: Hostile):
    answer = await h.send(
        request_bytes("POST", "/vx11/route/task", [*h.op, ("X-Correlation-ID", "ok-1.2:3")], b"{}")
    )
    assert answer.headers["x-correlation-id"] == "ok-1.2:3"
    assert h.echo.seen[0].headers["X-Correlation-ID"] == "ok-1.2:3"


@pytest.mark.parametrize(
    "kind", ["value 64 KiB", "value 1 MiB", "5000 headers", "management API, 1 MiB"]
)
async def test_oversize_headers_are_refused_and_never_forwarded(h: Hostile, kind: str):
    if kind == "value 64 KiB":
        data = request_bytes("POST", "/vx11/route/task", [*h.op, ("X-Big", "a" * 65536)], b"{}")
    elif kind == "value 1 MiB":
        data = request_bytes("GET", "/shub/x", [*h.gw, ("X-Big", "a" * (1 << 20))])
    elif kind == "5000 headers":
        extra = [(f"X-H{i}", "v") for i in range(5000)]
        data = request_bytes("POST", "/vx11/route/task", [*h.op, *extra], b"{}")
    else:
        data = request_bytes("GET", "/vx11/routes", [*h.op, ("X-Big", "a" * (1 << 20))])
    answer = await h.send(data)
    assert is_problem(answer, 431), (answer.status, answer.body[:200])  # gateway/edge/server.py
    assert h.echo.seen == []
    healthy = await h.send(request_bytes("GET", "/health", []))
    assert healthy.status == 200


# --------------------------------------------------------------------------- bodies


async def test_oversize_bodies_are_refused_with_413_before_any_module(h: Hostile):
    big = b"x" * (MAX_BODY + 1)
    chunked = b"".join(b"%x\r\n%s\r\n" % (8192, b"x" * 8192) for _ in range(10)) + b"0\r\n\r\n"
    answers = {
        "declared": await h.send(request_bytes("POST", "/vx11/route/task", h.op, big)),
        "chunked": await h.send(
            request_bytes(
                "POST", "/vx11/route/task", [*h.op, ("Transfer-Encoding", "chunked")], chunked
            )
        ),
        "chat": await h.send(
            request_bytes("POST", "/vx11/route/chat", h.op, b'{"prompt": "' + big + b'"}')
        ),
        "shub": await h.send(request_bytes("POST", "/shub/upload", h.gw, big)),
        "lying length": await h.send(
            request_bytes(
                "POST", "/vx11/route/task", [*h.op, ("Content-Length", str(1 << 40))], b"{}"
            )
        ),
        # Django's own limit (DATA_UPLOAD_MAX_MEMORY_SIZE, 2.5 MB) on the management API.
        "management API": await h.send(
            request_bytes(
                "POST",
                "/vx11/routes",
                h.op,
                b'{"intent": "x", "description": "' + b"x" * (3 << 20) + b'"}',
            )
        ),
    }
    assert {name: a.status for name, a in answers.items()} == dict.fromkeys(answers, 413)
    assert all(is_problem(a, 413) for a in answers.values())
    assert h.echo.seen == []


@pytest.mark.parametrize(
    ("target", "method", "body"),
    [
        ("/vx11/route/chat", "POST", b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
        ("/vx11/route/chat", "POST", b'{"a": ' * 2000 + b"1" + b"}" * 2000),
        ("/vx11/route/code", "POST", b'{"prompt": ' + b"[" * 30000),
        ("/vx11/routes", "POST", b"[" * 30000 + b"]" * 30000),
        ("/vx11/routes/chat", "PATCH", b'{"a": ' * 5000 + b"1" + b"}" * 5000),
    ],
    ids=["chat arrays", "chat objects", "code unterminated", "api arrays", "api objects"],
)
async def test_deeply_nested_json_is_a_400_not_a_crash(
    h: Hostile, target: str, method: str, body: bytes
):
    answer = await h.send(request_bytes(method, target, h.op, body))
    assert is_problem(answer, 400), (answer.status, answer.body[:300])
    assert h.echo.seen == []


# --------------------------------------------------------------------------- slow clients


async def test_slow_clients_do_not_starve_others_and_idle_ones_are_closed(h: Hostile):
    """50 sockets trickle their headers a byte at a time, 50 more go idle after a request.

    Meanwhile other clients are served as usual; the idle keep-alive sockets are closed
    after ``--timeout-keep-alive`` (5 s). The trickling ones stay open until
    ``VX11_CLIENT_HEADER_TIMEOUT`` (10 s, longer than this test; its own test is in
    tests/reliability/test_connection_limits.py).
    """
    pid = pid_of(h.server)
    port = h.server.port

    def task(client: httpx.AsyncClient):
        return client.post("/vx11/route/task", json={}, headers={"X-VX11-Token": TOKEN})

    async with httpx.AsyncClient(base_url=h.server.url, timeout=10) as client:
        await load(lambda _: task(client), concurrency=4, count=40)  # pools warm
    baseline = open_fds(pid)
    trickling: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /vx11/route/task HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        trickling.append((reader, writer))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        idle.append((reader, writer))
    opened = time.monotonic()
    during = open_fds(pid)

    async def trickle() -> None:
        for _ in range(14):
            for _, writer in trickling:
                writer.write(b"a")
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(base_url=h.server.url, timeout=10) as client:
        trickler = asyncio.create_task(trickle())
        served = await load(lambda _: task(client), concurrency=4, duration=3.0)

    closed_at: list[float] = []

    async def closed_by_server(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # b"" at EOF: the server closed the socket
        closed_at.append(time.monotonic() - opened)

    await asyncio.wait_for(asyncio.gather(*(closed_by_server(r) for r, _ in idle)), 10)
    await trickler
    still_open = sum(1 for reader, _ in trickling if not reader.at_eof())
    for _, writer in trickling + idle:
        writer.close()
    fds_back = await await_for(lambda: _true(open_fds(pid) <= baseline), timeout=5)
    figure(
        "slow clients",
        f"served {summary(served)}; idle keep-alive sockets closed after "
        f"{min(closed_at):.1f}-{max(closed_at):.1f}s; {still_open}/50 trickling sockets still "
        f"open after 7 s; fds baseline={baseline} with 100 slow sockets={during} "
        f"after={open_fds(pid)}",
    )
    assert {s.status for s in served} == {200}
    assert percentile([s.latency for s in served], 99) < 0.5
    assert max(closed_at) < 8.0  # --timeout-keep-alive 5 s, plus slack
    assert fds_back


async def _true(value: bool) -> bool:
    return value
