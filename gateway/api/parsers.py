"""The management API's JSON parser: orjson, with its fixed nesting limit.

DRF's own parser uses ``json.load``, whose behaviour on deeply nested input
depends on the Python version (a ``RecursionError`` on 3.12, accepted on 3.13).
orjson refuses more than 1024 levels everywhere, refuses invalid UTF-8, and is
faster; every refusal is a 400 ``invalid_request``. Bodies over Django's
``DATA_UPLOAD_MAX_MEMORY_SIZE`` are a 413, as for Django's own parsers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser


def read_limited(stream: IO[Any] | None) -> bytes:
    """The body, refused past Django's own limit (2.5 MB by default: 413 payload_too_large)."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    raw: bytes = stream.read(limit + 1 if limit is not None else -1) if stream is not None else b""
    if limit is not None and len(raw) > limit:
        raise RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE.")
    return raw


class JSONParser(BaseParser):
    media_type = "application/json"

    def parse(
        self,
        stream: IO[Any] | None,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        raw = read_limited(stream)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"The body is malformed JSON: {exc}.") from exc
