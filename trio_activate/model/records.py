"""``@record``: dataclass-style classes that cost next to nothing to define.

Layer 1: pure.  Why not ``dataclasses``: a dataclass compiles its generated
``__init__``, ``__eq__``, ``__hash__``, ``__repr__`` and frozen
``__setattr__`` from source text when the class is defined, about 0.5 ms
per class on the machines this project measures on.  The service's start-up
path defines twenty such classes, which made about 10 ms of what a
self-activated ``serve`` spent beyond a bare Trio script (benchmarks/,
scenario 3).  ``@record`` gives the same methods as plain functions shared
by every record class, so defining one costs microseconds.

What it supports is what this package uses, with dataclass semantics:
fields from the class's own annotations, in order; defaults and
``field(default_factory=..., compare=False, repr=False)``; ``frozen``
(default) and ``eq``; ``replace()``.  No inheritance between records, no
``__post_init__``, no ordering, no pattern matching, no ``dataclasses.fields``;
a ``ClassVar[...]`` annotation (written so) is skipped, as in dataclasses.
What it does not support it refuses when the class is defined (a base
that is a record, a method of its own that it would replace, a mutable
default), rather than misbehave later.  Type checkers see it as a
dataclass transform (PEP 681), so constructors are checked as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["FrozenRecordError", "field", "record", "replace"]

_T = TypeVar("_T")
_MISSING: Any = object()


class FrozenRecordError(AttributeError):
    """Assigning to a field of a frozen record."""


class Field:
    """One field's options; ``field()`` makes them."""

    __slots__ = ("compare", "default", "default_factory", "name", "repr")

    def __init__(
        self, default: Any, default_factory: Callable[[], Any] | None, compare: bool, repr: bool
    ) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.compare = compare
        self.repr = repr


def field(
    *,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] | None = None,
    compare: bool = True,
    repr: bool = True,
) -> Any:
    """A field with options, as ``dataclasses.field``: ``x: list[int] = field(default_factory=list)``."""
    return Field(default, default_factory, compare, repr)


@overload
def record(cls: type[_T], /) -> type[_T]: ...
@overload
def record(*, frozen: bool = True, eq: bool = True) -> Callable[[type[_T]], type[_T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[_T] | None = None, /, *, frozen: bool = True, eq: bool = True) -> Any:
    """Make ``cls`` a record: ``@record`` (frozen), ``@record(frozen=False)``, ``@record(eq=False)``."""

    def make(cls: type[_T]) -> type[_T]:
        if any(hasattr(base, "__record_fields__") for base in cls.__mro__[1:]):
            raise TypeError(f"{cls.__name__}: a record cannot inherit from a record")
        replaced = {"__init__"} | ({"__eq__", "__hash__"} if eq else set())
        replaced |= {"__setattr__", "__delattr__"} if frozen else set()
        own = sorted(replaced & cls.__dict__.keys())
        if own:
            raise TypeError(f"{cls.__name__}: @record would replace its own {', '.join(own)}")
        target: Any = cls  # methods are set on the class itself, as dataclasses does
        fields = _collect_fields(cls)
        target.__record_fields__ = fields
        target.__init__ = _init
        if "__repr__" not in cls.__dict__:
            target.__repr__ = _repr
        if eq:
            target.__eq__ = _eq
            # As dataclasses: frozen and eq make it hashable by value; eq alone, unhashable.
            target.__hash__ = _hash if frozen else None
        if frozen:
            target.__setattr__ = _frozen_setattr
            target.__delattr__ = _frozen_delattr
        return cls

    return make if cls is None else make(cls)


def replace(instance: _T, /, **changes: Any) -> _T:
    """A copy of the record ``instance`` with ``changes`` applied, as ``dataclasses.replace``."""
    values = {f.name: getattr(instance, f.name) for f in type(instance).__record_fields__}  # type: ignore[attr-defined]
    return type(instance)(**(values | changes))  # an unknown field is the constructor's TypeError


def _collect_fields(cls: type) -> tuple[Field, ...]:
    fields = []
    # The class's own annotations, in order, as inspect.get_annotations(cls)
    # gives them, without importing inspect (about 5 ms: ast, dis, tokenize):
    # since Python 3.10 a class's __annotations__ is its own, never a base's.
    annotations: dict[str, Any] = cls.__annotations__
    for name, annotation in annotations.items():
        # Annotations are strings here (``from __future__ import annotations``).
        if str(annotation).startswith(("ClassVar[", "typing.ClassVar[")) or annotation == "ClassVar":
            continue
        value = cls.__dict__.get(name, _MISSING)
        item = value if isinstance(value, Field) else Field(value, None, True, True)
        if item.default is not _MISSING and item.default_factory is not None:
            raise ValueError(f"{cls.__name__}.{name}: both a default and a default_factory")
        if isinstance(item.default, (list, dict, set)):  # shared by every instance: a bug, as in dataclasses
            raise ValueError(f"{cls.__name__}.{name}: a mutable default; use field(default_factory=...)")
        item.name = name
        if isinstance(value, Field):
            if item.default is _MISSING:
                delattr(cls, name)  # no class attribute standing in for a per-instance value
            else:
                setattr(cls, name, item.default)
        fields.append(item)
    # Once every field is read, as dataclasses checks it: a mutable default
    # anywhere is the error to report before the order of the fields.
    seen_default = False
    for item in fields:
        has_default = item.default is not _MISSING or item.default_factory is not None
        if seen_default and not has_default:
            raise TypeError(
                f"{cls.__name__}.{item.name}: a field without a default follows one with a default"
            )
        seen_default = seen_default or has_default
    return tuple(fields)


def _init(self: Any, /, *args: Any, **kwargs: Any) -> None:  # "/": a field may be named self
    fields = type(self).__record_fields__
    name = type(self).__name__
    if len(args) > len(fields):
        raise TypeError(f"{name}() takes {len(fields)} positional arguments but {len(args)} were given")
    for index, item in enumerate(fields):
        if index < len(args):
            if item.name in kwargs:
                raise TypeError(f"{name}() got multiple values for argument {item.name!r}")
            value = args[index]
        elif item.name in kwargs:
            value = kwargs.pop(item.name)
        elif item.default_factory is not None:
            value = item.default_factory()
        elif item.default is not _MISSING:
            value = item.default
        else:
            raise TypeError(f"{name}() missing required argument {item.name!r}")
        object.__setattr__(self, item.name, value)
    if kwargs:  # every field's keyword was taken above
        raise TypeError(f"{name}() got an unexpected keyword argument {sorted(kwargs)[0]!r}")


def _compared(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, f.name) for f in type(self).__record_fields__ if f.compare)


def _eq(self: Any, other: object) -> object:  # bool, or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _compared(self) == _compared(other)


def _hash(self: Any) -> int:
    return hash(_compared(self))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in type(self).__record_fields__ if f.repr)
    return f"{type(self).__qualname__}({shown})"


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")
