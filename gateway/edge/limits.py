"""The limits of a request head, shared by the server protocol and the HTTP dispatcher.

A request head (request line and headers) in bytes, and header lines, at most. The server
protocol (``gateway/edge/server.py``) answers 431 past either before buffering more and closes
the connection; the check in ``gateway.startup.HttpDispatcher`` (names and values) is the
second line, for heads the protocol cannot measure exactly (pipelined in one read) and for
servers run without it (the in-process test server runs h11).
"""

from __future__ import annotations

from gateway.core.problems import InvalidRequest

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100


class HeadersTooLarge(InvalidRequest):
    """431; the code stays ``invalid_request`` (SPEC §2 has no code of its own for it)."""

    status, title = 431, "Request header fields too large"

    def __init__(self) -> None:
        super().__init__(
            f"The request head is larger than {MAX_HEADER_BYTES} bytes or has more than "
            f"{MAX_HEADER_COUNT} header fields."
        )


__all__ = ["MAX_HEADER_BYTES", "MAX_HEADER_COUNT", "HeadersTooLarge"]
