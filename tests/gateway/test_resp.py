"""The request path's pipelined Redis connection (gateway/state/resp.py), against real servers."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.state.redis_url import UnsupportedRedisURL, check_url
from gateway.state.resp import PipelinedRedis, Script, encode
from tests.conftest import FakeClock
from tests.servers import RedisServer, free_port, wait_for_port


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


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[str, rsa.RSAPrivateKey] | None = None,
    *,
    ca: bool,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return builder.add_extension(usage, critical=True).sign(issuer_key, hashes.SHA256())
    # Named for localhost only: connecting to 127.0.0.1 is a host-name mismatch.
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
    ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    folder = tmp_path_factory.mktemp("redis-tls")
    ca_key, other_key, server_key = _key(), _key(), _key()
    ca = _cert("vx11 test CA", ca_key, ca=True)
    server = _cert("localhost", server_key, ("vx11 test CA", ca_key), ca=False)
    key = folder / "server.key"
    key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return TlsFiles(
        ca=_pem(folder / "ca.pem", ca),
        cert=_pem(folder / "server.pem", server),
        key=key,
        other_ca=_pem(folder / "other-ca.pem", _cert("someone else", other_key, ca=True)),
    )


@pytest.fixture(scope="module")
def tls_port(tls_files: TlsFiles) -> Iterator[int]:
    """A redis-server speaking only TLS, with a certificate from a private CA."""
    port = free_port()
    folder = tls_files.ca.parent
    proc = subprocess.Popen(
        [
            "redis-server",
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(tls_files.cert), "--tls-key-file", str(tls_files.key)),
            *("--tls-ca-cert-file", str(tls_files.ca), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            *("--protected-mode", "no", "--loglevel", "warning"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def _ping(url: str) -> object:
    client = PipelinedRedis(url, connect_timeout=5.0)
    try:
        return await client.run_script(Script("return redis.call('PING')"), [], [])
    finally:
        await client.aclose()


async def test_a_private_ca_given_in_the_url_is_trusted(tls_port: int, tls_files: TlsFiles) -> None:
    url = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={tls_files.ca}"
    assert await _ping(url) == b"PONG"
    check_url(url)  # the system check accepts it too


async def test_cert_reqs_none_accepts_an_untrusted_certificate(tls_port: int) -> None:
    assert await _ping(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none") == b"PONG"


async def test_the_host_name_is_checked_unless_the_url_says_otherwise(
    tls_port: int, tls_files: TlsFiles
) -> None:
    # The certificate names localhost only.
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={tls_files.ca}"
    with pytest.raises(RedisConnectionError, match=r"IP address mismatch|hostname"):
        await _ping(url)
    assert await _ping(url + "&ssl_check_hostname=false") == b"PONG"


async def test_a_wrong_ca_fails_instead_of_trusting_anything(
    tls_port: int, tls_files: TlsFiles
) -> None:
    with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await _ping(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={tls_files.other_ca}")
    with pytest.raises(RedisConnectionError):  # no CA given: the system store, no trust either
        await _ping(f"rediss://localhost:{tls_port}/0")


async def test_tls_is_chosen_by_the_scheme(tls_port: int) -> None:
    with pytest.raises(RedisConnectionError):  # plain RESP to a TLS port: no answer it can use
        await _ping(f"redis://127.0.0.1:{tls_port}/0")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://localhost:6379/0?ssl_ca_certs=/etc/ca.pem", "rediss://"),
        ("rediss://localhost:6379/0?ssl_cert_reqs=maybe", "Certificate Requirements"),
        ("rediss://localhost:6379/0?ssl_ocsp_context=x", "ssl_ocsp_context"),
        ("redis://localhost:6379/0?ssl=true", "rediss://"),
        ("redis://localhost:6379/0?frobnicate=1", "frobnicate"),
    ],
)
def test_options_the_connection_cannot_honour_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(UnsupportedRedisURL, match=complaint):
        check_url(url)
    with pytest.raises(UnsupportedRedisURL):
        PipelinedRedis(url)


def test_a_missing_ca_file_is_reported_by_the_check(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedRedisURL, match="cannot set up TLS"):
        check_url(f"rediss://localhost:6380/0?ssl_ca_certs={tmp_path / 'absent.pem'}")
    check_url("redis://localhost:6379/0?socket_timeout=1&max_connections=5")  # pool tuning: fine
    # How redis-py's own clients decode answers: nothing the pipelined connection uses.
    check_url("redis://localhost:6379/0?decode_responses=true&protocol=3")
