"""Tests for trio_activate.model.text: the one rule for numbers in text, and values shown in messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_activate.errors import ListenEnvError
from trio_activate.model.listen_env import read_listen_env
from trio_activate.model.notify_message import watchdog_interval
from trio_activate.model.text import is_decimal, parse_decimal, show_value


@pytest.mark.parametrize("text", ["0", "7", "0123", "18446744073709551616"])
def test_ascii_digits_are_decimal(text: str) -> None:
    assert is_decimal(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "+1",
        "-1",
        "1_000",
        "0x10",
        "1.0",
        "\N{SUPERSCRIPT TWO}",
        "\N{ARABIC-INDIC DIGIT THREE}",
    ],
)
def test_anything_else_is_not_decimal(text: str) -> None:
    """Not str.isdigit: "²" and Arabic-Indic digits are digits to it, and int() reads the latter."""
    assert not is_decimal(text)


@given(st.text(max_size=8))
def test_property_is_decimal_is_exactly_ascii_digits(text: str) -> None:
    assert is_decimal(text) == (text != "" and all(ch in "0123456789" for ch in text))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "; the value is empty"),
        (" 5", "; whitespace is not allowed"),
        ("0x5", "; a base prefix (0x, 0o, 0b) is not allowed"),
        ("-0B1", "; a base prefix (0x, 0o, 0b) is not allowed"),
        ("+5", "; a sign is not allowed"),
        ("05", "; a leading 0 is not allowed (libsystemd would read it as octal)"),
        ("100", "; the value is larger than 99 (why)"),
        ("9" * 5000, "; the value is larger than 99 (why)"),
        ("0", ""),
        ("5a", ""),
    ],
)
def test_parse_decimal_says_what_is_wrong(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"^X=.*: expected a number") as info:
        parse_decimal("X", value, lowest=1, highest=99, expected="a number", why_highest=" (why)")
    assert str(info.value) == f"X={show_value(value)}: expected a number{why}"


@given(st.integers(0, 2**64))
def test_property_parse_decimal_reads_what_str_writes(number: int) -> None:
    assert parse_decimal("X", str(number), lowest=0, highest=2**64, expected="") == number


def test_show_value_quotes_and_cuts_a_long_value_to_one_line() -> None:
    assert show_value("a\nb") == "'a\\nb'"
    assert show_value("y" * 81) == repr("y" * 80) + "... (81 characters)"


@pytest.mark.parametrize("value", ["01", " 1", "+1", "0x1", ""])
def test_listen_and_watchdog_variables_are_read_by_the_same_rule(value: str) -> None:
    """LISTEN_PID and WATCHDOG_PID are both pid_t from a service manager: one reader, one message."""
    with pytest.raises(ListenEnvError, match=r"^LISTEN_PID=") as listen:
        read_listen_env({"LISTEN_PID": value, "LISTEN_FDS": "1"}, pid=1, pidfd_id=None)
    with pytest.raises(ValueError, match=r"^WATCHDOG_PID=") as watchdog:
        watchdog_interval({"WATCHDOG_PID": value, "WATCHDOG_USEC": "1"}, pid=1)
    assert str(watchdog.value).removeprefix("WATCHDOG_PID") == str(listen.value).removeprefix("LISTEN_PID")
