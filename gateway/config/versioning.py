"""The configuration version, and how every configuration write announces itself.

``ConfigVersion`` is a model of the ``gateway`` app (its table is ``gateway_configversion``);
it lives here with the write path that bumps it, and ``gateway.models`` re-exports it.
``ConfigModel`` is the base of the configuration tables (``gateway.models.ConfigQuerySet``
announces their bulk writes).
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, models, router, transaction
from django.db.models import F
from django.utils import timezone

from gateway.state import store


class ConfigVersion(models.Model):
    """One row: the configuration version, seen by every process on the database.

    Every write of a ``Module``, ``Route`` or ``ApiClient`` (save, delete, bulk writes
    through ``gateway.models.ConfigQuerySet``, ``loaddata``) bumps it in the same transaction
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
