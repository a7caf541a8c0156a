"""Reading Context-7 sessions for the API and the admin: what a caller may see."""

from __future__ import annotations

from datetime import datetime

from django.db.models import QuerySet

from gateway.core.problems import Forbidden, NotFound
from sessions_ctx7.models import Message, Session
from sessions_ctx7.services import SESSION_ID_RE, resolve_now


def visible(
    owner: str | None, *, include_expired: bool = False, now: datetime | None = None
) -> QuerySet[Session]:
    """Sessions a caller may see: its own (``owner``), or all (``owner=None``, admins)."""
    sessions = Session.objects.all()
    if owner is not None:
        sessions = sessions.filter(client=owner)
    if not include_expired:
        sessions = sessions.filter(expires_at__gt=resolve_now(now))
    return sessions.order_by("-last_activity", "-pk")


def get_for(
    owner: str,
    is_admin: bool,
    session_id: str,
    *,
    include_expired: bool = False,
    now: datetime | None = None,
) -> Session:
    """One session for the API: 404 unknown (or expired), 403 someone else's (non-admin)."""
    session = None
    if SESSION_ID_RE.match(session_id):
        session = Session.objects.filter(session_id=session_id).first()
    if session is None or (not include_expired and session.is_expired(resolve_now(now))):
        raise NotFound(f"No Context-7 session {session_id[:128]!r}.")
    if session.client != owner and not is_admin:
        raise Forbidden("This session belongs to another client.")
    return session


def messages_of(session: Session) -> QuerySet[Message]:
    return session.messages.order_by("seq")
