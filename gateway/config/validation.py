"""Validation shared by the models, the admin, the API and the env overrides."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

# ``\Z``, not ``$``: ``$`` also matches before a trailing newline ("chat\n").
MODULE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}\Z")
INTENT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}\Z")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
TIMEOUT_MIN, TIMEOUT_MAX = 0.1, 600.0
#: Streaming routes (SPEC §20): the silence between two chunks, the whole stream.
IDLE_TIMEOUT_MIN, IDLE_TIMEOUT_MAX = 0.1, 3600.0
MAX_DURATION_MIN, MAX_DURATION_MAX = 1.0, 86400.0
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
#: Printable ASCII (SPEC §4): an endpoint is written upstream byte for byte, as latin-1.
_PRINTABLE_ASCII_RE = re.compile(r"[!-~]*\Z")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def validate_module_url(value: str) -> str:
    """``http(s)://host[:port]`` and nothing else: no path, query, credentials or tricks."""
    raw = value
    if not raw or any(ord(c) < 33 or c in "\\" for c in raw):
        raise ValidationError(f"Module URL {value!r} must be http(s)://host[:port] without spaces.")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"Module URL {value!r} must start with http:// or https://.")
    if parts.username or parts.password or "@" in parts.netloc:
        raise ValidationError(f"Module URL {value!r} must not contain credentials.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValidationError(
            f"Module URL {value!r} must be http(s)://host[:port] with no path, query or fragment."
        )
    host = parts.hostname or ""
    if not host or not (_HOST_RE.match(host) or _is_ip(host)):
        raise ValidationError(f"Module URL {value!r} has no valid host.")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"Module URL {value!r} has an invalid port.") from exc
    if port is not None and not 0 < port < 65536:
        raise ValidationError(f"Module URL {value!r} has an invalid port.")
    return f"{parts.scheme}://{parts.netloc}"


def validate_endpoint(value: str) -> str:
    """A path on the module: printable ASCII only (other characters percent-encoded)."""
    if not _PRINTABLE_ASCII_RE.match(value):
        raise ValidationError(
            "Endpoint must be printable ASCII with no spaces or control characters; "
            "percent-encode other characters (e.g. '☃' as %E2%98%83)."
        )
    if not value.startswith("/") or value.startswith("//"):
        raise ValidationError("Endpoint must start with a single '/' (a path on the module).")
    if "://" in value or any(ord(c) < 33 or c in "\\#" for c in value):
        raise ValidationError("Endpoint must be a plain path: no scheme, host, spaces or '#'.")
    segments = value.split("?", 1)[0].split("/")
    if ".." in segments or "." in segments or "%2e" in value.lower() or "%2f" in value.lower():
        raise ValidationError("Endpoint must not contain '.' or '..' segments or encoded slashes.")
    return value


def validate_method(value: str) -> str:
    method = value.upper()
    if method not in METHODS:
        raise ValidationError(f"Method must be one of {', '.join(METHODS)}.")
    return method


def validate_timeout(value: float) -> float:
    if not TIMEOUT_MIN <= float(value) <= TIMEOUT_MAX:
        raise ValidationError(f"Timeout must be between {TIMEOUT_MIN} and {TIMEOUT_MAX:g} seconds.")
    return float(value)


def stream_bound_errors(idle_timeout: float | None, max_duration: float | None) -> dict[str, str]:
    """``{field: message}`` for a streaming route's ``idle_timeout`` / ``max_duration``
    outside their ranges (``None``: inherited, fine)."""
    errors: dict[str, str] = {}
    if idle_timeout is not None and not IDLE_TIMEOUT_MIN <= idle_timeout <= IDLE_TIMEOUT_MAX:
        errors["idle_timeout"] = (
            f"Idle timeout must be between {IDLE_TIMEOUT_MIN} and {IDLE_TIMEOUT_MAX:g} s."
        )
    if max_duration is not None and not MAX_DURATION_MIN <= max_duration <= MAX_DURATION_MAX:
        errors["max_duration"] = (
            f"Max duration must be between {MAX_DURATION_MIN:g} and {MAX_DURATION_MAX:g} s."
        )
    return errors


def validate_module_name(value: str) -> str:
    if not MODULE_NAME_RE.match(value):
        raise ValidationError(
            "Module name: lowercase letters, digits, '-' or '_', starting with a letter."
        )
    return value


def validate_intent(value: str) -> str:
    if not INTENT_RE.match(value):
        raise ValidationError(
            "Intent: lowercase letters, digits, '-' or '_', starting with a letter (max 40)."
        )
    return value


# Model-field validators (Django validators return None; the functions above return the
# normalised value for the API and env code).


def module_url_validator(value: str) -> None:
    validate_module_url(value)


def endpoint_validator(value: str) -> None:
    validate_endpoint(value)


def module_name_validator(value: str) -> None:
    validate_module_name(value)


def intent_validator(value: str) -> None:
    validate_intent(value)
