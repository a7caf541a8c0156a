"""Context-7 sessions: a conversation context the gateway keeps for chat-like intents.

Modelled after ``django.contrib.sessions``: the expiry is a stored, indexed
column (``expires_at``) so that "is it alive?" is one comparison and the purge
is one indexed range scan. The rules that compute it live in
:mod:`sessions_ctx7.services`.

Messages are numbered per session (``seq``, contiguous, unique per session).
At most ``VX11_CONTEXT7_MAX_MESSAGES`` rows are kept: once a session is full,
the oldest row is recycled for the newest message, so appending never leaves
more rows than the cap even for a moment.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import models

TOPICS = ["code", "audio", "browser", "system", "chat", "general"]
ROLES = ["user", "assistant", "system"]


def _empty_list() -> list[Any]:
    return []


def _empty_dict() -> dict[str, Any]:
    return {}


class Session(models.Model):
    session_id = models.CharField(max_length=128, unique=True)
    client = models.CharField(
        max_length=100,
        db_index=True,
        help_text="Owner key: client:<id>, op:<hash>, user:<id>, anonymous.",
    )
    created_at = models.DateTimeField(help_text="Start of this conversation (reset on restart).")
    last_activity = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)
    topic = models.CharField(max_length=16, choices=[(t, t) for t in TOPICS], default="general")
    message_count = models.PositiveIntegerField(default=0)
    seq = models.PositiveBigIntegerField(default=0, help_text="Number of the newest message.")
    recent = models.JSONField(
        default=_empty_list, blank=True, help_text="[role, first 100 chars] of the last 3 messages."
    )

    class Meta:
        ordering = ["-last_activity"]
        indexes = [models.Index(fields=["client", "-last_activity"], name="ctx7_client_activity")]
        verbose_name = "Context-7 session"

    def __str__(self) -> str:
        return self.session_id

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at <= now


class Message(models.Model):
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField()
    role = models.CharField(max_length=16, choices=[(r, r) for r in ROLES])
    content = models.TextField(blank=True)
    metadata = models.JSONField(default=_empty_dict, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["session", "seq"]
        constraints = [models.UniqueConstraint(fields=["session", "seq"], name="ctx7_message_seq")]
        verbose_name = "Context-7 message"

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"
