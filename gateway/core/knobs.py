"""The typed knob descriptor behind ``gateway.core.conf.gw``.

``knob("VX11_RETRY_MAX", 3, "…", minimum=0)`` declares a ``Knob[int]``: its type
follows the default (``convert`` changes it), so ``gw.retry_max`` is an ``int`` to
mypy and at run time, and call sites need no casts. The knobs themselves, and the
documentation generated from them, live in ``gateway.core.conf``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, cast, overload

from vx11site.env import env_bool, env_float, env_int, env_list, env_str

Kind = Literal["bool", "int", "float", "str", "list"]


def _attr(env: str) -> str:
    return env.removeprefix("VX11_").lower()


class Settings(Protocol):
    """The class a knob is declared on (``gateway.core.conf.GatewaySettings``)."""

    def values(self) -> dict[str, Any]:
        """Every knob's value by attribute name, loaded on first use."""
        ...


class Knob[T]:
    """One ``VX11_*`` variable, declared once as a typed attribute of a settings class.

    A non-data descriptor: the first read of any knob loads every value into the
    instance's ``__dict__``, which shadows the descriptors, so later reads are plain
    attribute lookups; ``reload()`` removes them again.
    """

    __slots__ = ("convert", "default", "env", "help", "kind", "minimum", "name", "secret")

    def __init__(
        self,
        env: str,
        default: Any,
        help: str,
        *,
        minimum: float | None = None,
        secret: bool = False,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        self.env = env
        self.kind: Kind = _kind(default)
        self.default = default
        self.help = help
        self.minimum = minimum
        self.secret = secret
        self.convert = convert
        self.name = _attr(env)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        if name != self.name:
            raise TypeError(f"{self.env} must be declared as {self.name!r}, not {name!r}")

    def __repr__(self) -> str:
        return f"Knob({self.env!r}, {self.default!r})"

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> Knob[T]: ...
    @overload
    def __get__(self, obj: Settings, owner: type[Any] | None = None) -> T: ...
    def __get__(self, obj: Settings | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return self
        return obj.values()[self.name]

    def read(self) -> T:
        """The value from the environment (``EnvError`` when it is invalid)."""
        value: Any
        match self.kind:
            case "bool":
                value = env_bool(self.env, self.default)
            case "int":
                minimum = None if self.minimum is None else int(self.minimum)
                value = env_int(self.env, self.default, minimum=minimum)
            case "float":
                value = env_float(self.env, self.default, minimum=self.minimum)
            case "list":
                value = env_list(self.env, self.default)
            case _:
                value = env_str(self.env, self.default)
        return cast("T", value if self.convert is None else self.convert(value))


def _kind(default: object) -> Kind:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return "list" if isinstance(default, list) else "str"


# The declared type of a knob follows its default (``convert`` changes it).
@overload
def knob(env: str, default: bool, help: str) -> Knob[bool]: ...
@overload
def knob(env: str, default: int, help: str, *, minimum: int | None = None) -> Knob[int]: ...
@overload
def knob(env: str, default: float, help: str, *, minimum: float | None = None) -> Knob[float]: ...
@overload
def knob[R](
    env: str,
    default: float,
    help: str,
    *,
    minimum: float | None = None,
    convert: Callable[[float], R],
) -> Knob[R]: ...
@overload
def knob(env: str, default: str, help: str, *, secret: bool = False) -> Knob[str]: ...
@overload
def knob[R](env: str, default: str, help: str, *, convert: Callable[[str], R]) -> Knob[R]: ...
@overload
def knob(env: str, default: list[str], help: str, *, secret: bool = False) -> Knob[list[str]]: ...
@overload
def knob[R](
    env: str, default: list[str], help: str, *, convert: Callable[[list[str]], R]
) -> Knob[R]: ...
def knob(
    env: str,
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    secret: bool = False,
    convert: Callable[[Any], Any] | None = None,
) -> Knob[Any]:
    """Declare a knob: an attribute of the settings class named after ``env``."""
    return Knob(env, default, help, minimum=minimum, secret=secret, convert=convert)
