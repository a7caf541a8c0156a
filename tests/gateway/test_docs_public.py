"""The documentation paths are public and offline (SPEC §2, §15; issue #12 item 11)."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

DOCS = ["/openapi.json", "/docs", "/redoc"]
BAD_CREDENTIALS = [
    {"X-VX11-Token": "wrong-token"},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": "Bearer"},  # malformed
    {"Authorization": "Basic Zm9vOmJhcg=="},
    {"X-VX11-Token": "wrong", "Authorization": "Token x y z"},
]


class Links(HTMLParser):
    """Every URL an HTML page makes the browser load or offer (src, href, srcset)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url", "action", "srcset") and value:
                self.urls.append(value)


def links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


def same_origin(base: str, url: str) -> bool:
    absolute = urlsplit(urljoin(base, url))
    return absolute.scheme in ("http", "https") and absolute.netloc == urlsplit(base).netloc


@pytest.mark.parametrize("path", DOCS)
@pytest.mark.parametrize("headers", BAD_CREDENTIALS, ids=lambda h: "+".join(h.values()))
def test_docs_paths_ignore_wrong_and_malformed_credentials(http, path, headers):
    r = http.get(path, headers=headers)
    assert r.status_code == 200, r.text[:300]


def test_the_schema_is_the_whole_schema_whatever_the_caller(http, operator_headers):
    anonymous = http.get("/openapi.json").json()
    wrong = http.get("/openapi.json", headers={"X-VX11-Token": "wrong"}).json()
    operator = http.get("/openapi.json", headers=operator_headers).json()
    assert anonymous == wrong == operator


@pytest.mark.parametrize("path", ["/redoc", "/docs"])
def test_the_pages_and_every_asset_they_reference_are_served_by_the_gateway(http, path):
    page = http.get(path)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    urls = [u for u in links(page.text) if not u.startswith("data:")]  # inline, no request
    assert urls, page.text
    external = [u for u in urls if not same_origin(http.base_url.__str__(), u)]
    assert external == [], external
    assert "fonts.googleapis.com" not in page.text and "fonts.gstatic.com" not in page.text
    for url in urls:
        asset = http.get(url)
        assert asset.status_code == 200, url
        for host in ("cdn.redoc.ly", "fonts.googleapis.com", "unpkg.com", "jsdelivr.net"):
            assert host not in asset.text, f"{url} references {host}"


def test_the_redoc_bundle_is_cached_by_etag(http):
    first = http.get("/redoc/redoc.standalone.js")
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("application/javascript")
    assert "Redoc" in first.text[:200_000]
    again = http.get("/redoc/redoc.standalone.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    refused = http.post("/redoc/redoc.standalone.js")
    assert refused.status_code == 405
    assert refused.headers["content-type"] == "application/problem+json"


# --------------------------------------------------------------------------- the schema


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_every_answer_of_every_operation_is_typed(http):
    """Errors are problem+json (one shared component); successes have a schema."""
    schema = http.get("/openapi.json").json()
    untyped, not_problems = [], []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                where = f"{method.upper()} {path} {code}"
                if code == "204":
                    continue
                content = response.get("content", {})
                if not content or any("schema" not in media for media in content.values()):
                    untyped.append(where)
                if code[0] in "45" and (path, code) != ("/ready", "503"):
                    media = content.get("application/problem+json", {})
                    if media.get("schema") != {"$ref": "#/components/schemas/Problem"}:
                        not_problems.append(where)
    assert untyped == [] and not_problems == [], (untyped, not_problems)


def test_the_route_list_is_documented_as_the_object_it_is(http, operator_headers):
    schema = http.get("/openapi.json").json()
    documented = resolve(
        schema,
        schema["paths"]["/vx11/routes"]["get"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ],
    )
    answer = http.get("/vx11/routes", headers=operator_headers).json()
    assert documented["type"] == "object" and isinstance(answer, dict)
    assert set(documented["required"]) == set(answer) == {"routes", "count"}


def test_management_errors_are_documented_where_they_happen(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"400", "401", "403", "404", "413"} <= set(
        paths["/vx11/routes/{intent}"]["patch"]["responses"]
    )
    assert {"201", "200"} <= set(paths["/vx11/routes/{intent}"]["put"]["responses"])
    assert {"401", "403", "400"} <= set(paths["/vx11/context-7/sessions"]["get"]["responses"])
    assert "404" not in paths["/vx11/routes"]["get"]["responses"]
    assert "401" not in paths["/health"]["get"]["responses"]
