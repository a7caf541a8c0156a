"""The deployment files and docs cannot drift from the code.

- every ``VX11_*`` / ``DJANGO_*`` / ``DATABASE_URL`` variable named in the docs, README, Compose
  file, Dockerfile and entrypoint exists in the code (a knob or a setting);
- every endpoint in docs/DEPLOYMENT.md's table is served (Django's URLconf, the proxy
  dispatcher, the WebSocket router) with the documented methods and auth;
- every management command named in the docs exists and accepts the documented arguments;
- the Dockerfile's CMD and the Compose gateway command are the README's production command;
- the image runs as non-root; the Compose file is structurally sound (``docker compose config``
  too, when a Docker CLI with the Compose plugin is available);
- the image's entrypoint and health probe work, and the image's command, run here with the
  image's and Compose's environment, starts a gateway that passes the probe and sums metrics
  over its workers.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import OPERATOR_TOKEN
from tests.servers import UpstreamServer, free_port, fresh_database_url, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "docs" / "DEPLOYMENT.md"
README = ROOT / "README.md"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
PROMETHEUS = ROOT / "docs" / "prometheus" / "prometheus.yml"
DOC_FILES = (DEPLOYMENT, README, COMPOSE, DOCKERFILE, ENTRYPOINT)
# Every other page under docs/ is held to the same rules (variables and commands named exist).
ALL_DOCS = (*DOC_FILES, *sorted(set(ROOT.glob("docs/**/*.md")) - set(DOC_FILES)))
IMAGE_SERVICES = ("migrate", "gateway", "worker")
# Variables of the image and the Compose file that are not the gateway's own.
NOT_GATEWAY_VARS = {
    "PROMETHEUS_MULTIPROC_DIR",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}
SECRETS = {
    "VX11_TOKEN": "compose-operator-token-0123456789",
    "DJANGO_SECRET_KEY": "compose-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz",
    "POSTGRES_PASSWORD": "compose-db-password",
}


# --------------------------------------------------------------------------- variables

VAR_RE = re.compile(r"(?<![A-Za-z0-9_])((?:VX11|DJANGO)_(?:[A-Z0-9_]|<NAME>)*|DATABASE_URL\w*)")
CODE_LITERAL_RE = re.compile(r"[\"']((?:VX11|DJANGO)_[A-Z0-9_]+|DATABASE_URL)[\"']")
MODULE_URL_RE = re.compile(r"VX11_MODULE_([A-Z0-9]+)_(URL|MAX_CONCURRENT|LB)")


def code_files() -> Iterator[Path]:
    yield ROOT / "manage.py"
    for pattern in ("vx11site/*.py", "gateway/**/*.py", "sessions_ctx7/**/*.py"):
        yield from ROOT.glob(pattern)


def known_variables() -> tuple[set[str], set[str]]:
    """(every variable the code reads, those that may also come from ``NAME_FILE``)."""
    from gateway.core.conf import KNOBS

    names = {knob.env for knob in KNOBS}
    for path in code_files():
        names |= set(CODE_LITERAL_RE.findall(path.read_text()))
    # Test-harness switches (VX11_SOAK_SECONDS, VX11_UPDATE_SCREENSHOTS, …) that the docs
    # mention for people running the suite: read by the fixtures and the runner.
    harness = [
        *ROOT.glob("tests/**/conftest.py"),
        ROOT / "tests" / "runner.py",
        *ROOT.glob("tests/reliability/*.py"),
        *ROOT.glob("tests/browser/*.py"),
    ]
    for path in harness:
        names |= set(CODE_LITERAL_RE.findall(path.read_text()))
    # env_str (and env_list, built on it) read NAME_FILE when NAME is unset.
    file_capable = {knob.env for knob in KNOBS if knob.kind in ("str", "list")}
    settings_source = (ROOT / "vx11site" / "settings.py").read_text()
    file_capable |= set(re.findall(r"env_(?:str|list)\(\s*\"([A-Z0-9_]+)\"", settings_source))
    return names, file_capable


def unknown_variables(text: str) -> set[str]:
    from gateway.config.modules import CODE_MODULES

    known, file_capable = known_variables()
    code = "\n".join(path.read_text() for path in code_files())
    unknown: set[str] = set()
    for name in set(VAR_RE.findall(text)):
        if name in (
            "VX11_MODULE_<NAME>_URL",
            "VX11_MODULE_<NAME>_MAX_CONCURRENT",
            "VX11_MODULE_<NAME>_LB",
        ):
            suffix = name.removeprefix("VX11_MODULE_<NAME>")
            ok = '"VX11_MODULE_"' in code and f'"{suffix}"' in code
        elif (match := MODULE_URL_RE.fullmatch(name)) is not None:
            ok = match.group(1).lower() in CODE_MODULES
        elif name.endswith("_FILE"):
            ok = name.removesuffix("_FILE") in file_capable
        elif name.endswith("_"):  # a family: VX11_CB_* or VX11_*
            ok = any(k.startswith(name) for k in known)
        else:
            ok = name in known
        if not ok:
            unknown.add(name)
    return unknown


def test_variable_check_reports_names_the_code_does_not_read():
    text = (
        "VX11_NOT_A_KNOB, DJANGO_NOPE, VX11_MODULE_NOPE_URL, VX11_CB_ENABLED_FILE, "
        "DATABASE_URLS, VX11_NOPE_*"
    )
    assert unknown_variables(text) == {
        "VX11_NOT_A_KNOB",
        "DJANGO_NOPE",
        "VX11_MODULE_NOPE_URL",
        "VX11_CB_ENABLED_FILE",
        "DATABASE_URLS",
        "VX11_NOPE_",
    }
    assert (
        unknown_variables(
            "VX11_CB_ENABLED, VX11_TOKEN_FILE, DJANGO_SECRET_KEY_FILE, "
            "VX11_MODULE_SWITCH_URL, VX11_MODULE_<NAME>_URL, VX11_CB_*, "
            "DJANGO_DEBUG, DATABASE_URL, VX11_VAR_DIR"
        )
        == set()
    )


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_variable_named_in_the_docs_exists_in_the_code(path: Path):
    text = path.read_text()
    if path in (DEPLOYMENT, README, COMPOSE, DOCKERFILE):
        assert VAR_RE.search(text), f"{path.name} names no variable: is the pattern right?"
    assert unknown_variables(text) == set(), f"{path.name} names variables the code lacks"


def test_every_environment_key_of_the_image_and_compose_services_is_a_real_variable():
    compose = load_compose()
    keys = set(dockerfile_env()) - NOT_GATEWAY_VARS
    for name in IMAGE_SERVICES:
        keys |= set(compose["services"][name]["environment"])
    assert "VX11_TOKEN" in keys and "DATABASE_URL" in keys
    known, _ = known_variables()
    assert keys - known == set()


def test_every_system_check_id_named_in_the_docs_exists():
    ids_in_code = set(
        re.findall(r"gateway\.[EW]\d{3}", (ROOT / "gateway" / "checks.py").read_text())
    )
    for path in ALL_DOCS:
        named = set(re.findall(r"gateway\.[EW]\d{3}", path.read_text()))
        assert named <= ids_in_code, f"{path.name} names checks that do not exist"


# --------------------------------------------------------------------------- endpoints

ENDPOINT_ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|")
SAMPLES = {"intent": "chat", "module": "switch", "session_id": "s-1", "path": "status/now"}


def endpoint_rows() -> list[tuple[list[str], str, str]]:
    text = DEPLOYMENT.read_text()
    table = text.split("<!-- endpoints:start -->", 1)[1].split("<!-- endpoints:end -->", 1)[0]
    rows = []
    for line in table.splitlines():
        match = ENDPOINT_ROW.match(line)
        if match:
            methods = [m.strip() for m in match.group(1).split(",")]
            rows.append((methods, match.group(2), match.group(3)))
    return rows


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], path)


async def dispatched_to(path: str) -> str:
    """Which side of the real HTTP dispatcher (gateway.startup) serves ``path``."""
    from gateway.startup import HttpDispatcher

    seen: list[str] = []

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        seen.append("proxy")

    async def django(scope: Any, receive: Any, send: Any) -> None:
        seen.append("django")

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        return None

    await HttpDispatcher(proxy, django)({"type": "http", "path": path}, receive, send)
    assert len(seen) == 1
    return seen[0]


def test_the_endpoint_table_lists_the_main_endpoints():
    paths = {path for _, path, _ in endpoint_rows()}
    assert {
        "/health",
        "/ready",
        "/vx11/route/{intent}",
        "/shub/{path}",
        "/vx11/routes",
        "/openapi.json",
        "/docs",
        "/redoc",
    } <= paths
    assert len(paths) == len(endpoint_rows()), "a path is listed twice"


@pytest.mark.parametrize("row", [r for r in endpoint_rows() if r[0] != ["WS"]], ids=lambda r: r[1])
async def test_every_documented_http_endpoint_is_served_with_its_methods(row):
    """(WebSocket rows: test_documented_websocket_paths_are_routed.)"""
    from django.urls import Resolver404, resolve

    methods, path, _auth = row
    side = await dispatched_to(concrete(path))
    if path.startswith(("/vx11/route/", "/shub/")) and path != "/shub/cache/clear":
        assert side == "proxy"
        return
    assert side == "django"
    try:
        match = resolve(concrete(path))
    except Resolver404:
        pytest.fail(f"{path} is in docs/DEPLOYMENT.md but no URL pattern serves it")
    view_class = getattr(match.func, "cls", None) or getattr(match.func, "view_class", None)
    if view_class is not None:
        allowed = {m.upper() for m in view_class.http_method_names if hasattr(view_class, m)}
        assert set(methods) <= allowed, f"{path}: documented {methods}, served {sorted(allowed)}"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "row",
    [
        r
        for r in endpoint_rows()
        if "GET" in r[0] and not r[1].startswith(("/vx11/route/", "/shub/"))
    ],  # proxy: own tests
    ids=lambda r: r[1],
)
def test_documented_auth_of_get_endpoints_holds_without_credentials(row, gw_env):
    """'none' answers without a token, 'token'/'admin' asks for one (401), staff pages log in."""
    from django.test import Client

    _methods, path, auth = row
    response = Client().get(concrete(path))
    if auth.startswith("none"):
        assert response.status_code == 200
    elif auth.startswith(("token", "admin")):
        assert response.status_code == 401
        assert response.json()["error"] == "auth_required"
    else:
        assert auth.startswith("staff")
        assert response.status_code == 302
        assert "/admin/login/" in response["Location"]


@pytest.mark.django_db(transaction=True)
async def test_documented_websocket_paths_are_routed(gw_env):
    """A documented WS path reaches its consumer (4401: no credential); others are denied."""
    from channels.testing import WebsocketCommunicator

    from gateway.startup import build_application

    rows = [r for r in endpoint_rows() if r[0] == ["WS"]]
    assert rows, "the table lists no WebSocket endpoint"
    application = build_application(None)

    async def close_code(path: str) -> Any:
        """The close code the server ends an uncredentialed connection with."""
        communicator = WebsocketCommunicator(application, path)
        connected, code = await communicator.connect(timeout=5)
        if connected:  # the consumer accepts, then closes with its reason
            message = await communicator.receive_output(timeout=5)
            assert message["type"] == "websocket.close"
            code = message.get("code")
        await communicator.disconnect()
        return code

    assert await close_code("/ws/not-documented") != 4401
    for _methods, path, _auth in rows:
        assert await close_code(path) == 4401


# --------------------------------------------------------------------------- commands

COMMAND_RE = re.compile(r"manage\.py\"?,?\s+\"?([a-z][a-z0-9_]*)")
COMPOSE_MANAGE_RE = re.compile(r"docker compose run --rm \w+ manage ([a-z][a-z0-9_]*)")
PLACEHOLDERS = {"N": "10"}
INLINE_COMMAND_RE = re.compile(r"`(?:python )?manage\.py ([a-z][a-z0-9_]*)((?: [^`\n]+)?)`")


def documented_commands() -> set[str]:
    names: set[str] = set()
    for path in ALL_DOCS:
        text = path.read_text()
        names |= set(COMMAND_RE.findall(text)) | set(COMPOSE_MANAGE_RE.findall(text))
    return names


def test_every_management_command_named_in_the_docs_exists():
    from django.core.management import get_commands

    names = documented_commands()
    assert {"migrate", "run_health_checks", "purge_context7", "create_api_client"} <= names
    assert names - set(get_commands()) == set()


def command_lines() -> Iterator[tuple[str, list[str]]]:
    """(command, arguments) of every documented invocation, alternatives expanded."""
    for path in (DEPLOYMENT, README):
        text = path.read_text()
        for name, rest in INLINE_COMMAND_RE.findall(text):
            for args in expand(rest.split()):
                yield name, args
        for match in re.finditer(
            r"^(?:python manage\.py|docker compose run --rm \w+ manage) "
            r"([a-z_0-9]+)(.*)$",
            text,
            flags=re.M,
        ):
            rest = match.group(2).split("#", 1)[0]
            for args in expand(rest.split()):
                yield match.group(1), args


def expand(tokens: list[str]) -> Iterator[list[str]]:
    """``reset|open MODULE [--rate-limit N]`` → [reset, switch], [reset, switch, --rate-limit,
    10], [open, switch], …: alternatives, optional groups and placeholders filled in."""
    groups: list[tuple[bool, list[str]]] = []
    pending: list[str] | None = None
    for token in tokens:
        if pending is not None:
            pending.append(token.rstrip("]"))
            if token.endswith("]"):
                groups.append((True, pending))
                pending = None
        elif token.startswith("[") and not token.endswith("]"):
            pending = [token.lstrip("[")]
        elif token.startswith("["):
            groups.append((True, [token.strip("[]")]))
        else:
            groups.append((False, [token]))
    assert pending is None, f"unclosed [ in {tokens}"
    choices: list[list[list[str]]] = []
    for optional, words in groups:
        options: list[list[str]] = [[]] if optional else []
        alternatives = [word.split("|") for word in words]
        options += [
            [PLACEHOLDERS.get(w, "switch") if w.isupper() else w for w in combo]
            for combo in itertools.product(*alternatives)
        ]
        choices.append(options)
    for combo in itertools.product(*choices):
        yield [word for part in combo for word in part]


def test_documented_command_lines_parse_with_the_commands_own_arguments():
    from django.core.management import get_commands, load_command_class

    commands = get_commands()
    seen = list(command_lines())
    assert ("migrate", []) in seen and any(name == "create_api_client" for name, _ in seen)
    for name, args in seen:
        if name not in commands:
            continue  # reported by test_every_management_command_named_in_the_docs_exists
        command = load_command_class(commands[name], name)
        command.create_parser("manage.py", name).parse_args(args)


# --------------------------------------------------------------------------- README command


def readme_production_command() -> list[str]:
    return production_command(README.read_text())


def production_command(text: str) -> list[str]:
    section = text.split("## Production", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line for line in joined.splitlines() if line.startswith("uvicorn ")]
    assert len(lines) == 1, "the Production section must show one uvicorn command"
    return shlex.split(lines[0])


def test_the_readme_production_command_is_safe_behind_proxies():
    command = readme_production_command()
    assert command[:2] == ["uvicorn", "vx11site.asgi:application"]
    assert "--no-proxy-headers" in command
    assert "--workers" in command


def test_deployment_doc_shows_the_readme_production_command():
    assert production_command(DEPLOYMENT.read_text()) == readme_production_command()


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def test_image_is_python_312_slim_with_pinned_requirements():
    assert dockerfile("FROM")[0] == "python:3.12-slim"
    assert any("pip install -r requirements.txt" in run for run in dockerfile("RUN"))
    lines = [
        line.split("#", 1)[0].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    requirements = [line for line in lines if line]
    assert requirements and all("==" in line for line in requirements)


def test_image_runs_as_a_non_root_user():
    users = dockerfile("USER")
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}
    instructions = dockerfile_instructions()
    last_user = max(i for i, (kw, _) in enumerate(instructions) if kw == "USER")
    assert all(kw != "USER" or rest == users[-1] for kw, rest in instructions[last_user:])
    assert any(kw in {"CMD", "ENTRYPOINT"} for kw, _ in instructions[last_user:])


def test_image_command_is_the_readme_production_command():
    assert json.loads(dockerfile("CMD")[-1]) == readme_production_command()


def test_image_declares_its_worker_count_for_the_system_checks():
    command = readme_production_command()
    assert dockerfile_env()["VX11_WORKERS"] == command[command.index("--workers") + 1]


def test_image_has_a_writable_prometheus_multiprocess_folder():
    folder = dockerfile_env()["PROMETHEUS_MULTIPROC_DIR"]
    assert folder
    setup = " ".join(dockerfile("RUN"))
    assert f"mkdir -p /app/var {folder}" in setup or f"mkdir -p {folder}" in setup
    assert re.search(rf"chown -R \S+ [^&]*{re.escape(folder)}", setup)


def test_image_health_check_runs_the_python_probe_against_health():
    (check,) = dockerfile("HEALTHCHECK")
    probe = json.loads(check.split("CMD", 1)[1])
    assert probe[0] == "python" and probe[1].endswith("docker/healthcheck.py")
    port = readme_production_command()[readme_production_command().index("--port") + 1]
    expected = f"http://127.0.0.1:{port}/health"
    assert expected == load_probe().DEFAULT_URL


def test_image_entrypoint_is_an_executable_file_in_the_image():
    (entry,) = dockerfile("ENTRYPOINT")
    path = json.loads(entry)[0]
    assert path == "/app/docker/entrypoint.sh"
    assert ENTRYPOINT.exists() and os.access(ENTRYPOINT, os.X_OK)
    assert dockerfile("WORKDIR") == ["/app"]


def test_build_context_leaves_out_local_state_and_secrets():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    # var/ holds the dev credentials and the generated secret key; .env the Compose secrets.
    assert {"var", ".venv", ".git", ".env"} <= ignored
    assert not ignored & {
        "gateway",
        "sessions_ctx7",
        "vx11site",
        "templates",
        "docker",
        "requirements.txt",
        "manage.py",
    }


# --------------------------------------------------------------------------- Compose


class ComposeError(ValueError):
    pass


INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``${X}``, ``${X:-d}``, ``${X:?msg}`` …)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else str(current)
        if op in (":?", "?"):
            if missing:
                raise ComposeError(f"{name}: {arg}")
            return str(current)
        return current or ""

    return INTERPOLATION.sub(one, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    loaded: dict[str, Any] = interpolate(raw, SECRETS if env is None else env)
    return loaded


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_has_the_gateway_worker_database_and_redis():
    services = load_compose()["services"]
    assert {"gateway", "worker", "migrate", "postgres", "redis", "prometheus"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in IMAGE_SERVICES:
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["gateway"]["image"]


def test_compose_gateway_runs_the_readme_production_command():
    services = load_compose()["services"]
    assert command_of(services["gateway"]) == readme_production_command()
    port = readme_production_command()[readme_production_command().index("--port") + 1]
    assert f"8000:{port}" in services["gateway"]["ports"]
    workers = readme_production_command()[readme_production_command().index("--workers") + 1]
    assert services["gateway"]["environment"]["VX11_WORKERS"] == workers


def test_compose_worker_runs_the_health_checks_and_migrate_runs_first():
    services = load_compose()["services"]
    assert command_of(services["worker"]) == ["python", "manage.py", "run_health_checks"]
    assert command_of(services["migrate"]) == ["migrate"]
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_compose_scales_workers_with_web_concurrency():
    services = load_compose({**SECRETS, "WEB_CONCURRENCY": "8"})["services"]
    command = command_of(services["gateway"])
    assert command[command.index("--workers") + 1] == "8"
    assert services["gateway"]["environment"]["VX11_WORKERS"] == "8"


def test_compose_dependencies_exist_and_wait_for_health():
    services = load_compose()["services"]
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec["condition"] in conditions
            if spec["condition"] == "service_healthy":
                assert "test" in services[target]["healthcheck"], f"{target} has no healthcheck"
    assert services["gateway"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_health_checks_fit_each_service():
    services = load_compose()["services"]
    assert services["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["gateway"]["healthcheck"]["test"] == [
        "CMD",
        "python",
        "/app/docker/healthcheck.py",
    ]
    # The worker and the one-shot migrate serve no HTTP: the image's probe would fail there.
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_compose_points_the_gateway_at_postgres_and_redis():
    env = load_compose()["services"]["gateway"]["environment"]
    assert env["DATABASE_URL"] == (
        f"postgres://vx11:{SECRETS['POSTGRES_PASSWORD']}@postgres:5432/vx11"
    )
    assert env["VX11_REDIS_URL"] == "redis://redis:6379/0"
    # Its own health probe (127.0.0.1) and Prometheus (gateway) must pass ALLOWED_HOSTS.
    hosts = env["DJANGO_ALLOWED_HOSTS"].split(",")
    assert {"127.0.0.1", "gateway"} <= set(hosts)


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(secret):
    with pytest.raises(ComposeError, match=secret):
        load_compose({k: v for k, v in SECRETS.items() if k != secret})
    with pytest.raises(ComposeError, match=secret):
        load_compose({**SECRETS, secret: ""})


def test_compose_prometheus_is_optional_and_loads_the_alert_rules():
    services = load_compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"] if v.startswith("./")}
    assert mounts["./docs/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./docs/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    for source in mounts:
        assert (ROOT / source).is_file(), f"{source} is mounted but does not exist"
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gateway:8000"]
    alerts = yaml.safe_load((ROOT / "docs" / "prometheus" / "alerts.yml").read_text())
    assert alerts["groups"], "alerts.yml holds no rule group"


def compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin), else a standalone ``docker-compose``, if one works.

    Both only read and validate the file here (``config``): no Docker engine is needed.
    """
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        try:
            done = subprocess.run([*cli, "version"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cli
    return None


COMPOSE_CLI = compose_cli()


@pytest.mark.skipif(COMPOSE_CLI is None, reason="no docker compose / docker-compose CLI here")
def test_docker_compose_accepts_the_file_and_refuses_a_missing_token():
    assert COMPOSE_CLI is not None
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | SECRETS

    def config(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*COMPOSE_CLI, "-f", str(COMPOSE), "--profile", "monitoring", "config", "--quiet"],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = config(env)
    assert done.returncode == 0, done.stderr
    refused = config({k: v for k, v in env.items() if k != "VX11_TOKEN"})
    assert refused.returncode != 0
    assert "VX11_TOKEN" in refused.stderr


# --------------------------------------------------------------------------- entrypoint, probe


def image_like_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """This machine's environment minus gateway settings, plus the image's and Compose's."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VX11_", "DJANGO_", "PROMETHEUS_")) and k != "DATABASE_URL"
    }
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    env = {**base, **dockerfile_env(), **load_compose()["services"]["gateway"]["environment"]}
    env.update(
        VX11_VAR_DIR=str(tmp_path / "var"),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        DATABASE_URL=f"sqlite:///{tmp_path}/gateway.sqlite3",
        VX11_REDIS_URL="",
        VX11_LOG_LEVEL="WARNING",
    )
    env.update(overrides)
    return env


def entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_entrypoint_without_a_command_prints_its_usage(tmp_path):
    done = entrypoint([], image_like_env(tmp_path))
    assert done.returncode == 2
    assert "usage" in done.stderr


def test_entrypoint_empties_the_prometheus_folder_before_running(tmp_path):
    env = image_like_env(tmp_path)
    folder = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir()
    (folder / "counter_123.db").write_bytes(b"stale")
    done = entrypoint(["ls", "-A", str(folder)], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_entrypoint_migrate_prepares_the_database_and_manage_runs_commands(tmp_path):
    env = image_like_env(tmp_path)
    migrated = entrypoint(["migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"gateway_route", "gateway_apiclient", "django_migrations"} <= tables
    purged = entrypoint(["manage", "purge_context7"], env)
    assert purged.returncode == 0, purged.stderr
    assert "Removed 0 expired" in purged.stdout


def load_probe() -> Any:
    """docker/healthcheck.py as a module (it is a script, not part of a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docker_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_sends_a_host_django_accepts():
    host = load_probe().host_header
    assert host("gateway.example.com,127.0.0.1,gateway", "x") == "127.0.0.1"
    assert host("gateway.example.com", "x") == "gateway.example.com"
    assert host(".example.com", "x") == "example.com"
    assert host("*", "10.0.0.1") == "10.0.0.1"
    assert host("", "10.0.0.1") == "10.0.0.1"


def test_probe_fails_when_nothing_listens(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HEALTHCHECK), f"http://127.0.0.1:{free_port()}/health"],
        env=image_like_env(tmp_path),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1


# --------------------------------------------------------------------------- the image's command


class ImageCommand:
    """The Dockerfile's CMD through its entrypoint, on this machine, with the image's env."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        command = json.loads(dockerfile("CMD")[-1])
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(self.port)
        command[command.index("--workers") + 1] = "2"
        self.command = command
        self.env = {**env, "VX11_WORKERS": "2"}
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> ImageCommand:
        self.proc = subprocess.Popen(
            [str(ENTRYPOINT), *self.command],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return out


def test_image_command_refuses_to_start_without_a_token(tmp_path):
    env = image_like_env(tmp_path)
    del env["VX11_TOKEN"]
    server = ImageCommand(env).start()
    try:
        assert server.proc is not None
        server.proc.wait(60)
    finally:
        output = server.stop()
    assert server.proc.returncode != 0
    assert "VX11_TOKEN" in output


@pytest.mark.reliability
@pytest.mark.db_backend
def test_image_command_serves_passes_its_probe_and_sums_metrics_over_workers(tmp_path, redis_url):
    """Two uvicorn workers from the image's CMD, on PostgreSQL when the run provides it."""
    upstream = UpstreamServer().start()
    env = image_like_env(
        tmp_path,
        DATABASE_URL=fresh_database_url(os.environ.get("DATABASE_URL"), str(tmp_path)),
        VX11_REDIS_URL=redis_url,
        VX11_MODULE_SWITCH_URL=upstream.url,
        VX11_TOKEN=OPERATOR_TOKEN,
    )
    assert entrypoint(["migrate"], env).returncode == 0
    server = ImageCommand(env).start()
    try:
        wait_for_port(server.port, timeout=60)
        probe = subprocess.run(
            [sys.executable, str(HEALTHCHECK), f"http://127.0.0.1:{server.port}/health"],
            env=env,
            capture_output=True,
            timeout=30,
        )
        assert probe.returncode == 0
        sent = 12
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            for _ in range(sent):
                # A new connection each time, so both workers take requests.
                answer = client.post(
                    "/vx11/route/task",
                    json={"n": 1},
                    headers={"X-VX11-Token": OPERATOR_TOKEN, "Connection": "close"},
                )
                assert answer.status_code == 200, answer.text
            for _ in range(4):  # whichever worker answers the scrape sees every request
                scrape = client.get("/metrics", headers={"Connection": "close"})
                assert scrape.status_code == 200
                assert requests_counted(scrape.text, "task") == sent
    finally:
        output = server.stop()
        upstream.stop()
    assert "Traceback" not in output, output


def requests_counted(exposition: str, intent: str) -> float:
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("vx11_requests_total{") and f'intent="{intent}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_readme_points_to_the_docker_section():
    text = README.read_text()
    assert "docs/DEPLOYMENT.md#docker-compose" in text
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert first_block.strip().splitlines()[:2] == [
        "./run dev     # start the gateway on the embedded default, with demo modules and the admin",
        "./run test    # run the whole test suite (starts real Redis and PostgreSQL servers)",
    ]
