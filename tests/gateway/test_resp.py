"""The request path's pipelined Redis connection (gateway/state/resp.py), against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.state.resp import PipelinedRedis, Script, encode
from tests.conftest import FakeClock
from tests.servers import RedisServer


@pytest.fixture
async def fast(redis_url: str) -> AsyncIterator[PipelinedRedis]:
    client = PipelinedRedis(redis_url)
    yield client
    await client.aclose()


def test_commands_are_encoded_as_resp_arrays_of_bulk_strings() -> None:
    assert encode(["SET", b"k\r\n", 7, 1.5]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n$3\r\n1.5\r\n"
    )
    assert encode(["GET", "é"]) == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    fast: PipelinedRedis,
) -> None:
    replies = await asyncio.gather(*(fast.execute("INCR", "counter") for _ in range(500)))
    assert replies == list(range(1, 501))  # sent in order, answered in order, none swapped
    values = await asyncio.gather(
        *(fast.execute("SET", f"k{i}", f"v{i}") for i in range(100)),
        *(fast.execute("GET", f"k{i}") for i in range(100)),
    )
    assert values[100:] == [f"v{i}".encode() for i in range(100)]
    ids = await asyncio.gather(*(fast.execute("CLIENT", "ID") for _ in range(200)))
    assert len(set(ids)) == 1  # one connection, not one per concurrent call


async def test_an_error_reply_fails_only_its_own_call(fast: PipelinedRedis) -> None:
    await fast.execute("SET", "text", "abc")
    results = await asyncio.gather(
        fast.execute("INCR", "text"), fast.execute("GET", "text"), return_exceptions=True
    )
    assert isinstance(results[0], ResponseError)
    assert results[1] == b"abc"


async def test_scripts_run_by_sha_and_are_loaded_again_after_a_script_flush(
    fast: PipelinedRedis,
) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await fast.run_script(script, ["n"], [2]) == 2
    await fast.execute("SCRIPT", "FLUSH")
    assert await fast.run_script(script, ["n"], [3]) == 5  # NOSCRIPT → EVAL, transparently
    assert await fast.execute("SCRIPT", "EXISTS", script.sha) == [1]


async def test_a_reply_that_arrives_after_its_caller_gave_up_is_not_given_to_the_next_call(
    fast: PipelinedRedis,
) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await fast.execute("BLPOP", "empty-list", "0.3")  # answers nil after 0.3 s
    await fast.execute("SET", "after", "mine")
    assert await fast.execute("GET", "after") == b"mine"


async def test_a_restarted_server_is_reconnected_on_the_next_call(
    own_redis: RedisServer,
) -> None:
    client = PipelinedRedis(own_redis.url)
    assert await client.execute("PING") == b"PONG"
    own_redis.stop()
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")
    own_redis.start()
    assert await client.execute("PING") == b"PONG"
    await client.aclose()


async def test_a_dead_server_fails_fast_with_a_connection_error(own_redis: RedisServer) -> None:
    url = own_redis.url
    own_redis.stop()
    client = PipelinedRedis(url, connect_timeout=1.0)
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")


async def test_a_hung_server_is_dropped_once_its_oldest_call_is_stale(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    client = PipelinedRedis(own_redis.url, stale_after=1.0, clock=clock)
    first_connection = await client.execute("CLIENT", "ID")
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)  # connection open, no answers
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.execute("SET", "lost", "1")
        clock.advance(0.5)
        with pytest.raises(TimeoutError):  # not stale yet: queued on the same connection
            async with asyncio.timeout(0.1):
                await client.execute("PING")
        clock.advance(0.6)  # the oldest unanswered call is now 1.1 s old
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert await client.execute("SET", "fresh", "2") == b"OK"
        assert await client.execute("CLIENT", "ID") != first_connection  # a new connection
        assert await client.execute("GET", "fresh") == b"2"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        await client.aclose()


@pytest.fixture
def password_redis() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret-pass").start()
    yield server
    server.close()


async def test_password_and_database_come_from_the_url(password_redis: RedisServer) -> None:
    url = password_redis.url.rsplit("/", 1)[0] + "/3"
    client = PipelinedRedis(url)
    await client.execute("SET", "where", "db3")
    await client.aclose()
    sync = redis.Redis.from_url(url)
    assert sync.get("where") == b"db3"
    assert sync.dbsize() == 1
    sync.select(0)
    assert sync.get("where") is None
    sync.close()


async def test_a_wrong_password_is_a_clear_error(password_redis: RedisServer) -> None:
    url = password_redis.url.replace("s3cret-pass", "wrong")
    client = PipelinedRedis(url)
    with pytest.raises(ResponseError, match=r"WRONGPASS|invalid password"):
        await client.execute("PING")


async def test_garbage_instead_of_resp_fails_the_call_and_the_next_one_reconnects() -> None:
    connections = 0
    first_closed = asyncio.Event()

    async def speaks_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await reader.read(100)
        writer.write(b"?not resp\r\n" if first else b"+PONG\r\n")
        await writer.drain()
        while await reader.read(100):  # until the client closes its end
            pass
        if first:
            first_closed.set()
        writer.close()

    server = await asyncio.start_server(speaks_garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(RedisConnectionError, match="protocol error"):
        await client.execute("PING")
    assert await client.execute("PING") == b"PONG"  # a new connection, not the broken one
    assert connections == 2
    await asyncio.wait_for(first_closed.wait(), 2)  # the broken connection was closed
    await client.aclose()
    server.close()
