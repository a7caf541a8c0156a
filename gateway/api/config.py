"""``GET|PUT /vx11/config``: the whole managed configuration as one document (SPEC §21).

JSON by default; YAML with ``Accept: application/yaml`` (GET) or ``Content-Type:
application/yaml`` (PUT). ``PUT`` replaces the listed sections (rows they do not name are
removed, as decK ``sync`` does; ``?prune=false`` keeps them) in one transaction and one
version bump; ``?dry_run=true`` only lists the changes. Admin only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway.api.parsers import JSONParser, read_limited
from gateway.api.permissions import IsAdminClient
from gateway.core.problems import InvalidRequest
from gateway.operations.config_apply import import_document
from gateway.operations.config_doc import DocumentError, build_document, dump, parse


class YAMLParser(BaseParser):
    """A YAML body (``yaml.safe_load``), with the JSON parser's size limit."""

    media_type = "application/yaml"

    def parse(
        self,
        stream: IO[Any] | None,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        raw = read_limited(stream)
        try:
            return parse(raw)
        except DocumentError as exc:
            raise _invalid(exc) from exc


class XYAMLParser(YAMLParser):
    media_type = "application/x-yaml"


class YAMLRenderer(BaseRenderer):
    """``yaml.safe_dump`` of the answer (``Accept: application/yaml``)."""

    media_type = "application/yaml"
    format = "yaml"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        return b"" if data is None else dump(data, "yaml").encode()


def _invalid(exc: DocumentError) -> InvalidRequest:
    return InvalidRequest(
        f"The configuration document has {len(exc.errors)} error(s); nothing was changed.",
        errors=exc.errors,
    )


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise InvalidRequest(f"Query parameter {name} must be true or false.")


class ChangeSerializer(serializers.Serializer[Any]):
    action = serializers.ChoiceField(choices=["added", "changed", "removed"])
    section = serializers.ChoiceField(choices=["modules", "routes", "clients"])
    name = serializers.CharField()
    fields = serializers.ListField(child=serializers.CharField())  # type: ignore[assignment]


class ImportResultSerializer(serializers.Serializer[Any]):
    changes = ChangeSerializer(many=True)
    applied = serializers.BooleanField()
    dry_run = serializers.BooleanField()
    version = serializers.IntegerField()
    tokens = serializers.DictField(
        child=serializers.CharField(), help_text="Tokens of created clients (shown once)."
    )


_DOCUMENT = OpenApiResponse(OpenApiTypes.OBJECT, description="modules, routes, clients")


class ConfigView(APIView):
    permission_classes = [IsAdminClient]
    parser_classes = [JSONParser, YAMLParser, XYAMLParser]
    renderer_classes = [JSONRenderer, YAMLRenderer]

    def perform_content_negotiation(
        self, request: Request, force: bool = False
    ) -> tuple[BaseRenderer, str]:
        # DRF answers an unknown ``?format=`` with a bare 404; it is a bad parameter (400).
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            raise InvalidRequest("Query parameter format must be json or yaml.") from None

    @extend_schema(
        operation_id="vx11_config_export",
        responses={(200, "application/json"): _DOCUMENT, (200, "application/yaml"): _DOCUMENT},
        summary="The managed configuration as one document (admin)",
    )
    def get(self, request: Request) -> Response:
        return Response(build_document())

    @extend_schema(
        operation_id="vx11_config_import",
        request={"application/json": OpenApiTypes.OBJECT, "application/yaml": OpenApiTypes.OBJECT},
        parameters=[
            OpenApiParameter("dry_run", bool, description="List the changes, write nothing"),
            OpenApiParameter("prune", bool, description="Remove unnamed rows (default true)"),
        ],
        responses={200: ImportResultSerializer},
        summary="Replace the configuration: validate all, then one transaction (admin)",
    )
    def put(self, request: Request) -> Response:
        dry_run = _flag(request, "dry_run", False)
        prune = _flag(request, "prune", True)
        doc = request.data
        if not isinstance(doc, dict):
            raise _invalid(
                DocumentError(
                    [f"document: must be a mapping of sections, not {type(doc).__name__}"]
                )
            )
        try:
            outcome = import_document(dict(doc), prune=prune, dry_run=dry_run)
        except DocumentError as exc:
            raise _invalid(exc) from exc
        return Response(
            {
                "changes": [c.as_dict() for c in outcome.changes],
                "applied": outcome.applied,
                "dry_run": dry_run,
                "version": outcome.version,
                "tokens": outcome.tokens,
            }
        )
