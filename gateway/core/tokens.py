"""The one hash of a bearer token (API clients' stored hashes, the edge's lookups)."""

from __future__ import annotations

import hashlib


def hash_token(token: str) -> str:
    """SHA-256 hex of the token's UTF-8 bytes.

    Tokens are 256-bit random strings, so one SHA-256 is enough (no slow KDF needed).
    ``surrogateescape`` maps a header byte that was not UTF-8 (decoded with that error
    handler) back to itself instead of raising; for every valid string it is plain UTF-8.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
