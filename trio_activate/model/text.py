"""Numbers in text, and values in messages: one rule for each, for the whole package.

Layer 1: pure, no imports (the CLI's fast path reads ``LISTEN_*`` with it).

Every number trio-activate reads from text that someone else wrote (the
``LISTEN_*`` and ``WATCHDOG_*`` variables, a PID on the command line or in a
pid file, a numeric user id in the manifest, its own private variables) is
told apart from other text by `is_decimal`: ASCII digits and nothing else.
Neither `str.isdigit` alone (it also takes ``"²"`` and Arabic-Indic digits,
which `int` then reads or refuses) nor a bare `int` (it takes whitespace,
signs and ``_``) is that rule, and a value one reader takes as a number
another must not take as a name.

`parse_decimal` is the strict reading of a variable a service manager sets:
digits only, no leading zero (libsystemd would read ``"010"`` as octal),
within a range, with an error that names the variable and the value and,
where a common mistake explains it, the mistake.  `show_value` is how a
value from outside appears in such a message: quoted, and cut short so the
message stays one line.
"""

from __future__ import annotations

__all__ = ["is_decimal", "parse_decimal", "show_value"]

_SHOWN_VALUE_CHARS = 80
_BASE_PREFIXES = ("0x", "0o", "0b")


def is_decimal(text: str) -> bool:
    """True when `text` is one or more ASCII digits (``"0"`` to ``"9"``), nothing else."""
    return text.isascii() and text.isdigit()


def show_value(value: str) -> str:
    """`repr` of a value from outside, cut short so a message stays one line."""
    if len(value) <= _SHOWN_VALUE_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_VALUE_CHARS]!r}... ({len(value)} characters)"


def _number_hint(value: str) -> str:
    """Why `value` is not plain digits, when a common mistake explains it."""
    if value == "":
        return "; the value is empty"
    if any(ch.isspace() for ch in value):
        return "; whitespace is not allowed"
    unsigned = value[1:] if value[:1] in ("+", "-") else value
    if unsigned[:2].lower() in _BASE_PREFIXES:
        return "; a base prefix (0x, 0o, 0b) is not allowed"
    if value[0] in "+-":
        return "; a sign is not allowed"
    return ""


def parse_decimal(
    variable: str,
    value: str,
    *,
    lowest: int,
    highest: int,
    expected: str,
    why_highest: str = "",
) -> int:
    """`value` of `variable` as plain decimal digits without a leading zero, in ``lowest .. highest``.

    Error handling: raises `ValueError` with one line, ``VARIABLE='value':
    expected <expected>``, followed by why when it can say: the value is
    empty, has whitespace, a sign, a base prefix or a leading 0, or is
    larger than `highest` (then `why_highest` follows, if given).
    """
    problem = f"{variable}={show_value(value)}: expected {expected}"
    if not is_decimal(value):
        raise ValueError(problem + _number_hint(value))
    if len(value) > 1 and value[0] == "0":
        raise ValueError(f"{problem}; a leading 0 is not allowed (libsystemd would read it as octal)")
    # Compare lengths before int(): a value of thousands of digits would make
    # int() raise its own ValueError (sys.get_int_max_str_digits) instead of ours.
    if len(value) > len(str(highest)) or int(value) > highest:
        raise ValueError(f"{problem}; the value is larger than {highest}{why_highest}")
    number = int(value)
    if number < lowest:
        raise ValueError(problem)
    return number
