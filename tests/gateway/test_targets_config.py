"""A module's targets as configuration (SPEC §1, §18, §21): env lists, ``Target`` rows,
the snapshot, the API, the admin and the declarative document.

Real rows (SQLite, or PostgreSQL in the PostgreSQL pass: ``db_backend``), the live in-process
gateway for the API, and real gateway processes (``uvicorn``) for "live within a second".
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from gateway.checks import gateway_checks
from gateway.config.modules import (
    TargetInfo,
    build_modules,
    env_lbs,
    env_targets,
    parse_url_list,
    target_key,
)
from gateway.config.snapshot import load_snapshot
from gateway.models import ConfigVersion, Module, Target
from gateway.operations.config_apply import import_document
from gateway.operations.config_doc import DocumentError, build_document, dump, parse
from tests.conftest import OPERATOR_TOKEN
from tests.gateway.test_cross_process import WITHIN, embedded_env, start_gateway, within
from tests.servers import UpstreamServer, free_port

__all__ = ["start_gateway"]  # the fixture, used by name

pytestmark = [pytest.mark.db_backend]

H = {"X-VX11-Token": OPERATOR_TOKEN}
A, B, C = "http://10.0.0.5:8002", "http://10.0.0.6:8002", "https://10.0.0.7"


# --------------------------------------------------------------------------- env lists


def test_an_env_list_is_every_target_in_order_normalised(monkeypatch) -> None:
    monkeypatch.setenv("VX11_MODULE_SWITCH_URL", f"{A}/, {B} ,{C}")
    monkeypatch.setenv("VX11_MODULE_MADRE_URL", "http://[::1]:9000")
    found, errors = env_targets()
    assert errors == []
    assert found["switch"] == (A, B, C)
    switch = build_modules([])["switch"]
    assert switch.url == A and switch.source == "env"
    assert [t.key for t in switch.targets] == ["10.0.0.5:8002", "10.0.0.6:8002", "10.0.0.7:443"]
    assert all(t.weight == 100 and t.enabled and t.id is None for t in switch.targets)
    assert build_modules([])["madre"].targets[0].key == "[::1]:9000"
    hermes = build_modules([])["hermes"]  # code default: one target
    assert hermes.targets == (TargetInfo("http://127.0.0.1:8003"),)
    assert hermes.lb == "least_request"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"{A},ftp://x:1", "item 2 ('ftp://x:1'): Module URL 'ftp://x:1' must start with http"),
        (f"{A},,{B}", "item 2 is empty"),
        (f"{A},{B}/api", "item 2 ('http://10.0.0.6:8002/api'): Module URL"),
        (f"{A},{A}/", "item 2 ('http://10.0.0.5:8002/'): duplicate target 10.0.0.5:8002"),
        ("http://h:80,http://h", "item 2 ('http://h'): duplicate target h:80"),
    ],
)
def test_an_invalid_or_duplicate_item_is_an_error_naming_it(monkeypatch, value, message) -> None:
    monkeypatch.setenv("VX11_MODULE_SWITCH_URL", value)
    found, errors = env_targets()
    assert "switch" not in found  # the whole list is refused: the code default stays
    assert len(errors) == 1 and errors[0].startswith("VX11_MODULE_SWITCH_URL: ")
    assert message in errors[0], errors[0]
    assert build_modules([])["switch"].url == "http://127.0.0.1:8002"
    assert any(m.id == "gateway.E002" and message in m.msg for m in gateway_checks())


def test_the_env_balancing_policy_and_an_invalid_one(monkeypatch) -> None:
    monkeypatch.setenv("VX11_MODULE_SWITCH_LB", "Round_Robin")
    monkeypatch.setenv("VX11_MODULE_MADRE_LB", "random")
    found, errors = env_lbs()
    assert found == {"switch": "round_robin"}
    assert errors == [
        "VX11_MODULE_MADRE_LB: must be one of least_request, round_robin, session, not 'random'."
    ]
    table = build_modules([])
    assert (table["switch"].lb, table["madre"].lb) == ("round_robin", "least_request")
    assert any(m.id == "gateway.E004" for m in gateway_checks())


def test_target_keys() -> None:
    assert target_key("http://Switch.Internal") == "switch.internal:80"
    assert target_key("https://[2001:db8::1]:8443") == "[2001:db8::1]:8443"
    assert parse_url_list("http://a:1") == ("http://a:1",)


# --------------------------------------------------------------------------- rows and snapshot


def add_targets(module: str, *urls: str, **fields: Any) -> list[Target]:
    row, _ = Module.objects.get_or_create(name=module)
    return [Target.objects.create(module=row, url=url, **fields) for url in urls]


def test_rows_replace_the_env_list_and_the_row_url(transactional_db, monkeypatch) -> None:
    monkeypatch.setenv("VX11_MODULE_SWITCH_URL", f"{A},{B}")
    Module.objects.update_or_create(name="switch", defaults={"lb": "session"})
    first, second = add_targets("switch", "http://10.9.0.1:1", "http://10.9.0.2:2")
    first.enabled = False
    first.save()
    switch = load_snapshot(0).modules["switch"]
    assert [(t.url, t.enabled, t.id) for t in switch.targets] == [
        ("http://10.9.0.1:1", False, first.pk),
        ("http://10.9.0.2:2", True, second.pk),
    ]
    assert switch.url == "http://10.9.0.2:2"  # the first enabled one
    assert (switch.source, switch.lb) == ("database", "session")
    Module.objects.filter(name="switch").update(url="http://10.8.0.1:8")  # rows still win
    assert load_snapshot(0).modules["switch"].url == "http://10.9.0.2:2"
    Target.objects.filter(module__name="switch").delete()
    switch = load_snapshot(0).modules["switch"]
    assert [t.url for t in switch.targets] == ["http://10.8.0.1:8"]  # the row's URL again
    Module.objects.filter(name="switch").update(url="")
    assert [t.url for t in load_snapshot(0).modules["switch"].targets] == [A, B]  # the env's


def test_a_target_write_bumps_the_version(transactional_db) -> None:
    Module.objects.get_or_create(name="switch")
    before = ConfigVersion.read()
    (row,) = add_targets("switch", A)
    assert ConfigVersion.read() == before + 1
    row.weight = 5
    row.save()
    assert ConfigVersion.read() == before + 2
    row.delete()
    assert ConfigVersion.read() == before + 3
    add_targets("switch", A)
    Target.objects.filter(module__name="switch").update(weight=7)  # a bulk write too
    assert ConfigVersion.read() == before + 5


def test_the_snapshot_reads_every_target_in_one_query(transactional_db) -> None:
    with CaptureQueriesContext(connection) as none:
        load_snapshot(0)
    add_targets("switch", A, B, C)
    add_targets("madre", A, B)
    add_targets("added", A)
    with CaptureQueriesContext(connection) as many:
        snap = load_snapshot(0)
    assert len(many) == len(none)  # not one per module or per target
    assert [t.url for t in snap.modules["added"].targets] == [A]


def test_the_warm_proxy_path_makes_no_query_with_targets(
    http, upstream, gw_env, monkeypatch, request
) -> None:
    """Through the live gateway, the proxy runs in another thread: count every cursor. The
    env's URL answers nothing, so a 200 is the target rows' doing (both answer: the request
    path spreads a POST, not retried, over the pool)."""
    from django.db.backends import utils

    gw_env.set(VX11_MODULE_SWITCH_URL=f"http://127.0.0.1:{free_port()}")
    replica = UpstreamServer().start()
    request.addfinalizer(replica.stop)
    add_targets("switch", upstream.url, replica.url)
    count = {"n": 0}
    original = utils.CursorWrapper.execute

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(utils.CursorWrapper, "execute", counting)
    assert http.post("/vx11/route/task", json={}, headers=H).status_code == 200
    assert count["n"] > 0  # the cold request loaded the snapshot
    count["n"] = 0
    for _ in range(20):
        assert http.post("/vx11/route/task", json={}, headers=H).status_code == 200
    assert count["n"] == 0


# --------------------------------------------------------------------------- the API


def test_targets_through_the_api(http, make_client) -> None:
    listed = http.get("/vx11/modules/switch/targets", headers=H).json()
    assert listed["count"] == 1 and listed["targets"][0]["id"] is None  # the env's URL
    before = ConfigVersion.read()
    r = http.post("/vx11/modules/switch/targets", json={"url": f"{A}/"}, headers=H)
    assert r.status_code == 201, r.text
    made = r.json()
    config = {k: made[k] for k in ("id", "url", "weight", "enabled", "key")}
    assert config == {"id": made["id"], "url": A, "weight": 100, "enabled": True, "key": A[7:]}
    # ... and its live state (gateway.operations.targets.target_runtime; not probed yet).
    assert made["health"]["status"] == "unknown" and made["ejected_until"] is None
    assert (made["down"], made["ejections"], made["in_flight"]) == (False, 0, 0)
    assert ConfigVersion.read() == before + 1
    r = http.post("/vx11/modules/switch/targets", json={"url": B, "weight": 50}, headers=H)
    second = r.json()["id"]
    r = http.patch(f"/vx11/modules/switch/targets/{second}", json={"enabled": False}, headers=H)
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["weight"] == 50
    listed = http.get("/vx11/modules/switch/targets", headers=H).json()
    assert [(t["url"], t["weight"], t["enabled"]) for t in listed["targets"]] == [
        (A, 100, True),
        (B, 50, False),
    ]
    assert (listed["source"], listed["lb"]) == ("database", "least_request")
    module = http.get("/vx11/modules/switch", headers=H).json()
    assert module["url"] == A and [t["key"] for t in module["targets"]] == [A[7:], B[7:]]
    every = http.get("/vx11/modules", headers=H).json()["modules"]
    assert {m["name"]: len(m["targets"]) for m in every}["switch"] == 2
    assert http.delete(f"/vx11/modules/switch/targets/{second}", headers=H).status_code == 204
    assert [t.url for t in Target.objects.all()] == [A]
    _, token = make_client("reader")
    reader = {"X-VX11-Token": token}
    assert http.get("/vx11/modules/switch/targets", headers=reader).status_code == 200
    for method, path in (("POST", ""), ("PATCH", f"/{made['id']}"), ("DELETE", f"/{made['id']}")):
        r = http.request(
            method, f"/vx11/modules/switch/targets{path}", json={"url": B}, headers=reader
        )
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (method, r.text)
    assert [t.url for t in Target.objects.all()] == [A]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"url": "ftp://x"}, "url", "must start with http"),
        ({"url": "http://x:1/path"}, "url", "no path"),
        ({"url": A, "weight": 0}, "weight", "greater than or equal to 1"),
        ({"url": A, "weight": 1001}, "weight", "less than or equal to 1000"),
        ({"weight": 5}, "url", "required"),
        ({"url": A, "colour": "blue"}, "colour", "Unknown field"),
        ({"url": "http://10.0.0.5:8002/"}, "url", "has a target at 10.0.0.5:8002 already"),
    ],
)
def test_api_validation_errors_are_problems(http, body, field, message) -> None:
    add_targets("switch", A)
    before = ConfigVersion.read()
    r = http.post("/vx11/modules/switch/targets", json=body, headers=H)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["error"] == "invalid_request"
    assert any(message in m for m in r.json()["errors"][field]), r.json()
    assert ConfigVersion.read() == before and Target.objects.count() == 1


def test_patch_validation_and_unknown_modules_or_ids_are_404(http) -> None:
    (row,) = add_targets("switch", A)
    r = http.patch(f"/vx11/modules/switch/targets/{row.pk}", json={"weight": 1001}, headers=H)
    assert r.status_code == 400 and "weight" in r.json()["errors"]
    for path in (
        "/vx11/modules/nosuch/targets",
        "/vx11/modules/NO%00PE/targets",
        f"/vx11/modules/madre/targets/{row.pk}",  # another module's id
        "/vx11/modules/switch/targets/999999",
        "/vx11/modules/switch/targets/abc",
    ):
        for method in ("GET", "POST") if path.endswith("targets") else ("PATCH", "DELETE"):
            r = http.request(method, path, json={"url": B}, headers=H)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"] == "not_found"
    assert Target.objects.get().weight == 100


def test_an_env_only_module_gets_its_row_with_its_first_target(http, gw_env) -> None:
    gw_env.set(VX11_MODULE_BILLING_URL=A)
    r = http.post("/vx11/modules/billing/targets", json={"url": B}, headers=H)
    assert r.status_code == 201, r.text
    assert Module.objects.get(name="billing").url == ""
    assert http.get("/vx11/modules/billing", headers=H).json()["url"] == B


def test_the_target_endpoints_are_in_the_openapi_schema(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"get", "post"} <= set(paths["/vx11/modules/{module}/targets"])
    assert {"patch", "delete"} <= set(paths["/vx11/modules/{module}/targets/{target}"])
    module = http.get("/openapi.json").json()["components"]["schemas"]["Module"]
    assert {"lb", "targets"} <= set(module["properties"])


# --------------------------------------------------------------------------- live in every process


@pytest.mark.reliability
def test_an_api_change_is_live_in_another_gateway_process_within_a_second(
    upstream: UpstreamServer, start_gateway: Any
) -> None:
    """Two gateway processes on one database, the module at ``upstream`` (the env's URL);
    the API of the first gives it a target row at a second server, then removes it: the
    second process follows both within a second."""
    replica = UpstreamServer().start()
    replica.respond("POST", "/switch/task", body={"who": "replica"})
    env = embedded_env(upstream)
    first, second = start_gateway(env), start_gateway(env)
    try:
        with httpx.Client(timeout=5) as client:

            def who(url: str) -> object:
                answer = client.post(f"{url}/vx11/route/task", json={}, headers=H)
                return answer.status_code == 200 and answer.json().get("who", "env")

            assert who(second.url) == "env"  # warm: the env's URL
            r = client.post(
                f"{first.url}/vx11/modules/switch/targets", json={"url": replica.url}, headers=H
            )
            assert r.status_code == 201, r.text
            waited = within(lambda: who(second.url) == "replica", "target added → 2nd gateway")
            assert waited < WITHIN, f"added after {waited:.2f} s"
            pk = r.json()["id"]
            r = client.delete(f"{first.url}/vx11/modules/switch/targets/{pk}", headers=H)
            assert r.status_code == 204
            waited = within(lambda: who(second.url) == "env", "target removed → 2nd gateway")
            assert waited < WITHIN, f"removed after {waited:.2f} s"
    finally:
        replica.stop()


# --------------------------------------------------------------------------- admin


def module_form(row: Module, **extra: str) -> dict[str, str]:
    return {
        "name": row.name,
        "url": row.url,
        "health_path": row.health_path,
        "enabled": "on",
        "lb": "",
        "targets-TOTAL_FORMS": "0",
        "targets-INITIAL_FORMS": "0",
        "targets-MIN_NUM_FORMS": "0",
        "targets-MAX_NUM_FORMS": "1000",
        **extra,
    }


def test_the_admin_inline_saves_targets_and_lb(gateway, admin_client) -> None:
    row, _ = Module.objects.get_or_create(name="switch")
    page = admin_client.get(f"/admin/gateway/module/{row.pk}/change/").content.decode()
    assert 'name="lb"' in page and 'name="targets-TOTAL_FORMS"' in page
    before = ConfigVersion.read()
    form = module_form(
        row,
        lb="round_robin",
        **{
            "targets-TOTAL_FORMS": "2",
            "targets-0-url": f"{A}/",
            "targets-0-weight": "100",
            "targets-0-enabled": "on",
            "targets-1-url": B,
            "targets-1-weight": "30",
        },
    )
    r = admin_client.post(f"/admin/gateway/module/{row.pk}/change/", form)
    assert r.status_code == 302, r.content.decode()[:3000]
    assert [(t.url, t.weight, t.enabled) for t in Target.objects.all()] == [
        (A, 100, True),
        (B, 30, False),
    ]
    assert ConfigVersion.read() > before
    detail = httpx.get(f"{gateway.url}/vx11/modules/switch", headers=H).json()
    assert detail["lb"] == "round_robin" and detail["url"] == A
    listing = admin_client.get("/admin/gateway/module/").content.decode()
    assert "column-target_count" in listing and "its targets" in listing


def test_the_admin_inline_refuses_a_bad_target(gateway, admin_client) -> None:
    row, _ = Module.objects.get_or_create(name="switch")
    form = module_form(
        row,
        **{
            "targets-TOTAL_FORMS": "1",
            "targets-0-url": "http://x:1/path",
            "targets-0-weight": "0",
        },
    )
    r = admin_client.post(f"/admin/gateway/module/{row.pk}/change/", form)
    assert r.status_code == 200
    page = r.content.decode()
    assert "no path, query or fragment" in page and "greater than or equal to 1" in page
    twice = module_form(
        row,
        **{
            "targets-TOTAL_FORMS": "2",
            "targets-0-url": A,
            "targets-0-weight": "100",
            "targets-1-url": f"{A}/",
            "targets-1-weight": "100",
        },
    )
    r = admin_client.post(f"/admin/gateway/module/{row.pk}/change/", twice)
    assert r.status_code == 200 and "Two targets at 10.0.0.5:8002." in r.content.decode()
    assert not Target.objects.exists()


# --------------------------------------------------------------------------- the document


def test_export_then_import_of_targets_is_a_no_op(transactional_db) -> None:
    add_targets("switch", A)
    add_targets("switch", B, weight=50, enabled=False)
    Module.objects.update_or_create(name="switch", defaults={"lb": "session"})
    Module.objects.get_or_create(name="madre")
    doc = build_document()
    assert doc["modules"]["switch"] == {
        "lb": "session",
        "targets": [{"url": A}, {"url": B, "weight": 50, "enabled": False}],
    }
    assert "targets" not in doc["modules"]["madre"]
    before, rows = ConfigVersion.read(), list(Target.objects.values())
    outcome = import_document(parse(dump(doc)))
    assert outcome.changes == [] and not outcome.applied
    assert import_document(doc, prune=True).changes == []
    assert ConfigVersion.read() == before and list(Target.objects.values()) == rows


def test_an_entry_s_targets_are_its_whole_list(transactional_db) -> None:
    kept, dropped = add_targets("switch", A, B)
    before = ConfigVersion.read()
    outcome = import_document(
        {"modules": {"switch": {"targets": [{"url": f"{A}/", "weight": 7}, {"url": C}]}}}
    )
    assert [str(c) for c in outcome.changes] == ["changed module switch (targets)"]
    assert ConfigVersion.read() == before + 1  # one bump for the whole list
    assert Target.objects.values_list("pk", "url", "weight")[0] == (kept.pk, A, 7)
    assert [t.url for t in Target.objects.all()] == [A, C]
    assert not Target.objects.filter(pk=dropped.pk).exists()
    assert import_document({"modules": {"switch": {}}}).changes == []  # no list: left alone
    assert Target.objects.count() == 2
    outcome = import_document({"modules": {"switch": {"targets": []}}})
    assert [str(c) for c in outcome.changes] == ["changed module switch (targets)"]
    assert not Target.objects.exists()


def test_a_new_module_with_targets_and_a_dry_run(transactional_db) -> None:
    doc = {"modules": {"billing": {"lb": "round_robin", "targets": [{"url": A}, {"url": B}]}}}
    assert [str(c) for c in import_document(doc, dry_run=True).changes] == ["added module billing"]
    assert not Target.objects.exists()
    import_document(doc)
    billing = load_snapshot(0).modules["billing"]
    assert [t.url for t in billing.targets] == [A, B] and billing.lb == "round_robin"


def test_document_errors_name_the_target_s_path(transactional_db) -> None:
    add_targets("switch", A)
    before, rows = ConfigVersion.read(), list(Target.objects.values())
    text = (
        "modules:\n"
        "  switch:\n"
        "    lb: random\n"
        "    targets:\n"
        f"      - {{url: {A}}}\n"
        "      - {url: 'ftp://x'}\n"
        "      - {url: 'http://y:1', weight: 0}\n"
        "      - {url: 'http://y:1', weight: 1001}\n"
        "      - {url: 'http://z:1', weight: true, colour: red}\n"
        "      - {weight: 5}\n"
        f"      - {{url: '{A}/'}}\n"
        "      - just-a-url\n"
        "  madre: {targets: {url: 'http://m:1'}}\n"
    )
    with pytest.raises(DocumentError) as raised:
        import_document(parse(text))
    errors = raised.value.errors
    expected = [
        "modules.switch.targets[1].url: Module URL 'ftp://x' must start with http",
        "modules.switch.targets[2].weight: Ensure this value is greater than or equal to 1",
        "modules.switch.targets[3].weight: Ensure this value is less than or equal to 1000",
        "modules.switch.targets[4].colour: unknown field",
        "modules.switch.targets[4].weight: must be a whole number",
        "modules.switch.targets[5].url: required",
        "modules.switch.targets[6].url: duplicate target 10.0.0.5:8002 (also "
        "modules.switch.targets[0])",
        "modules.switch.targets[7]: must be a mapping with url",
        "modules.madre.targets: must be a list of targets, not dict",
        "modules.switch.lb: Value 'random' is not a valid choice.",
    ]
    for message in expected:
        assert any(e.startswith(message) for e in errors), (message, errors)
    assert len(errors) == len(expected), errors
    assert ConfigVersion.read() == before and list(Target.objects.values()) == rows
