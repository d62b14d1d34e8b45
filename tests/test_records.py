"""``@record`` behaves as ``dataclasses`` does where the two overlap.

One property test generates class bodies (field names, plain defaults, ``field()`` with a default or a
``default_factory``, ``compare``/``repr`` flags, a ``ClassVar``, fields in any order) and the flags
``frozen`` and ``eq``, decorates each body once with ``dataclasses.dataclass`` and once with ``record``,
and checks that the two agree on everything both do: the definition (or its error), the fields and the
class attributes, construction from any arguments, ``repr``, ``==``/``!=``, ``hash``, ``replace``,
assignment and deletion.  The example tests after it check what a comparison cannot: the words of the
errors, a class's own ``__repr__``, the record's own error class, and every record the package defines.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import keyword
import pkgutil
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trio_activate
from trio_activate.model.records import FrozenRecordError, field, record, replace


@dataclasses.dataclass(frozen=True)
class Impl:
    decorate: Callable[..., Any]  # options -> class decorator
    field: Callable[..., Any]


IMPLS = {
    "dataclasses": Impl(lambda **o: dataclasses.dataclass(**{"frozen": True, **o}), dataclasses.field),
    "records": Impl(lambda **o: record(**o), field),
}
ERRORS = (TypeError, AttributeError, ValueError)  # dataclasses' FrozenInstanceError is an AttributeError


def outcome(action: Callable[..., object], *args: Any, **kwargs: Any) -> object:
    """``action(...)``'s result, or the kind of error it raises."""
    try:
        return action(*args, **kwargs)
    except ERRORS as error:
        return next(kind for kind in ERRORS if isinstance(error, kind))


# --- the property test ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One annotated name of a generated class body."""

    name: str
    how: str  # "required", "plain" (name = default), "field" (field(default=...)), "factory", "classvar"
    default: Any = None
    compare: bool = True
    repr: bool = True


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    fields: tuple[FieldSpec, ...]
    frozen: bool
    eq: bool

    def define(self, impl: Impl) -> Any:
        """A fresh class with this body, decorated by `impl` (a new class each time: decorating changes it)"""
        namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": "Item", "__annotations__": {}}
        for spec in self.fields:
            namespace["__annotations__"][spec.name] = "ClassVar[int]" if spec.how == "classvar" else "Any"
            if spec.how in ("plain", "classvar"):
                namespace[spec.name] = spec.default
            elif spec.how == "field":
                namespace[spec.name] = impl.field(default=spec.default, compare=spec.compare, repr=spec.repr)
            elif spec.how == "factory":
                namespace[spec.name] = impl.field(default_factory=list, compare=spec.compare, repr=spec.repr)
            elif spec.compare is False or spec.repr is False:
                namespace[spec.name] = impl.field(compare=spec.compare, repr=spec.repr)
        return impl.decorate(frozen=self.frozen, eq=self.eq)(type("Item", (), namespace))


# "self" too: the generated __init__'s own first parameter must not be taken for it.
names = st.just("self") | st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)
# Hashable values, and a list now and then: a mutable default, which both refuse.
values = st.integers(-2, 2) | st.sampled_from(["", "x", "y'\"é"]) | st.none()
defaults = values | st.just([])


@st.composite
def class_specs(draw: st.DrawFn) -> ClassSpec:
    chosen = draw(st.lists(names, max_size=5, unique=True))
    fields = tuple(
        FieldSpec(
            name,
            draw(st.sampled_from(["required", "required", "plain", "field", "factory", "classvar"])),
            draw(defaults),
            draw(st.booleans()),
            draw(st.booleans()),
        )
        for name in chosen
    )
    return ClassSpec(fields, frozen=draw(st.booleans()), eq=draw(st.booleans()))


def described(cls: Any) -> object:
    """The class side: field names in order, and which have a class attribute with which value."""
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
    else:
        fields = [f.name for f in cls.__record_fields__]
    return fields, {name: getattr(cls, name, "<none>") for name in fields}


def copy_with(instance: Any, **changes: Any) -> Any:
    if hasattr(instance, "__record_fields__"):
        return replace(instance, **changes)
    return dataclasses.replace(instance, **changes)


def behaviour(
    cls: Any, args: list[Any], kwargs: dict[str, Any], other: Any, second: list[Any]
) -> list[object]:
    """Everything one class does with these arguments, as comparable values (errors as their kind)."""
    seen: list[object] = [described(cls), cls.__hash__ is None, cls.__hash__ is object.__hash__]
    item = outcome(cls, *args, **kwargs)
    if isinstance(item, type):  # construction failed: that is the whole story
        return [*seen, item]
    again = outcome(cls, *args, **kwargs)
    twin = outcome(other, *args, **kwargs)
    different = outcome(cls, *second)
    seen += [vars(item), repr(item), item == again, item != again, item == twin, item == different]
    seen.append(item == tuple(vars(item).values()))
    seen.append(outcome(lambda: hash(item) == hash(again)))
    # default_factory: every instance its own object; every other value passed through as is.
    seen.append([getattr(item, n) is getattr(again, n) for n in vars(item)])
    copy = outcome(copy_with, item)
    if not isinstance(copy, type):
        seen += [
            vars(copy),
            copy is item,
            copy == item,
            [getattr(copy, n) is getattr(item, n) for n in vars(item)],
        ]
    first_name = next(iter(vars(item)), None)
    if first_name is not None:
        changed = outcome(copy_with, item, **{first_name: "changed"})
        seen += [changed if isinstance(changed, type) else vars(changed), vars(item)]
    seen.append(outcome(copy_with, item, no_such_field=1))
    for name in [*vars(item), "extra"]:
        seen.append(outcome(setattr, item, name, "assigned"))
        seen.append(outcome(delattr, item, name))
    seen.append(dict(vars(item)))
    return seen


@settings(max_examples=150, deadline=None)
@given(
    spec=class_specs(),
    args=st.lists(values, max_size=6),
    kwargs=st.dictionaries(names | st.just("no_such_field"), values, max_size=3),
    second=st.lists(values, max_size=6),
)
def test_property_records_agree_with_dataclasses(
    spec: ClassSpec, args: list[Any], kwargs: dict[str, Any], second: list[Any]
) -> None:
    results = []
    for impl in IMPLS.values():
        cls = outcome(spec.define, impl)
        if isinstance(cls, type) and cls in ERRORS:
            results.append(cls)  # the definition itself is refused
        else:
            results.append(behaviour(cls, args, kwargs, spec.define(impl), second))
    assert results[1] == results[0]


# --- what a comparison with dataclasses cannot check -----------------------


def define_item(impl: Impl) -> Any:
    f = impl.field

    class Item:
        limit: ClassVar[int] = 10
        a: int
        b: str = "x"
        tags: list[int] = f(default_factory=list, compare=False)
        note: str = f(default="", repr=False)

    return impl.decorate()(Item)


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS)
@pytest.mark.parametrize(
    ("construct", "message"),
    [
        (lambda C: C(1, "y", [], "n", 5), "positional arguments but"),
        (lambda C: C(b="y"), "missing .*'a'"),
        (lambda C: C(1, z=2), "unexpected keyword argument 'z'"),
        (lambda C: C(1, a=2), "multiple values for argument 'a'"),
    ],
    ids=["too-many-positional", "missing-required", "unexpected-keyword", "duplicate-value"],
)
def test_construction_errors_say_what_is_wrong(
    impl: Impl, construct: Callable[[Any], object], message: str
) -> None:
    item = define_item(impl)
    with pytest.raises(TypeError, match=message):
        construct(item)


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS)
def test_a_class_own_repr_is_kept(impl: Impl) -> None:
    class Custom:
        a: int

        def __repr__(self) -> str:
            return "custom"

    assert repr(impl.decorate()(Custom)(1)) == "custom"


def test_frozen_error_is_an_attribute_error() -> None:
    item = define_item(IMPLS["records"])(1)
    with pytest.raises(FrozenRecordError):
        item.a = 2
    assert issubclass(FrozenRecordError, AttributeError)
    assert item.a == 1


def test_a_classvar_written_in_full_is_no_field_either() -> None:
    """The generated bodies spell it ClassVar[...]; the package may write typing.ClassVar[...]."""

    @record
    class Counted:
        total: typing.ClassVar[int] = 0
        a: int

    assert [f.name for f in Counted.__record_fields__] == ["a"]
    assert Counted.total == 0


def package_records() -> list[Any]:
    found = []
    for info in pkgutil.walk_packages(trio_activate.__path__, "trio_activate."):
        if info.name != "trio_activate.__main__":
            module = importlib.import_module(info.name)
            classes = [c for c in vars(module).values() if isinstance(c, type)]
            found += [
                c for c in classes if c.__module__ == module.__name__ and "__record_fields__" in vars(c)
            ]
    return found


@pytest.mark.parametrize("cls", package_records(), ids=lambda c: c.__qualname__)
def test_every_package_record_constructs_from_its_required_fields(cls: Any) -> None:
    names = [f.name for f in cls.__record_fields__]
    assert names == list(inspect.get_annotations(cls))  # in order, none skipped
    # A field with a default keeps it as a class attribute; one without has none.
    fields = cls.__record_fields__
    required = {f.name: object() for f in fields if not hasattr(cls, f.name) and f.default_factory is None}
    item = cls(**required)
    assert list(vars(item)) == names
    assert all(getattr(item, name) is value for name, value in required.items())
    assert repr(item).startswith(f"{cls.__qualname__}(")
    assert vars(replace(item)) == vars(item)
    if cls.__hash__ not in (None, object.__hash__):  # hashable by value
        assert item == replace(item)
        assert hash(item) == hash(replace(item))
