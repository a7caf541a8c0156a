"""The Context-7 hook of the proxy pipeline, for routes with ``context7`` on.

    body ─► begin(owner, body, X-VX11-Session) ─► Turn(session_id, enriched body)
         ─► upstream ─► finish(turn, status, content type, answer) ─► answer (+ session_id)

``begin`` parses the client's JSON object, picks the session id, opens the turn and
returns the body to send upstream: the client's object plus ``session_id`` and
``metadata.context_summary`` / ``metadata.topic``. ``finish`` records the assistant's
reply of a 2xx JSON answer and adds ``session_id`` to the answer when it has none;
``settle`` closes a turn the module never answered.

Where the database work runs: a warm session on SQLite is checked and written on the event
loop (:mod:`sessions_ctx7.onloop`; its user message is written with the reply, by
``finish`` or ``settle``); everything else in the process's Context-7 writer thread
(:mod:`sessions_ctx7.writer`: many turns per commit; the user's message in ``begin``).
Whether Context-7 is on (``VX11_CONTEXT7_ENABLED``, the route's ``context7``)
is the pipeline's decision: it does not call this module at all when off.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

import orjson
from django.db import DatabaseError

from gateway.core import correlation
from gateway.core.problems import InvalidRequest
from sessions_ctx7 import onloop, services, turns
from sessions_ctx7.warm import Push
from sessions_ctx7.writer import writer

log = logging.getLogger("sessions_ctx7")
MESSAGE_FIELDS = ("message", "prompt")
REPLY_FIELDS = ("response", "message")
NUL = "\x00"  # PostgreSQL text and jsonb cannot hold it (DataError); SQLite can
REPLACEMENT = "\ufffd"


# Not frozen (made per request; docs/PERFORMANCE.md "fourth pass"), never changed.
@dataclass(slots=True)
class Turn:
    session_id: str
    body: bytes  # the enriched JSON body to send upstream
    session_pk: int
    generation: datetime  # the session's created_at when the turn began
    topic: str
    summary: str
    created: bool  # the id was unknown and a session was created for it
    restarted: bool  # the id named an expired session, which started over
    #: Begun without the writer (a warm session, :mod:`sessions_ctx7.turns`): the user's
    #: message is written with the reply by :func:`finish`, or alone by :func:`settle`.
    pending: turns.Pending | None = None


def parse_object(body: bytes) -> dict[str, Any]:
    """The client's body as a JSON object (an empty body is ``{}``)."""
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also raised past orjson's nesting limit
        raise InvalidRequest(f"The body is malformed JSON: {exc.msg}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return data


def pick_session_id(data: dict[str, Any], header: str | None) -> str:
    """Body ``session_id`` first, then the header; absent → a new random id."""
    value: Any = data.get("session_id")
    if value is None:
        value = header
    if value is None:
        return uuid4().hex
    if not isinstance(value, str) or not services.SESSION_ID_RE.match(value):
        raise InvalidRequest("session_id must be 1-128 characters of [A-Za-z0-9._:-].")
    return value


def as_text(value: Any) -> str | None:
    """A message field as stored text: strings as they are, other JSON dumped, null absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    return orjson.dumps(value).decode()


def _first_text(data: dict[str, Any], fields: tuple[str, ...]) -> str | None:
    for name in fields:
        text = as_text(data.get(name))
        if text is not None:
            return text
    return None


async def begin(
    owner: str,
    body: bytes,
    header_session: str | None,
    *,
    now: datetime | None = None,
    budget: float = 300.0,
) -> Turn:
    """Record the user's turn and build the body to send upstream.

    Raises InvalidRequest (400) for a body that is not a JSON object or a bad
    session id, Forbidden (403) for a live session owned by someone else.
    ``budget``: the seconds until the turn's answer is due (the route's deadline); a warm
    session is begun without the writer only while it outlives them
    (:func:`sessions_ctx7.onloop.begin_warm`).
    """
    data = parse_object(body)
    session_id = pick_session_id(data, header_session)
    content = _first_text(data, MESSAGE_FIELDS)
    if content is not None and NUL in content:
        # Refused rather than altered: what the module receives and what the history
        # holds stay identical, and the answer is the same on SQLite and PostgreSQL.
        raise InvalidRequest("The message must not contain NUL characters (\\u0000).")
    opened, pending = await _open(owner, session_id, content, now, budget)
    client_meta = data.get("metadata")
    if isinstance(client_meta, dict):
        metadata = dict(client_meta)
    elif client_meta is None:
        metadata = {}
    else:  # keep a non-object value the client sent rather than drop it
        metadata = {"client_metadata": client_meta}
    metadata["context_summary"] = opened.summary
    metadata["topic"] = opened.topic
    enriched = {**data, "session_id": session_id, "metadata": metadata}
    return Turn(
        session_id,
        orjson.dumps(enriched),
        opened.pk,
        opened.generation,
        opened.topic,
        opened.summary,
        opened.created,
        opened.restarted,
        pending,
    )


async def _open(
    owner: str, session_id: str, content: str | None, now: datetime | None, budget: float
) -> tuple[services.Opened, turns.Pending | None]:
    """The turn opened on the loop (a warm session, SQLite), else by the writer thread."""
    meta = {"correlation_id": correlation.current.get()}
    if onloop.available():  # the row can be checked from here: no writer job before the call
        began = services.resolve_now(now)
        warm = onloop.begin_warm(owner, session_id, content, began, meta, budget)
        if warm is not None:
            return warm
    job = functools.partial(services.open_turn, owner, session_id, content, now=now, metadata=meta)
    return await writer.run(job, key=session_id), None


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def finish(
    turn: Turn, status: int, content_type: str | None, body: bytes, *, now: datetime | None = None
) -> bytes:
    """Record the assistant's reply of a 2xx JSON object answer; return the answer to send.

    Error answers (non-2xx) and non-JSON or non-object bodies are returned
    untouched and store no reply. A database failure storing the reply of a turn whose
    user message is already stored is logged, not raised: the client still gets the answer
    the module produced. For a turn begun without the writer (``turn.pending``) the
    failure is raised: its user message would be lost with it.
    """
    data = _answer_object(status, content_type, body)
    reply = _first_text(data, REPLY_FIELDS) if data is not None else None
    if reply is not None and NUL in reply:  # the client gets the module's answer unchanged;
        reply = reply.replace(NUL, REPLACEMENT)  # the history a storable copy, on every database
    meta = {"correlation_id": correlation.current.get(), "status": status}
    if turn.pending is not None:
        at = services.resolve_now(now)
        push = None if reply is None else Push("assistant", reply, meta, at)
        # Not caught: the user's message is in this write too, and an answer whose turn is
        # not stored must not reach the client (the proxy answers 500, as a failed first
        # write did before the module was called).
        await onloop.loop_writer().record(turn.pending, push, at)
    elif reply is not None:
        append = functools.partial(
            services.append,
            turn.session_pk,
            "assistant",
            reply,
            generation=turn.generation,
            now=now,
            metadata=meta,
        )
        await _store(turn, writer.submit(append, key=turn.session_id))
    if data is None or "session_id" in data:
        return body
    data["session_id"] = turn.session_id
    return orjson.dumps(data)


def _answer_object(status: int, content_type: str | None, body: bytes) -> dict[str, Any] | None:
    """The answer as a JSON object, if it is a 2xx JSON object answer."""
    if not 200 <= status < 300 or not _is_json(content_type):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


async def _store(turn: Turn, stored: asyncio.Future[bool]) -> None:
    try:
        await stored
    except DatabaseError:
        log.warning(
            "context7: the assistant reply was not stored",
            extra={"session_id": turn.session_id},
            exc_info=True,
        )


async def settle(turn: Turn) -> None:
    """The module gave no answer (an error, a timeout, the client left): a turn begun
    without the writer records the user's message alone, as a first job would have."""
    if turn.pending is None:
        return
    future = onloop.loop_writer().record(turn.pending, None, services.resolve_now(None))
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:  # cancelled again: the writer stores it all the same
        future.add_done_callback(_logged)
        raise
    except DatabaseError:
        log.warning(
            "context7: the user's message was not stored",
            extra={"session_id": turn.session_id},
            exc_info=True,
        )


def _logged(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("context7: the user's message was not stored", exc_info=future.exception())
