"""Correlation ids: validated, kept in a context variable, stamped on every log line."""

from __future__ import annotations

import contextvars
import logging
import random
import re

CORRELATION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TRACEPARENT_RE = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
TRACESTATE_RE = re.compile(r"^[\x20-\x7e]{1,512}$")

current: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")


def pick(*candidates: str | None) -> str:
    """The first candidate that is a valid id, else a new UUID4."""
    for value in candidates:
        if value is not None and CORRELATION_RE.match(value):
            return value
    return new_id()


def new_id() -> str:
    """A random UUID4 string, from Python's PRNG: correlation ids need uniqueness, not
    secrecy, and ``uuid.uuid4()``'s ``os.urandom`` syscall is measurable on the hot path."""
    r = random.getrandbits(128)
    r = (r & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
    r = (r & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    h = f"{r:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def valid_traceparent(value: str | None) -> bool:
    return value is not None and TRACEPARENT_RE.match(value) is not None


def valid_tracestate(value: str | None) -> bool:
    return value is not None and TRACESTATE_RE.match(value) is not None


class CorrelationFilter(logging.Filter):
    """Adds ``correlation_id`` to every record (the JSON formatter prints it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "correlation_id"):
            record.correlation_id = current.get()
        return True
