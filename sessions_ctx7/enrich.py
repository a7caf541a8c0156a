"""The Context-7 hook of the proxy pipeline, for routes with ``context7`` on.

    body ─► begin(owner, body, X-VX11-Session) ─► Turn(session_id, enriched body)
         ─► upstream ─► finish(turn, status, content type, answer) ─► answer (+ session_id)

``begin`` parses the client's JSON object, picks the session id, records the
user's message and returns the body to send upstream: the client's object plus
``session_id`` and ``metadata.context_summary`` / ``metadata.topic``.
``finish`` records the assistant's reply of a 2xx JSON answer and adds
``session_id`` to the answer when it has none. The database work runs in the
process's Context-7 writer (:mod:`sessions_ctx7.writer`: one thread, many turns per
commit; three statements per call, see :mod:`sessions_ctx7.services`).
Whether Context-7 is on (``VX11_CONTEXT7_ENABLED``, the route's ``context7``)
is the pipeline's decision: it does not call this module at all when off.
"""

from __future__ import annotations

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
from sessions_ctx7 import services
from sessions_ctx7.writer import writer

log = logging.getLogger("sessions_ctx7")
MESSAGE_FIELDS = ("message", "prompt")
REPLY_FIELDS = ("response", "message")
NUL = "\x00"  # PostgreSQL text and jsonb cannot hold it (DataError); SQLite can
REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class Turn:
    session_id: str
    body: bytes  # the enriched JSON body to send upstream
    session_pk: int
    generation: datetime  # the session's created_at when the turn began
    topic: str
    summary: str
    created: bool  # the id was unknown and a session was created for it
    restarted: bool  # the id named an expired session, which started over


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
    owner: str, body: bytes, header_session: str | None, *, now: datetime | None = None
) -> Turn:
    """Record the user's turn and build the body to send upstream.

    Raises InvalidRequest (400) for a body that is not a JSON object or a bad
    session id, Forbidden (403) for a live session owned by someone else.
    """
    data = parse_object(body)
    session_id = pick_session_id(data, header_session)
    content = _first_text(data, MESSAGE_FIELDS)
    if content is not None and NUL in content:
        # Refused rather than altered: what the module receives and what the history
        # holds stay identical, and the answer is the same on SQLite and PostgreSQL.
        raise InvalidRequest("The message must not contain NUL characters (\\u0000).")
    meta = {"correlation_id": correlation.current.get()}
    opened = await writer.run(
        functools.partial(services.open_turn, owner, session_id, content, now=now, metadata=meta),
        key=session_id,
    )
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
    )


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
    untouched and store nothing. A database failure here is logged, not raised:
    the client still gets the answer the module produced.
    """
    if not 200 <= status < 300 or not _is_json(content_type):
        return body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(data, dict):
        return body
    reply = _first_text(data, REPLY_FIELDS)
    if reply is not None:
        if NUL in reply:  # the client gets the module's answer unchanged; the history a
            reply = reply.replace(NUL, REPLACEMENT)  # storable copy, on every database
        meta = {"correlation_id": correlation.current.get(), "status": status}
        try:
            await writer.run(
                functools.partial(
                    services.append,
                    turn.session_pk,
                    "assistant",
                    reply,
                    generation=turn.generation,
                    now=now,
                    metadata=meta,
                ),
                key=turn.session_id,
            )
        except DatabaseError:
            log.warning(
                "context7: the assistant reply was not stored",
                extra={"session_id": turn.session_id},
                exc_info=True,
            )
    if "session_id" in data:
        return body
    data["session_id"] = turn.session_id
    return orjson.dumps(data)
