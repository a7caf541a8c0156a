"""The module registry: code defaults, overlaid by env, overlaid by ``Module`` rows.

A module is a pool of targets (SPEC §1, §18): its ``Target`` rows when it has any, else the
``Module`` row's URL, else the env list (``VX11_MODULE_<NAME>_URL=http://a:1,http://b:1``),
else the code default. ``ModuleInfo.targets`` holds them; ``ModuleInfo.url`` is the first
enabled one's, for code that calls one address.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

from gateway.config.shapes import ModuleSettings
from gateway.config.validation import validate_module_url

log = logging.getLogger("gateway.modules")

CODE_MODULES: dict[str, str] = {
    "madre": "http://127.0.0.1:8001",
    "switch": "http://127.0.0.1:8002",
    "hermes": "http://127.0.0.1:8003",
    "hormiguero": "http://127.0.0.1:8004",
    "manifestator": "http://127.0.0.1:8005",
    "mcp": "http://127.0.0.1:8006",
    "shub": "http://127.0.0.1:8007",
    "spawner": "http://127.0.0.1:8008",
    "operator": "http://127.0.0.1:8011",
}
ENV_ALIASES = {"shub": ("VX11_SHUB_UPSTREAM",)}

#: The choice of a target (SPEC §18; ``gateway.policies.balancer`` implements them).
LEAST_REQUEST, ROUND_ROBIN, SESSION = "least_request", "round_robin", "session"
LB_POLICIES: tuple[str, ...] = (LEAST_REQUEST, ROUND_ROBIN, SESSION)
WEIGHT_MIN, WEIGHT_MAX, WEIGHT_DEFAULT = 1, 1000, 100
_DEFAULT_PORTS = {"http": 80, "https": 443}


def target_key(url: str) -> str:
    """``host:port`` of a target URL (IPv6 as ``[h]:p``; the scheme's port when none is
    written): the ``target`` metric label and the ``X-VX11-Target`` value (SPEC §12, §18)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme, 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """One target (replica) of a module, as the snapshot carries it.

    It is what ``gateway.policies.balancer.TargetSpec`` reads (``key``, ``url``, ``weight``,
    ``enabled``): ``Balancer.pool(module, info.targets)`` takes the tuple as it is.
    """

    url: str  # normalised http(s)://host[:port] (validate_module_url)
    weight: int = WEIGHT_DEFAULT  # 1–1000
    enabled: bool = True
    id: int | None = None  # the Target row's id; None for env/code targets
    #: ``host:port`` (computed from ``url``).
    key: str = field(init=False, default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", target_key(self.url))

    def as_dict(self) -> dict[str, object]:
        """Its configuration for operators (``GET /vx11/modules``)."""
        return {
            "id": self.id,
            "url": self.url,
            "weight": self.weight,
            "enabled": self.enabled,
            "key": self.key,
        }


@dataclass(frozen=True, slots=True)
class ModuleInfo(ModuleSettings):
    """One module of the effective table, with its own settings (keyword-only).

    In the effective table (:func:`build_modules`) ``max_concurrent`` is resolved: the row's
    value, else ``VX11_MODULE_<NAME>_MAX_CONCURRENT``, else 0 (no cap of its own); so is
    ``lb``: the row's, else ``VX11_MODULE_<NAME>_LB``, else ``least_request``; and
    ``targets`` is never empty for a module with a URL. Built from a URL alone, a module has
    that URL as its one target; built from targets alone, ``url`` is the first enabled one's
    (the first one's when none is enabled).
    """

    name: str
    url: str
    health_path: str = "/health"
    enabled: bool = True
    source: str = "code"  # code | env | database
    lb: str = field(default=LEAST_REQUEST, kw_only=True)
    targets: tuple[TargetInfo, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        if not self.targets and self.url:
            object.__setattr__(self, "targets", (TargetInfo(self.url),))
        elif self.targets and not self.url:
            object.__setattr__(self, "url", first_url(self.targets))


def first_url(targets: tuple[TargetInfo, ...]) -> str:
    """The first enabled target's URL (the first one's when none is enabled)."""
    for t in targets:
        if t.enabled:
            return t.url
    return targets[0].url if targets else ""


def parse_url_list(value: str) -> tuple[str, ...]:
    """A comma-separated list of module URLs, each validated and normalised; an invalid
    item, an empty one or two with the same ``host:port`` is a ``ValidationError`` naming it."""
    urls: list[str] = []
    keys: dict[str, str] = {}
    for n, raw in enumerate(value.split(","), 1):
        item = raw.strip()
        if not item:
            raise ValidationError(f"item {n} is empty.")
        try:
            url = validate_module_url(item)
        except ValidationError as exc:
            raise ValidationError(f"item {n} ({item!r}): {exc.messages[0]}") from exc
        key = target_key(url)
        if key in keys:
            raise ValidationError(
                f"item {n} ({item!r}): duplicate target {key} (already {keys[key]!r})."
            )
        keys[key] = item
        urls.append(url)
    return tuple(urls)


def env_overrides() -> tuple[dict[str, str], list[str]]:
    """The first URL of each env list, and the errors of the invalid lists."""
    found, errors = env_targets()
    return {name: urls[0] for name, urls in found.items()}, errors


def env_targets() -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Target URL lists from the environment, and the errors of the invalid ones (an
    invalid list is ignored whole: the module keeps its code default)."""
    sources: dict[str, tuple[str, str]] = {}
    for key, value in os.environ.items():
        if key.startswith("VX11_MODULE_") and key.endswith("_URL") and len(key) > 16:
            sources[key[12:-4].lower()] = (key, value)
    for name, aliases in ENV_ALIASES.items():
        for alias in aliases:
            if name not in sources and alias in os.environ:
                sources[name] = (alias, os.environ[alias])
    found: dict[str, tuple[str, ...]] = {}
    errors: list[str] = []
    for name, (var, value) in sources.items():
        try:
            found[name] = parse_url_list(value)
        except ValidationError as exc:
            errors.append(f"{var}: {exc.messages[0]}")
    return found, errors


LB_SUFFIX = "_LB"


def env_lbs() -> tuple[dict[str, str], list[str]]:
    """``VX11_MODULE_<NAME>_LB`` by module name, and the errors of the invalid ones."""
    found: dict[str, str] = {}
    errors: list[str] = []
    for key, value in os.environ.items():
        if key.startswith("VX11_MODULE_") and key.endswith(LB_SUFFIX) and len(key) > 15:
            lb = value.strip().lower()
            if lb in LB_POLICIES:
                found[key[12 : -len(LB_SUFFIX)].lower()] = lb
            else:
                errors.append(f"{key}: must be one of {', '.join(LB_POLICIES)}, not {value!r}.")
    return found, errors


CAP_SUFFIX = "_MAX_CONCURRENT"


def env_caps() -> dict[str, int]:
    """``VX11_MODULE_<NAME>_MAX_CONCURRENT`` by module name (an invalid one is logged, skipped)."""
    found: dict[str, int] = {}
    for key, value in os.environ.items():
        if key.startswith("VX11_MODULE_") and key.endswith(CAP_SUFFIX) and len(key) > 27:
            try:
                cap = int(value.strip())
                if cap < 0:
                    raise ValueError(value)
            except ValueError:
                log.error(
                    "ignoring invalid module cap from the environment",
                    extra={"detail": f"{key}: must be a whole number >= 0, not {value!r}"},
                )
                continue
            found[key[12 : -len(CAP_SUFFIX)].lower()] = cap
    return found


def build_modules(
    rows: list[ModuleInfo], targets: dict[str, tuple[TargetInfo, ...]] | None = None
) -> dict[str, ModuleInfo]:
    """The effective module table from code, env and database rows (rows with url='' inherit).

    ``targets``: the ``Target`` rows by module name; a module that has any is called at
    those (they replace the row's, the env's and the code's URLs)."""
    table = {name: ModuleInfo(name, url, lb="") for name, url in CODE_MODULES.items()}
    env, errors = env_targets()
    for message in errors:
        log.error("ignoring invalid module URL from the environment", extra={"detail": message})
    for name, urls in env.items():
        table[name] = ModuleInfo(
            name, urls[0], source="env", lb="", targets=tuple(TargetInfo(u) for u in urls)
        )
    pools = targets or {}
    for row in rows:
        base = table.get(row.name)
        pool = pools.get(row.name, ())
        if pool:
            url, found, source = first_url(pool), pool, "database"
        elif row.url:
            url, found, source = row.url, (TargetInfo(row.url),), "database"
        elif base is not None:
            url, found, source = base.url, base.targets, base.source
        else:
            log.error("module has no URL", extra={"gw_module": row.name})
            continue
        table[row.name] = replace(row, url=url, source=source, targets=found)
    _resolve_env_settings(table)
    return table


def _resolve_env_settings(table: dict[str, ModuleInfo]) -> None:
    """Settings a row leaves empty: from ``VX11_MODULE_<NAME>_*``, else the defaults."""
    caps = env_caps()
    lbs, errors = env_lbs()
    for message in errors:
        log.error(
            "ignoring invalid balancing policy from the environment", extra={"detail": message}
        )
    for name, info in table.items():
        if info.max_concurrent is None or not info.lb:
            table[name] = replace(
                info,
                max_concurrent=caps.get(name, 0)
                if info.max_concurrent is None
                else info.max_concurrent,
                lb=info.lb or lbs.get(name, LEAST_REQUEST),
            )
