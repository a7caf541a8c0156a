"""Durable gateway state: modules, route overrides, API clients, breaker history, health."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction

from gateway.config import fallbacks
from gateway.config import modules as pools
from gateway.config.modules import CODE_MODULES, ModuleInfo, env_overrides
from gateway.config.routes import CODE_ROUTES
from gateway.config.shapes import (
    MODULE_FIELDS,
    ModuleSettings,
    RouteFields,
    check_model,
    values_of,
)
from gateway.config.validation import (
    METHODS,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    endpoint_validator,
    intent_validator,
    module_name_validator,
    module_url_validator,
    stream_bound_errors,
    validate_module_url,
)
from gateway.config.versioning import ConfigModel
from gateway.config.versioning import ConfigVersion as ConfigVersion
from gateway.config.versioning import announce_change as announce_change
from gateway.core.tokens import hash_token

log = logging.getLogger(__name__)

PRIORITY_CHOICES = [("health", "health"), ("analysis", "analysis"), ("other", "other")]
BREAKER_STATES = [("closed", "closed"), ("open", "open"), ("half_open", "half-open")]


class ConfigQuerySet[M: models.Model](models.QuerySet[M]):
    """Bulk writes send no signals: each takes the version lock, then bumps in its transaction."""

    @contextlib.contextmanager
    def _write(self) -> Iterator[list[int]]:
        """The write runs in a transaction; a row count put in the list announces it."""
        counted: list[int] = []
        with transaction.atomic(using=self.db, savepoint=False):
            ConfigVersion.lock(self.db)
            yield counted
            if any(counted):
                announce_change(self.db)

    def update(self, **kwargs: Any) -> int:
        with self._write() as counted:
            rows = super().update(**kwargs)
            counted.append(rows)
        return rows

    def bulk_create(self, objs: Iterable[M], *args: Any, **kwargs: Any) -> list[M]:
        with self._write() as counted:
            created = super().bulk_create(objs, *args, **kwargs)
            counted.append(len(created))
        return created

    def bulk_update(
        self, objs: Iterable[M], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        with self._write() as counted:
            rows = super().bulk_update(objs, fields, batch_size)
            counted.append(rows)
        return rows

    def delete(self) -> tuple[int, dict[str, int]]:
        with self._write() as counted:
            result = super().delete()
            counted.append(result[0])
        return result


class Module(ConfigModel):
    """A backend module. The row overrides the code default and the env URL."""

    name = models.CharField(max_length=40, unique=True, validators=[module_name_validator])
    url = models.CharField(
        max_length=255,
        blank=True,
        validators=[module_url_validator],
        help_text="http(s)://host[:port]. Empty: the env override or code default.",
    )
    health_path = models.CharField(
        max_length=200, default="/health", validators=[endpoint_validator]
    )
    enabled = models.BooleanField(default=True)
    # Per-module breaker settings; empty = the VX11_CB_* default.
    failure_threshold = models.PositiveIntegerField(null=True, blank=True)
    recovery_timeout = models.FloatField(null=True, blank=True)
    half_open_max_calls = models.PositiveIntegerField(null=True, blank=True)
    success_threshold = models.PositiveIntegerField(null=True, blank=True)
    failure_rate_threshold = models.FloatField(
        null=True, blank=True, help_text="Optional: trip when failures/calls ≥ this (0–1)."
    )
    window_seconds = models.FloatField(
        null=True, blank=True, help_text="Sliding window for the failure rate."
    )
    min_calls = models.PositiveIntegerField(
        null=True, blank=True, help_text="Calls needed in the window to judge a rate."
    )
    # Bulkhead (SPEC §10); empty = VX11_MODULE_<NAME>_MAX_CONCURRENT, 0 = only the process cap.
    max_concurrent = models.PositiveIntegerField(
        null=True, blank=True, help_text="Upstream calls in flight at once (0: no own cap)."
    )
    # The choice of a target (SPEC §18); empty = VX11_MODULE_<NAME>_LB, else least_request.
    lb = models.CharField(
        "load balancing", max_length=20, blank=True, choices=[(p, p) for p in pools.LB_POLICIES]
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet["Module"].as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def info(self) -> ModuleInfo:
        """This row as a module-table entry (an empty URL inherits, in ``build_modules``)."""
        settings = values_of(self, MODULE_FIELDS)
        return ModuleInfo(
            self.name, self.url, self.health_path, self.enabled, "database", **settings
        )

    def clean(self) -> None:
        if self.url:
            with contextlib.suppress(ValidationError):  # the field validator reports it
                self.url = validate_module_url(self.url)  # normalised form
        if self.failure_rate_threshold is not None and not 0 < self.failure_rate_threshold <= 1:
            raise ValidationError({"failure_rate_threshold": "Must be between 0 and 1."})
        if (self.failure_rate_threshold is None) != (self.window_seconds is None):
            raise ValidationError("Set both the failure-rate threshold and its window, or neither.")


class Route(ConfigModel):
    """A database override of the code route table (empty field = inherit the code value)."""

    intent = models.CharField(max_length=40, unique=True, validators=[intent_validator])
    module = models.CharField(max_length=40, blank=True, validators=[module_name_validator])
    endpoint = models.CharField(max_length=255, blank=True, validators=[endpoint_validator])
    method = models.CharField(max_length=8, blank=True, choices=[(m, m) for m in METHODS])
    timeout = models.FloatField(null=True, blank=True, help_text="Seconds, 0.1–600.")
    description = models.CharField(max_length=255, blank=True)
    auth_required = models.BooleanField(null=True, blank=True)
    priority = models.CharField(max_length=10, blank=True, choices=PRIORITY_CHOICES)
    protected = models.BooleanField(null=True, blank=True)
    streaming = models.BooleanField(null=True, blank=True)
    context7 = models.BooleanField(null=True, blank=True)
    retry_post = models.BooleanField(
        null=True, blank=True, help_text="Retry POST when the client sends Idempotency-Key."
    )
    # Streaming timeouts (SPEC §20), for routes with streaming on.
    idle_timeout = models.FloatField(
        null=True, blank=True, help_text="Streams: most seconds between two chunks (0.1–3600)."
    )
    max_duration = models.FloatField(
        null=True, blank=True, help_text="Streams: most seconds for the whole answer (1–86400)."
    )
    # Fallbacks (SPEC §19): [{"module", "endpoint", "method"?}, …] tried in order, ≤ 3.
    fallbacks = models.JSONField(null=True, blank=True, help_text="Ordered fallback options.")
    fallback_on = models.CharField(
        max_length=100,
        blank=True,
        help_text="Comma list of circuit_open, overloaded, unavailable, timeout, 5xx, 429.",
    )
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet["Route"].as_manager()

    class Meta:
        ordering = ["intent"]

    def __str__(self) -> str:
        return self.intent

    def clean(self) -> None:
        errors: dict[str, Any] = {}
        if self.module and self.module not in known_module_names():
            errors["module"] = f"Unknown module {self.module!r}."
        if self.timeout is not None and not TIMEOUT_MIN <= self.timeout <= TIMEOUT_MAX:
            errors["timeout"] = f"Timeout must be between {TIMEOUT_MIN} and {TIMEOUT_MAX:g} s."
        errors.update(stream_bound_errors(self.idle_timeout, self.max_duration))
        if self.intent not in CODE_ROUTES:
            if not self.module:
                errors["module"] = "A new intent needs a module."
            if not self.endpoint:
                errors["endpoint"] = "A new intent needs an endpoint."
        errors.update(self._fallback_errors())
        if errors:
            raise ValidationError(errors)

    def _fallback_errors(self) -> dict[str, Any]:
        """SPEC §19: ``fallbacks`` and ``fallback_on`` checked, then stored in their
        canonical form (methods upper-case, triggers in their documented order)."""
        errors: dict[str, Any] = {}
        if self.fallbacks:
            base = CODE_ROUTES.get(self.intent)
            primary = self.module or (base.module if base else "")
            found = fallbacks.fallback_errors(self.fallbacks, primary, known_module_names())
            if found:
                errors["fallbacks"] = found
            else:
                self.fallbacks = fallbacks.normalise(self.fallbacks)
        if (problem := fallbacks.fallback_on_error(self.fallback_on)) is not None:
            errors["fallback_on"] = problem
        elif self.fallback_on:
            self.fallback_on = fallbacks.normalise_fallback_on(self.fallback_on)
        return errors


class Target(ConfigModel):
    """One target (replica) of a module (SPEC §1, §18). A module with target rows is called
    at them: they replace its row's, the env's and the code's URLs."""

    module = models.ForeignKey(Module, on_delete=models.CASCADE, related_name="targets")
    url = models.CharField(
        "URL", max_length=255, validators=[module_url_validator], help_text="http(s)://host[:port]."
    )
    weight = models.PositiveIntegerField(
        default=pools.WEIGHT_DEFAULT,
        validators=[MinValueValidator(pools.WEIGHT_MIN), MaxValueValidator(pools.WEIGHT_MAX)],
        help_text=f"Share of the traffic, {pools.WEIGHT_MIN}–{pools.WEIGHT_MAX}.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet["Target"].as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["module", "url"], name="gateway_target_module_url")
        ]

    def __str__(self) -> str:
        return self.url

    def info(self) -> pools.TargetInfo:
        return pools.TargetInfo(self.url, self.weight, self.enabled, self.pk)

    def clean(self) -> None:
        try:
            self.url = validate_module_url(self.url)  # normalised form
        except ValidationError:
            return  # the field validator reports it
        if self.module_id is None:
            return
        key = pools.target_key(self.url)
        others = Target.objects.filter(module_id=self.module_id).exclude(pk=self.pk)
        if any(pools.target_key(url) == key for url in others.values_list("url", flat=True)):
            raise ValidationError({"url": f"The module has a target at {key} already."})


def known_module_names() -> set[str]:
    """Every module name that exists now (synchronous: admin/API validation only)."""
    names = set(CODE_MODULES) | set(env_overrides()[0])
    names.update(Module.objects.values_list("name", flat=True))
    return names


def new_token() -> str:
    return "vx11_" + secrets.token_urlsafe(32)


class ApiClient(ConfigModel):
    """A program allowed to call the gateway. Only the token's hash is stored."""

    name = models.CharField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_prefix = models.CharField(
        max_length=12, editable=False, help_text="First characters of the token, to recognise it."
    )
    is_admin = models.BooleanField(default=False, help_text="May use the management API.")
    active = models.BooleanField(default=True)
    rate_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests per window; empty = default."
    )
    protected_rate_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Protected requests per window; empty = default."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet["ApiClient"].as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = "API client"

    def __str__(self) -> str:
        return self.name

    def set_new_token(self) -> str:
        """Give the client a fresh token; returns it (the only time it is visible)."""
        token = new_token()
        self.token_hash = hash_token(token)
        self.token_prefix = token[:10]
        return token


class BreakerState(models.Model):
    """Last known breaker state per module, for the admin (the live state is in the store)."""

    module = models.CharField(max_length=40, unique=True)
    state = models.CharField(max_length=10, choices=BREAKER_STATES, default="closed")
    forced = models.CharField(max_length=10, blank=True)
    failure_count = models.PositiveIntegerField(default=0)
    last_failure = models.DateTimeField(null=True, blank=True)
    opened_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["module"]

    def __str__(self) -> str:
        return f"{self.module}: {self.state}"


class BreakerCommand(models.Model):
    """An operator's breaker action for the gateway processes to apply (no Redis).

    Written by ``force_breaker`` (API, admin, ``manage.py breaker``) and announced with a
    version bump; each gateway process applies the ones it did not issue itself when it
    sees the bump (``gateway.operations.registry.BreakerCommands``). With Redis the action goes to the
    shared state directly and no row is written.
    """

    module = models.CharField(max_length=40)
    action = models.CharField(max_length=12)
    #: The process that already applied it ("" when none did, e.g. a management command).
    origin = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.module}: {self.action}"


class BreakerTransition(models.Model):
    """One breaker state change (read-only history)."""

    module = models.CharField(max_length=40, db_index=True)
    from_state = models.CharField(max_length=10, choices=BREAKER_STATES)
    to_state = models.CharField(max_length=10, choices=BREAKER_STATES)
    reason = models.CharField(max_length=60)
    at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["module", "-at"])]

    def __str__(self) -> str:
        return f"{self.module}: {self.from_state} → {self.to_state} ({self.reason})"


class ModuleHealth(models.Model):
    """Result of the latest active health probe of a module."""

    module = models.CharField(max_length=40, unique=True)
    status = models.CharField(max_length=10, default="unknown")  # up | down | unknown
    latency_ms = models.FloatField(null=True, blank=True)
    last_check = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["module"]
        verbose_name_plural = "module health"

    def __str__(self) -> str:
        return f"{self.module}: {self.status}"


# The columns of the configuration tables follow their shapes (gateway.config.shapes).
check_model(Module, ModuleSettings)
check_model(Route, RouteFields)
