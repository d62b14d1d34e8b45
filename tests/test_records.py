"""``@record`` behaves as ``dataclasses`` does where the two overlap: each behaviour is run on the same
class body decorated once with ``dataclasses.dataclass`` and once with ``record``, and compared."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from hypothesis import given
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
# The package's conversions: @dataclass(frozen=True) -> @record, @dataclass -> @record(frozen=False), ...
FLAVOURS: dict[str, dict[str, bool]] = {
    "frozen": {},
    "mutable": {"frozen": False},
    "identity": {"frozen": False, "eq": False},
    "frozen-identity": {"eq": False},
}


def define_item(impl: Impl, options: dict[str, bool]) -> Any:
    f = impl.field

    class Item:
        limit: ClassVar[int] = 10  # not a field, and its default does not count as one
        a: int
        b: str = "x"
        tags: list[int] = f(default_factory=list, compare=False)
        note: str = f(default="", repr=False)

    return impl.decorate(**options)(Item)


CLASSES = {(i, fl): define_item(IMPLS[i], opts) for i in IMPLS for fl, opts in FLAVOURS.items()}


def copy_with(instance: Any, **changes: Any) -> Any:
    if hasattr(instance, "__record_fields__"):
        return replace(instance, **changes)
    return dataclasses.replace(instance, **changes)


def field_names(cls: Any) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return [f.name for f in cls.__record_fields__]


def outcome(action: Callable[..., object], *args: Any) -> object:
    """``action(*args)``'s result, or the kind of error it raises (FrozenInstanceError: AttributeError)."""
    try:
        return action(*args)
    except (TypeError, AttributeError, ValueError) as error:
        return next(k for k in (TypeError, AttributeError, ValueError) if isinstance(error, k))


def same_as_dataclasses(flavour: str, scenario: Callable[[Any, Any], object]) -> object:
    """Run ``scenario(Item, OtherItem)`` under both; the outcomes agree.  Returns the record's."""
    outcomes = []
    for impl in IMPLS.values():
        options = FLAVOURS[flavour]
        outcomes.append(outcome(scenario, define_item(impl, options), define_item(impl, options)))
    assert outcomes[1] == outcomes[0]
    return outcomes[1]


Scenario = Callable[[Any, Any], object]
CONSTRUCTION: dict[str, tuple[Scenario, object]] = {
    "positional": (lambda C, _: vars(C(1, "y", [2], "n")), {"a": 1, "b": "y", "tags": [2], "note": "n"}),
    "keyword": (lambda C, _: vars(C(note="n", a=1)), {"a": 1, "b": "x", "tags": [], "note": "n"}),
    "defaults": (lambda C, _: vars(C(1)), {"a": 1, "b": "x", "tags": [], "note": ""}),
    "too-many-positional": (lambda C, _: C(1, "y", [], "n", 5), TypeError),
    "missing-required": (lambda C, _: C(b="y"), TypeError),
    "unexpected-keyword": (lambda C, _: C(1, z=2), TypeError),
    "classvar-is-no-keyword": (lambda C, _: C(1, limit=2), TypeError),
    "duplicate-value": (lambda C, _: C(1, a=2), TypeError),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case", CONSTRUCTION)
def test_construction(flavour: str, case: str) -> None:
    scenario, expected = CONSTRUCTION[case]
    assert same_as_dataclasses(flavour, scenario) == expected


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS)
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("too-many-positional", "positional arguments but"),
        ("missing-required", "missing .*'a'"),
        ("unexpected-keyword", "unexpected keyword argument 'z'"),
        ("duplicate-value", "multiple values for argument 'a'"),
    ],
)
def test_construction_errors_say_what_is_wrong(impl: Impl, case: str, message: str) -> None:
    item = define_item(impl, {})
    with pytest.raises(TypeError, match=message):
        CONSTRUCTION[case][0](item, item)


def class_side(C: Any, _: Any) -> object:
    first, second = C(1), C(1)
    return (field_names(C), hasattr(C, "tags"), C.b, C.note, C.limit, first.tags is second.tags)


def test_class_attributes_classvar_and_fresh_default_factory() -> None:
    # No class attribute for a default_factory field; a default stays one; each instance its own list.
    expected = (["a", "b", "tags", "note"], False, "x", "", 10, False)
    assert same_as_dataclasses("frozen", class_side) == expected


def hash_equal(C: Any, _: Any) -> object:
    first, second = C(1, tags=[1], note="p"), C(1, tags=[2], note="p")  # both alive: ids differ
    return hash(first) == hash(second)


EQUALITY: dict[str, Scenario] = {
    "same-values": lambda C, _: C(1, "y") == C(1, "y"),
    "different-value": lambda C, _: C(1) == C(2),
    "compare-false-ignored": lambda C, _: C(1, tags=[1]) == C(1, tags=[2]),
    "compare-true-counts": lambda C, _: C(1, note="p") == C(1, note="q"),
    "not-equal-operator": lambda C, _: C(1) != C(1),
    "other-class-same-values": lambda C, D: C(1) == D(1),
    "tuple-of-the-values": lambda C, _: C(1) == (1, "x", [], ""),
    "hash-of-equal-values": hash_equal,
    "hash-identity": lambda C, _: C.__hash__ is object.__hash__,
    "unhashable": lambda C, _: C.__hash__ is None,
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case", EQUALITY)
def test_equality_and_hash(flavour: str, case: str) -> None:
    same_as_dataclasses(flavour, EQUALITY[case])


values = st.tuples(
    st.integers(0, 2),
    st.sampled_from(["x", "y'\"é"]),
    st.lists(st.integers(0, 1), max_size=2),
    st.sampled_from(["", "p"]),
)


@pytest.mark.parametrize("flavour", FLAVOURS)
@given(first=values, second=values)
def test_eq_hash_repr_agree_with_dataclasses_over_values(flavour: str, first: Any, second: Any) -> None:
    dc, rec = CLASSES["dataclasses", flavour], CLASSES["records", flavour]
    r1, r2, d1, d2 = rec(*first), rec(*second), dc(*first), dc(*second)
    assert (r1 == r2, r1 != r2, r1 == r1, repr(r1)) == (d1 == d2, d1 != d2, d1 == d1, repr(d1))
    if r1 == r2 and rec.__hash__ is not None:
        assert hash(r1) == hash(r2)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_repr_hides_repr_false_fields(flavour: str) -> None:
    shown = same_as_dataclasses(flavour, lambda C, _: (C.__qualname__, repr(C(1, "y", [2], "secret"))))
    assert shown == ("define_item.<locals>.Item", "define_item.<locals>.Item(a=1, b='y', tags=[2])")


@pytest.mark.parametrize("impl", IMPLS.values(), ids=IMPLS)
def test_a_class_own_repr_is_kept(impl: Impl) -> None:
    class Custom:
        a: int

        def __repr__(self) -> str:
            return "custom"

    assert repr(impl.decorate()(Custom)(1)) == "custom"


def assign(C: Any, _: Any) -> object:
    item = C(1)
    item.a = 2
    return item.a


def delete(C: Any, _: Any) -> object:
    item = C(1)
    del item.a
    return hasattr(item, "a")


def add_attribute(C: Any, _: Any) -> object:
    item = C(1)
    item.extra = 3
    return item.extra


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("action", [assign, delete, add_attribute])
def test_frozen_and_mutable_assignment(flavour: str, action: Scenario) -> None:
    result = same_as_dataclasses(flavour, action)
    assert (result is AttributeError) == (FLAVOURS[flavour].get("frozen", True))


def test_frozen_error_is_an_attribute_error() -> None:
    item = CLASSES["records", "frozen"](1)
    with pytest.raises(FrozenRecordError):
        item.a = 2
    assert issubclass(FrozenRecordError, AttributeError)
    assert item.a == 1


def replaced(C: Any, _: Any) -> object:
    item = C(1, tags=[5], note="n")
    new = copy_with(item, b="z")
    return (vars(new), vars(item), new is item, new.tags is item.tags, copy_with(item) == item)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_replace(flavour: str) -> None:
    result = same_as_dataclasses(flavour, replaced)
    assert result == (
        {"a": 1, "b": "z", "tags": [5], "note": "n"},
        {"a": 1, "b": "x", "tags": [5], "note": "n"},
        False,
        True,
        "eq" not in FLAVOURS[flavour],
    )
    assert same_as_dataclasses(flavour, lambda C, _: copy_with(C(1), nope=1)) is TypeError


@pytest.mark.parametrize("via_field", [False, True])
def test_a_field_without_default_after_one_with_a_default_is_rejected(via_field: bool) -> None:
    def define(impl: Impl) -> Any:
        class Bad:
            a: int = impl.field(default_factory=int) if via_field else 0
            b: int

        return impl.decorate()(Bad)

    assert [outcome(define, impl) for impl in IMPLS.values()] == [TypeError, TypeError]


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
