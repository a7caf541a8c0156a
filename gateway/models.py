"""Durable gateway state: modules, route overrides, API clients, breaker history, health."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, router, transaction
from django.db.models import F
from django.utils import timezone

from gateway.config.validation import (
    METHODS,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    endpoint_validator,
    intent_validator,
    module_name_validator,
    module_url_validator,
    validate_module_url,
)
from gateway.state import store

log = logging.getLogger(__name__)

PRIORITY_CHOICES = [("health", "health"), ("analysis", "analysis"), ("other", "other")]
BREAKER_STATES = [("closed", "closed"), ("open", "open"), ("half_open", "half-open")]


# --------------------------------------------------------------------------- config version


class ConfigVersion(models.Model):
    """One row: the configuration version, seen by every process on the database.

    Every write of a ``Module``, ``Route`` or ``ApiClient`` (save, delete, bulk writes
    through :class:`ConfigQuerySet`, ``loaddata``) bumps it in the same transaction
    (:func:`announce_change`), so a committed change cannot miss its bump (a failed bump
    fails the write). Every gateway process compares it with its snapshot's
    (``gateway.config.snapshot``, in a background thread) when there is no Redis. With Redis the
    counter in Redis is the carrier; this row is bumped as well, so it always records that
    a change happened.
    """

    ROW = 1

    version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "configuration version"

    def __str__(self) -> str:
        return f"configuration version {self.version}"

    @classmethod
    def bump(cls, using: str | None = None) -> None:
        """Add one (the row is created when missing, e.g. after a flush)."""
        rows = cls.objects.using(using)
        values = {"version": F("version") + 1, "updated_at": timezone.now()}
        if rows.filter(pk=cls.ROW).update(**values):
            return
        try:
            with transaction.atomic(using=using):
                rows.create(pk=cls.ROW, version=1)
        except IntegrityError:  # another process created it meanwhile
            rows.filter(pk=cls.ROW).update(**values)

    @classmethod
    def lock(cls, using: str | None = None) -> None:
        """Take the row's lock until the transaction ends (``SELECT ... FOR UPDATE``).

        Every configuration write takes this lock before its own rows, so writers queue
        here rather than deadlock on each other's rows. SQLite has no row locks and needs
        none: its transactions are ``IMMEDIATE`` (settings), one writer at a time.
        """
        conn = transaction.get_connection(using)
        if conn.features.has_select_for_update:
            rows = cls.objects.using(using).select_for_update().filter(pk=cls.ROW)
            list(rows.values_list("pk", flat=True))

    @classmethod
    def read(cls) -> int:
        found = cls.objects.filter(pk=cls.ROW).values_list("version", flat=True).first()
        return int(found or 0)


def _announce_committed() -> None:
    """After the commit: this process's counter, and the Redis carrier when configured."""
    store.bump_local()
    store.publish_version()


def announce_change(using: str | None = None) -> None:
    """Record a configuration change: call it inside the writing transaction.

    The ``ConfigVersion`` row is bumped now, in the transaction, so the change and its
    announcement commit (or roll back) together; only the local counter and the Redis
    publish wait for the commit. Once per transaction: a later write in it finds the
    commit hook already queued (a rolled-back savepoint drops the hook with its bump).
    Outside a transaction (the write was autocommitted) the row is bumped at once.
    """
    conn = transaction.get_connection(using)
    if not conn.in_atomic_block:
        ConfigVersion.bump(using)
        _announce_committed()
        return
    if any(func is _announce_committed for _, func, _ in conn.run_on_commit):
        return  # this transaction already bumped
    ConfigVersion.bump(using)
    transaction.on_commit(_announce_committed, using=using)


class ConfigModel(models.Model):
    """A configuration table: a save or delete bumps the version in its own transaction."""

    class Meta:
        abstract = True

    def save(self, *args: Any, **kwargs: Any) -> None:
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        with transaction.atomic(using=using, savepoint=False):
            ConfigVersion.lock(using)
            super().save(*args, **kwargs)  # post_save (gateway.signals) announces it

    save.alters_data = True  # type: ignore[attr-defined]

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        with transaction.atomic(using=using, savepoint=False):
            ConfigVersion.lock(using)
            return super().delete(*args, **kwargs)  # post_delete announces it

    delete.alters_data = True  # type: ignore[attr-defined]


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
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet["Module"].as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

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
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConfigQuerySet["Route"].as_manager()

    class Meta:
        ordering = ["intent"]

    def __str__(self) -> str:
        return self.intent

    def clean(self) -> None:
        from gateway.config.modules import known_module_names
        from gateway.config.routes import CODE_ROUTES

        errors: dict[str, Any] = {}
        if self.module and self.module not in known_module_names():
            errors["module"] = f"Unknown module {self.module!r}."
        if self.timeout is not None and not TIMEOUT_MIN <= self.timeout <= TIMEOUT_MAX:
            errors["timeout"] = f"Timeout must be between {TIMEOUT_MIN} and {TIMEOUT_MAX:g} s."
        if self.intent not in CODE_ROUTES:
            if not self.module:
                errors["module"] = "A new intent needs a module."
            if not self.endpoint:
                errors["endpoint"] = "A new intent needs an endpoint."
        if errors:
            raise ValidationError(errors)


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough (no slow KDF needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


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
