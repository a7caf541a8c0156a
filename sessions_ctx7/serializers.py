"""Output shapes of the Context-7 API (also the OpenAPI schema)."""

from __future__ import annotations

from rest_framework import serializers

from sessions_ctx7.models import Message, Session
from sessions_ctx7.services import summary_of


class SessionSerializer(serializers.ModelSerializer[Session]):
    class Meta:
        model = Session
        fields = [
            "session_id",
            "client",
            "created_at",
            "last_activity",
            "expires_at",
            "message_count",
            "topic",
        ]
        read_only_fields = fields


class MessageSerializer(serializers.ModelSerializer[Message]):
    timestamp = serializers.DateTimeField(source="created_at", read_only=True)

    class Meta:
        model = Message
        fields = ["role", "content", "metadata", "timestamp"]
        read_only_fields = fields


class SessionDetailSerializer(SessionSerializer):
    summary = serializers.SerializerMethodField()
    messages = MessageSerializer(many=True, read_only=True)  # Meta.ordering: by seq

    class Meta(SessionSerializer.Meta):
        fields = [*SessionSerializer.Meta.fields, "summary", "messages"]
        read_only_fields = fields

    def get_summary(self, obj: Session) -> str:
        return summary_of(obj.recent)


class SessionPageSerializer(serializers.Serializer[object]):
    total = serializers.IntegerField()
    limit = serializers.IntegerField()
    offset = serializers.IntegerField()
    sessions = SessionSerializer(many=True)


class CleanupSerializer(serializers.Serializer[object]):
    deleted = serializers.IntegerField(help_text="Expired sessions removed.")
