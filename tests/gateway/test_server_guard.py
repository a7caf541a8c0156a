"""``gateway/edge/server.py`` relies on uvicorn's httptools protocol internals: pin them.

``GatewayHttpProtocol`` replaces ``data_received`` and ``on_response_complete`` with
copies that differ only in the keep-alive timer, ``on_header`` and ``on_body`` with
copies that drop trailer fields and count body progress, and hooks the parser callbacks
around them. A uvicorn upgrade that changes any of these methods fails here, so the guard is
reviewed (and the digest refreshed) instead of silently going stale. The behaviour
itself is measured on a real process in ``tests/reliability/test_connection_limits.py``.
"""

from __future__ import annotations

import hashlib
import inspect

import httptools
import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.edge.server import GatewayHttpProtocol, Sweeper
from gateway.startup import HTTP_PROTOCOL, server_command

#: The HttpToolsProtocol methods the guard copies, wraps or depends on (uvicorn 0.54.0).
RELIED_ON = (
    "__init__",
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
    "handle_websocket_upgrade",
    "send_400_response",
    "shutdown",
    "_unset_keepalive_if_required",
)
DIGEST = "23df4c1d078e5e1107d67a822cb7234ac6fd0bd6f06a2038e44160dfe0fc2c11"


def test_uvicorn_is_the_version_the_guard_was_written_for():
    assert uvicorn.__version__ == "0.54.0", (
        "uvicorn changed: re-check gateway/edge/server.py against its httptools_impl.py"
    )
    assert httptools.__version__.startswith("0.")


def source_digest(cls: type, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(inspect.getsource(getattr(cls, name)).encode())
    return digest.hexdigest()


def test_the_uvicorn_internals_the_guard_copies_are_unchanged():
    assert source_digest(HttpToolsProtocol, RELIED_ON) == DIGEST, (
        "uvicorn's HttpToolsProtocol changed: port the change into GatewayHttpProtocol "
        "(data_received -> _feed, on_response_complete, on_header and on_body are copies), "
        "then update DIGEST"
    )
    cycle_fields = inspect.signature(RequestResponseCycle.__init__).parameters
    assert "on_response" in cycle_fields and hasattr(HttpToolsProtocol, "_start_asgi_task")


#: The cycle methods ``HeadCork`` stands between and the socket for (uvicorn 0.54.0): they
#: use only ``write``, ``close`` and ``is_closing`` of the transport, set
#: ``response_started`` before they write the head, and write ``100 Continue`` before it.
CYCLE_RELIED_ON = ("send", "receive", "run_asgi", "send_500_response")
CYCLE_DIGEST = "aab84bec4ce6d8c954726b7be153d2c7d3cd3ab8d1a71741ba134eb5d5c9b9d3"


def test_the_response_cycle_the_head_cork_wraps_is_unchanged():
    assert source_digest(RequestResponseCycle, CYCLE_RELIED_ON) == CYCLE_DIGEST, (
        "uvicorn's RequestResponseCycle changed: check that HeadCork (gateway/edge/server.py) "
        "still sees every transport call it makes, then update CYCLE_DIGEST"
    )
    used = set()
    for name in CYCLE_RELIED_ON:
        source = inspect.getsource(getattr(RequestResponseCycle, name))
        used |= {call.split("(")[0] for call in source.split("self.transport.")[1:]}
    assert used <= {"write", "close", "is_closing"}


def test_every_launcher_selects_the_guarded_protocol_by_import_string():
    command = server_command("127.0.0.1", 8000)
    assert command[command.index("--http") + 1] == HTTP_PROTOCOL
    # uvicorn's Config.load resolves --http exactly like this (a name or an import string).
    assert import_from_string(HTTP_PROTOCOLS.get(HTTP_PROTOCOL, HTTP_PROTOCOL)) is (
        GatewayHttpProtocol
    )
    assert "--limit-concurrency" not in command  # it would refuse admitted connections


def test_a_countdown_never_ends_before_its_time():
    """Set just after a tick, a countdown of ``ticks_for(s)`` ends ≥ s and ≤ s + 2 ticks."""

    class Loop:
        def call_later(self, delay: float, callback: object) -> None:
            pass

        def is_closed(self) -> bool:
            return False

    sweeper = Sweeper(Loop(), keep_alive=5.0)  # type: ignore[arg-type]
    for seconds in (0.1, 1.0, 5.0, 10.0, 2.5):
        ticks = sweeper.ticks_for(seconds)
        earliest = (ticks - 1) * sweeper.tick  # set right before a tick: that tick counts
        assert seconds <= earliest + 1e-9
        assert ticks * sweeper.tick <= seconds + 2 * sweeper.tick + 1e-9
