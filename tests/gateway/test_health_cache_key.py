"""The health cache's key ignores the query string (issue #12, item 14; SPEC §9)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("path", ["/shub/health", "/shub/ready"])
def test_distinct_query_strings_do_not_bust_the_health_cache(http, upstream, path):
    """40 anonymous callers with 40 distinct query strings: one upstream call, 39 hits."""
    answers = [http.get(f"{path}?n={n}&x=%2e{n}") for n in range(40)]
    assert [a.status_code for a in answers] == [200] * 40
    assert [a.headers["x-cache"] for a in answers] == ["MISS"] + ["HIT"] * 39
    upstream_path = path.removeprefix("/shub")
    assert len([s for s in upstream.seen if s.path == upstream_path]) == 1


def test_the_first_callers_query_does_not_choose_the_shared_answer(http, upstream):
    """The cached answer is everyone's: the module is asked without the first caller's query
    (``?verbose=1`` would otherwise decide what every caller gets for the TTL)."""
    assert http.get("/shub/health?verbose=1").status_code == 200
    seen = [s for s in upstream.seen if s.path == "/health"]
    assert [s.query for s in seen] == [""]
