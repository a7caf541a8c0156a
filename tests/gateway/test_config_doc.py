"""Declarative configuration (SPEC §21): export, validate, diff, import, ``/vx11/config``.

Real database rows (SQLite, or PostgreSQL in the PostgreSQL pass: ``db_backend``), the real
commands through ``call_command``, and the API through the live in-process gateway.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from gateway.core.tokens import hash_token
from gateway.models import ApiClient, ConfigVersion, Module, Route
from gateway.operations.config_apply import import_document
from gateway.operations.config_doc import DocumentError, build_document, parse

pytestmark = [pytest.mark.db_backend]


def seed() -> str:
    """A module row, an override, an added intent and a client; returns the client's token."""
    Module.objects.update_or_create(  # the code modules have rows already (migration 0002)
        name="switch", defaults={"url": "http://10.0.0.5:8002", "failure_threshold": 3}
    )
    Module.objects.get_or_create(name="madre")
    Route.objects.create(intent="chat", timeout=30)
    Route.objects.create(intent="summarise", module="madre", endpoint="/madre/sum")
    client = ApiClient(name="ci", rate_limit=100)
    token = client.set_new_token()
    client.save()
    return token


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def snapshot_rows() -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for model in (Module, Route, ApiClient):
        rows.extend(tuple(r.values()) for r in model.objects.order_by("pk").values())
    return rows


def test_export_lists_rows_only_and_never_a_token_or_hash(
    transactional_db: None, tmp_path: Path
) -> None:
    token = seed()
    target = tmp_path / "config.yaml"
    run("export_config", "--output", str(target))
    text = target.read_text()
    doc = yaml.safe_load(text)
    assert doc["modules"]["switch"] == {"url": "http://10.0.0.5:8002", "failure_threshold": 3}
    assert doc["modules"]["madre"] == {}  # a row that inherits everything
    assert doc["routes"] == {
        "chat": {"timeout": 30.0},
        "summarise": {"module": "madre", "endpoint": "/madre/sum"},
    }
    assert "code" not in doc["routes"]  # an unchanged code route is not listed
    assert doc["clients"] == {"ci": {"admin": False, "active": True, "rate_limit": 100}}
    client = ApiClient.objects.get(name="ci")
    for secret in (token, client.token_hash, client.token_prefix):
        assert secret not in text


def test_export_then_import_is_a_no_op_without_a_version_bump(
    transactional_db: None, tmp_path: Path
) -> None:
    seed()
    target = tmp_path / "config.yaml"
    run("export_config", "--output", str(target))
    before, rows = ConfigVersion.read(), snapshot_rows()
    out, _ = run("import_config", str(target))
    assert out.strip() == "No changes."
    out, _ = run("import_config", str(target), "--prune")
    assert out.strip() == "No changes."
    assert ConfigVersion.read() == before
    assert snapshot_rows() == rows


def test_a_valid_import_lists_its_changes_and_bumps_the_version_once(
    transactional_db: None, tmp_path: Path
) -> None:
    seed()
    Module.objects.filter(name="hermes").delete()
    before = ConfigVersion.read()
    doc = build_document()
    doc["routes"]["chat"]["timeout"] = 45
    doc["routes"]["extra"] = {"module": "switch", "endpoint": "/switch/extra", "method": "get"}
    doc["modules"]["hermes"] = {"url": "http://10.0.0.9:8003/"}
    doc["clients"]["ci"]["admin"] = True
    target = tmp_path / "c.json"
    target.write_text(json.dumps(doc))  # JSON is accepted as well
    out, _ = run("import_config", str(target))
    assert out.splitlines()[:4] == [
        "added module hermes",
        "changed route chat (timeout)",
        "added route extra",
        "changed client ci (admin)",
    ]
    assert ConfigVersion.read() == before + 1
    assert Route.objects.get(intent="chat").timeout == 45
    assert Route.objects.get(intent="extra").method == "GET"
    assert Module.objects.get(name="hermes").url == "http://10.0.0.9:8003"  # normalised
    assert ApiClient.objects.get(name="ci").is_admin


def test_an_invalid_import_lists_every_error_and_changes_nothing(
    transactional_db: None, tmp_path: Path
) -> None:
    seed()
    before, rows = ConfigVersion.read(), snapshot_rows()
    target = tmp_path / "bad.yaml"
    target.write_text(
        "modules:\n  switch: {url: 'ftp://nowhere'}\n"
        "routes:\n"
        "  chat: {timeout: 9999}\n"
        "  lonely: {endpoint: /x}\n"
        "  stray: {module: nosuch, endpoint: /y}\n"
        "  fine: {module: switch, endpoint: /fine}\n"
        "clients:\n  ci: {colour: blue}\n"
        "extras: {}\n"
    )
    with pytest.raises(CommandError, match="6 error"):
        run("import_config", str(target))
    try:
        import_document(parse(target.read_text()))
    except DocumentError as exc:
        errors = exc.errors
    assert len(errors) == 6, errors
    joined = "\n".join(errors)
    assert "extras: unknown section" in joined
    assert "modules.switch.url: Module URL 'ftp://nowhere' must start with http" in joined
    assert "routes.chat.timeout: Timeout must be between 0.1 and 600" in joined
    assert "routes.lonely.module: A new intent needs a module." in joined
    assert "routes.stray.module: Unknown module 'nosuch'." in joined
    assert "clients.ci.colour: unknown field" in joined
    assert ConfigVersion.read() == before
    assert snapshot_rows() == rows
    assert not Route.objects.filter(intent="fine").exists()  # all or nothing


def test_a_route_may_name_a_module_added_by_the_same_document(transactional_db: None) -> None:
    outcome = import_document(
        {
            "modules": {"billing": {"url": "http://10.1.1.1:9000"}},
            "routes": {"bill": {"module": "billing", "endpoint": "/bill"}},
        }
    )
    assert [str(c) for c in outcome.changes] == ["added module billing", "added route bill"]
    assert Route.objects.get(intent="bill").module == "billing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("routes: [chat\n", "document: not valid YAML or JSON at line"),
        ("- a\n- b\n", "document: must be a mapping of sections, not list"),
        ("routes: [chat]\n", "routes: must be a mapping by name, not list"),
        ("routes: {chat: 3}\n", "routes.chat: must be a mapping of fields, not int"),
    ],
)
def test_a_malformed_document_is_a_clear_error(
    db: None, tmp_path: Path, text: str, expected: str
) -> None:
    target = tmp_path / "x.yaml"
    target.write_text(text)
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was changed"):
        call_command("import_config", str(target), stdout=io.StringIO(), stderr=err)
    assert expected in err.getvalue()


def test_prune_removes_rows_the_file_does_not_name_and_only_then(
    transactional_db: None, tmp_path: Path
) -> None:
    seed()
    target = tmp_path / "c.yaml"
    target.write_text("routes:\n  chat: {timeout: 30}\nclients: {}\n")
    out, _ = run("import_config", str(target))
    assert out.strip() == "No changes."
    assert Route.objects.filter(intent="summarise").exists()

    before = ConfigVersion.read()
    out, _ = run("import_config", str(target), "--prune", "--dry-run")
    assert out.splitlines() == [
        "removed route summarise",
        "removed client ci",
        "Dry run: 2 change(s), nothing written.",
    ]
    assert ConfigVersion.read() == before
    out, _ = run("import_config", str(target), "--prune")
    assert "removed route summarise" in out
    assert ConfigVersion.read() == before + 1
    assert list(Route.objects.values_list("intent", flat=True)) == ["chat"]
    assert not ApiClient.objects.exists()
    assert Module.objects.filter(name="switch").exists()  # modules: not in the file


def test_a_new_client_is_created_with_its_token_printed_once(
    transactional_db: None, tmp_path: Path
) -> None:
    target = tmp_path / "c.yaml"
    target.write_text("clients:\n  robot: {admin: true, protected_rate_limit: 5}\n")
    out, _ = run("import_config", str(target))
    token = out.strip().splitlines()[-1]
    client = ApiClient.objects.get(name="robot")
    assert client.token_hash == hash_token(token)
    assert client.is_admin and client.protected_rate_limit == 5
    out, _ = run("import_config", str(target))
    assert out.strip() == "No changes."  # and no second token


def test_put_and_get_config_through_the_api(http, operator_headers, make_client) -> None:
    before = ConfigVersion.read()
    body = "routes:\n  chat: {timeout: 25}\nclients:\n  web: {rate_limit: 7}\n"
    answer = http.put(
        "/vx11/config",
        content=body,
        headers={**operator_headers, "Content-Type": "application/yaml"},
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [c["name"] for c in result["changes"]] == ["chat", "web"]
    assert result["applied"] and result["version"] == before + 1
    token = result["tokens"]["web"]
    assert ApiClient.objects.get(name="web").token_hash == hash_token(token)

    as_json = http.get("/vx11/config", headers=operator_headers)
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["routes"] == {"chat": {"timeout": 25.0}}
    as_yaml = http.get("/vx11/config", headers={**operator_headers, "Accept": "application/yaml"})
    assert as_yaml.headers["content-type"].startswith("application/yaml")
    assert yaml.safe_load(as_yaml.text) == as_json.json()
    assert token not in as_yaml.text and token not in as_json.text

    again = http.put("/vx11/config", json=as_json.json(), headers=operator_headers).json()
    assert again["changes"] == [] and not again["applied"]
    assert ConfigVersion.read() == before + 1

    _, user_token = make_client("plain")
    refused = http.get("/vx11/config", headers={"X-VX11-Token": user_token})
    assert refused.status_code == 403


def test_put_errors_are_problem_json_with_every_error(http, operator_headers) -> None:
    before = ConfigVersion.read()
    bad = {"routes": {"chat": {"timeout": 0}, "x": {"endpoint": "no-slash"}}}
    answer = http.put("/vx11/config", json=bad, headers=operator_headers)
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["error"] == "invalid_request"
    assert len(problem["errors"]) == 3, problem["errors"]
    assert any(e.startswith("routes.chat.timeout: ") for e in problem["errors"])
    assert any(e.startswith("routes.x.endpoint: ") for e in problem["errors"])
    assert ConfigVersion.read() == before

    for content, kind in (("[1, 2]", "application/json"), ("a: [", "application/yaml")):
        answer = http.put(
            "/vx11/config", content=content, headers={**operator_headers, "Content-Type": kind}
        )
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
    assert ConfigVersion.read() == before


def test_the_config_endpoint_is_in_the_openapi_schema(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"get", "put"} <= set(paths["/vx11/config"])
    content = paths["/vx11/config"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "application/yaml"} <= set(content)


def test_an_unknown_format_parameter_is_a_400_problem(http, operator_headers) -> None:
    # DRF's own answer would be a bare 404 (found by the schema fuzzer in test_hostile.py).
    for method in ("GET", "PUT"):
        answer = http.request(
            method, "/vx11/config?format=%C3%81", json={}, headers=operator_headers
        )
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "format" in answer.json()["detail"]
    assert http.get("/vx11/config?format=yaml", headers=operator_headers).text.startswith(
        ("modules", "{}", "clients", "routes")
    )


def test_errors_are_problem_json_even_when_yaml_was_asked_for(http, operator_headers) -> None:
    # The schema fuzzer (test_hostile.py) sent ?format=yaml with an invalid document and got
    # the problem rendered as YAML, which the schema does not document.
    bad = "nonsense: []\n"
    for query, accept in (("?format=yaml", "*/*"), ("", "application/yaml")):
        answer = http.put(
            f"/vx11/config{query}",
            content=bad,
            headers={**operator_headers, "Content-Type": "application/yaml", "Accept": accept},
        )
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "unknown section" in answer.json()["errors"][0]


# ------------------------------------------------------------ hostile or careless documents


def errors_of(text: str, *, prune: bool = False) -> list[str]:
    with pytest.raises(DocumentError) as raised:
        import_document(parse(text), prune=prune)
    return raised.value.errors


def test_values_of_the_wrong_kind_are_errors_with_their_path_not_coerced(
    transactional_db: None,
) -> None:
    # Django's to_python would take true as 1, 3.9 as 3, "7" as 7 and str() a list;
    # a list or text in a number column used to end in a TypeError (a 500 on PUT).
    seed()
    before, rows = ConfigVersion.read(), snapshot_rows()
    errors = errors_of(
        "modules:\n"
        "  switch: {failure_threshold: true, recovery_timeout: .nan, window_seconds: -1,"
        " failure_rate_threshold: abc, enabled: 0}\n"
        "  m2: {url: {a: 1}, min_calls: 3.9, half_open_max_calls: '7'}\n"
        "routes:\n"
        "  chat: {timeout: abc}\n"
        "  code: {timeout: [1], streaming: yes please, description: 5}\n"
        "  task: {timeout: .inf}\n"
    )
    expected = {
        "modules.switch.failure_threshold: must be a whole number",
        "modules.switch.recovery_timeout: must be a finite number",
        "modules.switch.window_seconds: must not be negative",
        "modules.switch.failure_rate_threshold: must be a number",
        "modules.switch.enabled: must be true or false",
        "modules.m2.url: must be text",
        "modules.m2.min_calls: must be a whole number",
        "modules.m2.half_open_max_calls: must be a whole number",
        "routes.chat.timeout: must be a number",
        "routes.code.timeout: must be a number",
        "routes.code.streaming: must be true or false",
        "routes.code.description: must be text",
        "routes.task.timeout: must be a finite number",
    }
    assert expected <= set(errors), sorted(set(errors) - expected)
    assert ConfigVersion.read() == before and snapshot_rows() == rows


def test_a_typo_through_the_api_is_a_400_problem_not_a_500(http, operator_headers) -> None:
    for body in ("routes: {chat: {timeout: abc}}\n", "modules: {m2: {url: {a: 1}}}\n"):
        answer = http.put(
            "/vx11/config?dry_run=true",
            content=body,
            headers={**operator_headers, "Content-Type": "application/yaml"},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["errors"], answer.text


def test_yaml_aliases_and_duplicate_keys_are_refused(transactional_db: None) -> None:
    # Nine levels of nine aliases: 9**9 strings from a few hundred bytes (billion laughs).
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    bomb = "routes:\n  chat: {description: *a9}\n" + "\n".join(lines) + "\n"
    with pytest.raises(DocumentError, match="aliases"):
        parse(bomb)
    with pytest.raises(DocumentError, match="duplicate key 'timeout'"):
        parse("routes:\n  chat: {timeout: 5, timeout: 500}\n")
    with pytest.raises(DocumentError, match="duplicate key 'chat'"):
        parse("routes:\n  chat: {timeout: 5}\n  chat: {timeout: 6}\n")
    assert parse('{"routes": {"chat": {"timeout": 5}}}') == {"routes": {"chat": {"timeout": 5}}}


def test_prune_refuses_to_remove_a_module_that_a_kept_route_still_names(
    transactional_db: None,
) -> None:
    import_document(
        parse(
            "modules: {m9: {url: 'http://127.0.0.1:9'}}\n"
            "routes: {newi: {module: m9, endpoint: /x}}\n"
        )
    )
    before, rows = ConfigVersion.read(), snapshot_rows()
    errors = errors_of("modules: {}\n", prune=True)
    assert errors == [
        "routes.newi: module 'm9' is removed by this document (list the route, or keep the module)"
    ]
    assert ConfigVersion.read() == before and snapshot_rows() == rows
    # Removing both at once is fine.
    outcome = import_document(parse("modules: {}\nroutes: {}\n"), prune=True)
    assert outcome.applied and not Route.objects.filter(intent="newi").exists()
    assert not Module.objects.filter(name="m9").exists()


def test_put_prunes_by_default_and_a_dry_run_writes_nothing(
    http, operator_headers, make_client
) -> None:
    make_client("keepme")
    make_client("dropme")
    before = ConfigVersion.read()
    doc = http.get("/vx11/config", headers=operator_headers).json()
    del doc["clients"]["dropme"]
    dry = http.put("/vx11/config?dry_run=true", json=doc, headers=operator_headers).json()
    assert dry["dry_run"] and not dry["applied"]
    assert {"action": "removed", "section": "clients", "name": "dropme", "fields": []} in dry[
        "changes"
    ]
    assert ApiClient.objects.filter(name="dropme").exists() and ConfigVersion.read() == before
    kept = http.put("/vx11/config?prune=false", json=doc, headers=operator_headers).json()
    assert kept["changes"] == [] and ApiClient.objects.filter(name="dropme").exists()
    done = http.put("/vx11/config", json=doc, headers=operator_headers).json()
    assert done["applied"] and not ApiClient.objects.filter(name="dropme").exists()
    assert ApiClient.objects.filter(name="keepme").exists()
