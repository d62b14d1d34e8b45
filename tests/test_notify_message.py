"""Tests for trio_activate.model.notify_message: the sd_notify rules, one test per rule.

The module is pure: every test drives it with strings, bytes, dicts and pids;
no socket is opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_activate.model.notify_message import (
    NOTIFY_MESSAGE_MAX,
    NOTIFY_VARIABLES,
    extend_timeout,
    fd_store,
    fd_store_remove,
    format_message,
    format_notify_socket,
    mainpid,
    parse_notify_message,
    parse_notify_socket,
    ready,
    reloading,
    status,
    stopping,
    watchdog,
    watchdog_interval,
)

PID = 4242
OTHER_PID = 1234
INT_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"


# --- format_message ---------------------------------------------------------


def test_format_message_joins_fields_in_order_with_newlines() -> None:
    """KEY=VALUE per field, in the mapping's order, "\\n" between, none after."""
    assert format_message({"READY": "1", "STATUS": "up", "X_2": ""}) == b"READY=1\nSTATUS=up\nX_2="


def test_format_message_encodes_values_as_utf8() -> None:
    """Values are UTF-8, and may contain '=' (only the first '=' separates)."""
    assert format_message({"STATUS": "caf\xe9 a=b \u540d"}) == "STATUS=caf\xe9 a=b \u540d".encode()


def test_format_message_rejects_no_fields() -> None:
    """An empty message says nothing; sending one is a bug."""
    with pytest.raises(ValueError, match="at least one field"):
        format_message({})


@pytest.mark.parametrize(
    "key",
    ["", "ready", "Ready", "A-B", "A=B", "A B", "A\n", "\xc9", "\uff21"],
    ids=["empty", "lower", "mixed", "dash", "equals", "space", "newline", "latin1", "fullwidth"],
)
def test_format_message_rejects_keys_outside_upper_ascii(key: str) -> None:
    """Keys are [A-Z0-9_]+ in ASCII; anything else is a ValueError naming the key."""
    with pytest.raises(ValueError, match=r"^notify key ") as info:
        format_message({key: "1"})
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    ("value", "char", "position"),
    [("a\nb", "\n", 1), ("\rx", "\r", 0), ("ab\0", "\0", 2)],
    ids=["newline", "carriage-return", "nul"],
)
def test_format_message_rejects_line_breaks_and_nul_in_values(value: str, char: str, position: int) -> None:
    """systemd splits on "\\n" and "\\r" and drops a message with a NUL: all
    three are rejected, naming the key, the character and its position."""
    expected = f"notify field STATUS={value!r}: contains {char!r} at position {position}"
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        format_message({"STATUS": value})


def test_format_message_rejects_values_utf8_cannot_encode() -> None:
    """A lone surrogate has no UTF-8 form: ValueError, not UnicodeEncodeError
    escaping with a message that names nothing."""
    with pytest.raises(ValueError, match=r"^notify field STATUS='a\\udc80': cannot be encoded as UTF-8"):
        format_message({"STATUS": "a\udc80"})


def test_format_message_is_at_most_4096_bytes() -> None:
    """The receiver drops datagrams longer than PIPE_BUF: 4096 bytes is the
    longest message, one more is a ValueError."""
    room = NOTIFY_MESSAGE_MAX - len(b"STATUS=")
    assert len(format_message({"STATUS": "x" * room})) == 4096
    with pytest.raises(ValueError, match="4097 bytes long"):
        format_message({"STATUS": "x" * (room + 1)})


# --- one function per message -----------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(ready(), b"READY=1", id="ready"),
        pytest.param(ready("serving"), b"READY=1\nSTATUS=serving", id="ready-with-status"),
        pytest.param(reloading(123456789), b"RELOADING=1\nMONOTONIC_USEC=123456789", id="reloading"),
        pytest.param(stopping(), b"STOPPING=1", id="stopping"),
        pytest.param(status("3 workers"), b"STATUS=3 workers", id="status"),
        pytest.param(mainpid(PID), b"MAINPID=4242", id="mainpid"),
        pytest.param(mainpid(PID, ready=True), b"MAINPID=4242\nREADY=1", id="mainpid-ready"),
        pytest.param(watchdog(), b"WATCHDOG=1", id="watchdog"),
        pytest.param(extend_timeout(5_000_000), b"EXTEND_TIMEOUT_USEC=5000000", id="extend-timeout"),
    ],
)
def test_each_message_has_the_exact_bytes_of_sd_notify_3(message: bytes, expected: bytes) -> None:
    """Each helper produces the datagram sd_notify(3) documents."""
    assert message == expected


@pytest.mark.parametrize("usec", [0, UINT64_MAX])
def test_number_fields_take_the_whole_unsigned_64_bit_range(usec: int) -> None:
    """MONOTONIC_USEC and EXTEND_TIMEOUT_USEC are 0 .. 2**64-1."""
    assert reloading(usec) == f"RELOADING=1\nMONOTONIC_USEC={usec}".encode()
    assert extend_timeout(usec) == f"EXTEND_TIMEOUT_USEC={usec}".encode()


@pytest.mark.parametrize(
    ("build", "bad"),
    [
        pytest.param(reloading, -1, id="reloading-negative"),
        pytest.param(reloading, 2**64, id="reloading-too-big"),
        pytest.param(extend_timeout, -1, id="extend-negative"),
        pytest.param(extend_timeout, 2**64, id="extend-too-big"),
        pytest.param(mainpid, 0, id="mainpid-zero"),
        pytest.param(mainpid, -5, id="mainpid-negative"),
        pytest.param(mainpid, INT_MAX + 1, id="mainpid-too-big"),
    ],
)
def test_number_fields_out_of_range_are_a_value_error(build: Callable[[int], bytes], bad: int) -> None:
    """A number the receiver cannot parse is the caller's bug: ValueError
    naming the field and the number."""
    with pytest.raises(ValueError, match=rf"^[A-Z_]+={bad}: expected"):
        build(bad)


# --- status: never fails ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sent"),
    [("a\nb", "a b"), ("a\r\nb", "a  b"), ("a\0b", "a b"), ("\n", " ")],
    ids=["newline", "crlf", "nul", "only-newline"],
)
def test_status_replaces_line_breaks_and_nul_with_spaces(text: str, sent: str) -> None:
    """A status text with "\\n", "\\r" or NUL is sent with spaces instead,
    one character for one, rather than raising."""
    assert status(text) == f"STATUS={sent}".encode()
    assert ready(text) == f"READY=1\nSTATUS={sent}".encode()


def test_status_replaces_what_utf8_cannot_encode_with_a_question_mark() -> None:
    """systemd ignores a STATUS= that is not UTF-8: a lone surrogate (an
    undecodable file name, say) becomes '?', the rest is kept."""
    assert status("file b\udcff.txt") == b"STATUS=file b?.txt"


def test_status_too_long_is_cut_to_4096_bytes_with_an_ellipsis() -> None:
    """A long status is cut so the whole message is exactly 4096 bytes,
    ending with '…', for STATUS alone and after READY=1."""
    text = "x" * 10_000
    for message, head in ((status(text), b"STATUS="), (ready(text), b"READY=1\nSTATUS=")):
        assert len(message) == NOTIFY_MESSAGE_MAX
        assert message.startswith(head + b"xxx")
        assert message.endswith(ELLIPSIS.encode())


def test_status_cut_never_splits_a_character() -> None:
    """The cut falls between characters: a 3-byte character that would be
    split is dropped whole, so the message stays valid UTF-8."""
    text = "\u540d" * 2000  # 3 bytes each, 6000 bytes
    message = status(text)
    assert len(message) <= NOTIFY_MESSAGE_MAX
    decoded = message.decode("utf-8")  # raises if a character was split
    assert decoded == "STATUS=" + "\u540d" * ((NOTIFY_MESSAGE_MAX - 7 - 3) // 3) + ELLIPSIS


def test_status_that_fits_exactly_is_not_cut() -> None:
    """4089 bytes of text is exactly 4096 bytes of message: sent whole."""
    text = "y" * (NOTIFY_MESSAGE_MAX - len(b"STATUS="))
    assert status(text) == b"STATUS=" + text.encode()


@given(text=st.text())
def test_property_status_of_any_text_is_one_field_the_receiver_accepts(text: str) -> None:
    """Whatever the text, status() returns a message of at most 4096 bytes
    that reads back as one STATUS field, equal to the text when the text
    had nothing to replace and fits."""
    message = status(text)
    assert len(message) <= NOTIFY_MESSAGE_MAX
    fields = parse_notify_message(message)
    assert list(fields) == ["STATUS"]
    safe = not any(ch in text for ch in "\n\r\0") and len(text.encode("utf-8", "replace")) <= 4089
    if safe and text == text.encode("utf-8", "replace").decode("utf-8"):
        assert fields["STATUS"] == text


# --- parse_notify_message ---------------------------------------------------


def test_parse_reads_key_value_lines() -> None:
    """Each line is KEY=VALUE, split at the first '='."""
    assert parse_notify_message(b"READY=1\nSTATUS=a=b") == {"READY": "1", "STATUS": "a=b"}


def test_parse_splits_on_carriage_return_too() -> None:
    """systemd's NEWLINE is "\\n\\r": a "\\r" starts a new line."""
    assert parse_notify_message(b"READY=1\rSTATUS=x\r\nMAINPID=7") == {
        "READY": "1",
        "STATUS": "x",
        "MAINPID": "7",
    }


def test_parse_ignores_empty_lines_and_lines_without_equals() -> None:
    """A line without '=' can never match a KEY= lookup: it is skipped."""
    assert parse_notify_message(b"\n\nREADY=1\ngarbage\n\n") == {"READY": "1"}
    assert parse_notify_message(b"") == {}


def test_parse_first_value_of_a_repeated_key_wins() -> None:
    """As systemd's strv_find_startswith: the first STATUS= counts."""
    assert parse_notify_message(b"STATUS=first\nSTATUS=second") == {"STATUS": "first"}


def test_parse_allows_one_trailing_nul() -> None:
    """systemd permits one NUL as the last byte (C senders may include it)."""
    assert parse_notify_message(b"READY=1\0") == {"READY": "1"}


@pytest.mark.parametrize(("data", "position"), [(b"READY=1\0\0", 7), (b"A=1\0B=2", 3), (b"\0READY=1", 0)])
def test_parse_rejects_embedded_nul(data: bytes, position: int) -> None:
    """systemd drops a datagram with a NUL before its last byte: ValueError."""
    with pytest.raises(ValueError, match=f"NUL byte at position {position}"):
        parse_notify_message(data)


def test_parse_rejects_more_than_4096_bytes() -> None:
    """systemd drops a datagram longer than PIPE_BUF; 4096 bytes is read."""
    assert parse_notify_message(b"STATUS=" + b"x" * 4089)["STATUS"] == "x" * 4089
    with pytest.raises(ValueError, match="4097 bytes long"):
        parse_notify_message(b"STATUS=" + b"x" * 4090)


def test_parse_replaces_bytes_that_are_not_utf8() -> None:
    """A STATUS that is not UTF-8 does not lose the READY=1 next to it."""
    assert parse_notify_message(b"STATUS=\xff\xfe\nREADY=1") == {"STATUS": "\ufffd\ufffd", "READY": "1"}


field_values = (
    st.text()
    .filter(lambda value: not any(ch in value for ch in "\n\r\0"))
    .map(lambda value: value.encode("utf-8", "replace").decode("utf-8"))
)


@given(fields=st.dictionaries(st.from_regex(r"\A[A-Z0-9_]{1,20}\Z"), field_values, min_size=1, max_size=8))
def test_property_format_then_parse_round_trips(fields: dict[str, str]) -> None:
    """Any fields format_message accepts read back as the same fields."""
    try:
        message = format_message(fields)
    except ValueError:
        assert sum(len(k) + 1 + len(v.encode()) for k, v in fields.items()) + len(fields) - 1 > 4096
        return
    assert parse_notify_message(message) == fields


# --- parse_notify_socket ----------------------------------------------------


def test_notify_socket_absolute_path_is_returned_as_is() -> None:
    """An absolute path is the sockaddr itself, a str."""
    assert parse_notify_socket("/run/systemd/notify") == "/run/systemd/notify"


def test_notify_socket_at_name_is_abstract() -> None:
    """'@name' is Linux's abstract namespace: the '@' becomes a NUL byte."""
    assert parse_notify_socket("@trio/notify") == b"\0trio/notify"


def test_notify_socket_abstract_name_keeps_undecodable_bytes() -> None:
    """An environment value decoded with surrogateescape gives its bytes back."""
    assert parse_notify_socket("@n" + os.fsdecode(b"\xff")) == b"\0n\xff"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param("", "the value is empty", id="empty"),
        pytest.param("run/notify", "expected an absolute path", id="relative"),
        pytest.param("./notify", "expected an absolute path", id="dot-relative"),
        pytest.param("vsock:2:1234", "AF_VSOCK addresses are not supported", id="vsock"),
        pytest.param("vsock-dgram:2:1234", "AF_VSOCK addresses are not supported", id="vsock-dgram"),
        pytest.param("/", "'/' alone names no socket", id="slash"),
        pytest.param("@", "'@' alone names no socket", id="at"),
        pytest.param("/a\0b", "contains a NUL", id="nul"),
    ],
)
def test_notify_socket_other_forms_are_a_value_error(value: str, reason: str) -> None:
    """Everything but an absolute path or @name is a ValueError naming the
    variable, the value and what was expected."""
    with pytest.raises(ValueError, match="^" + re.escape(f"NOTIFY_SOCKET={value!r}: ")) as info:
        parse_notify_socket(value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "longest",
    ["/" + "\xe9" * 53, "@" + "\xe9" * 53 + "x"],
    ids=["path", "abstract"],
)
def test_notify_socket_name_is_at_most_107_bytes(longest: str) -> None:
    """sun_path is 108 bytes: a path needs its final NUL, an abstract name
    has its leading NUL, so 107 bytes of name either way (counted in bytes,
    here 2 per 'é')."""
    assert len(os.fsencode(longest.removeprefix("@"))) == 107
    assert parse_notify_socket(longest) in (longest, b"\0" + os.fsencode(longest[1:]))
    with pytest.raises(ValueError, match="108 bytes long; a unix socket address holds at most 107"):
        parse_notify_socket(longest + "x")


def test_format_notify_socket_spells_the_sockaddr_as_notify_socket_does() -> None:
    """The inverse of parse_notify_socket: a path stays a path, b"\\0name" is "@name"."""
    assert format_notify_socket("/run/systemd/notify") == "/run/systemd/notify"
    assert format_notify_socket(b"\0trio/notify") == "@trio/notify"
    assert format_notify_socket(b"/run/n\xff") == "/run/n" + os.fsdecode(b"\xff")


notify_socket_values = st.builds(
    lambda at, name: ("@" if at else "/") + name,
    st.booleans(),
    st.text(st.characters(exclude_characters="\0"), min_size=1, max_size=60),
)


@given(value=notify_socket_values | st.binary(min_size=1, max_size=60).map(lambda b: "@" + os.fsdecode(b)))
def test_property_notify_socket_round_trips_through_its_sockaddr(value: str) -> None:
    """Every value parse_notify_socket accepts comes back from format_notify_socket, and reads the same:
    what the single-process reload relies on to pass the manager's address to its successor."""
    try:
        address = parse_notify_socket(value)
    except ValueError:
        return  # a NUL, a lone "/", a name over 107 bytes: refused, nothing to round-trip
    assert parse_notify_socket(format_notify_socket(address)) == address
    assert format_notify_socket(address) == value


# --- watchdog_interval ------------------------------------------------------


def test_notify_variables_are_the_three_of_the_protocol() -> None:
    """What unset removes: the socket and both watchdog variables."""
    assert set(NOTIFY_VARIABLES) == {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WatchdogSec=30 gives WATCHDOG_USEC=30000000: ping every 15 seconds."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=PID) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "1"}, pid=PID) == 0.0000005


def test_watchdog_interval_without_watchdog_usec_is_none() -> None:
    """No WATCHDOG_USEC: no watchdog, whatever WATCHDOG_PID says."""
    assert watchdog_interval({}, pid=PID) is None
    assert watchdog_interval({"WATCHDOG_PID": str(PID)}, pid=PID) is None
    assert watchdog_interval({"WATCHDOG_PID": "garbage"}, pid=PID) is None


def test_watchdog_interval_for_this_pid() -> None:
    """WATCHDOG_PID equal to our pid: the watchdog is ours."""
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(PID)}
    assert watchdog_interval(env, pid=PID) == 1.0


def test_watchdog_interval_for_another_pid_is_none() -> None:
    """WATCHDOG_PID of another process: not ours, no error."""
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(OTHER_PID)}
    assert watchdog_interval(env, pid=PID) is None


def test_watchdog_interval_ignores_a_bad_usec_meant_for_another_pid() -> None:
    """WATCHDOG_PID is read first: garbage next to someone else's pid is not
    our business."""
    env = {"WATCHDOG_USEC": "garbage", "WATCHDOG_PID": str(OTHER_PID)}
    assert watchdog_interval(env, pid=PID) is None


def test_watchdog_interval_largest_usec_is_below_infinity() -> None:
    """2**64-2 is the largest WATCHDOG_USEC; 2**64-1 is USEC_INFINITY,
    which libsystemd refuses."""
    assert watchdog_interval({"WATCHDOG_USEC": str(UINT64_MAX - 1)}, pid=PID) == (UINT64_MAX - 1) / 2e6
    with pytest.raises(ValueError, match="larger than 18446744073709551614"):
        watchdog_interval({"WATCHDOG_USEC": str(UINT64_MAX)}, pid=PID)


@pytest.mark.parametrize(
    "value",
    ["", "0", "-1", "+5", " 5", "5 ", "05", "1.5", "1e6", "0x10", "abc", "\u0665", str(2**64), "9" * 5000],
    ids=[
        "empty",
        "zero",
        "negative",
        "plus",
        "leading-space",
        "trailing-space",
        "leading-zero",
        "fraction",
        "exponent",
        "hex",
        "garbage",
        "non-ascii-digit",
        "2**64",
        "5000-digits",
    ],
)
def test_watchdog_usec_not_a_positive_decimal_is_a_value_error(value: str) -> None:
    """A malformed WATCHDOG_USEC for this process is a ValueError naming the
    variable and the value (shortened), for the caller to log."""
    with pytest.raises(ValueError, match="^" + re.escape(f"WATCHDOG_USEC={value[:80]!r}")) as info:
        watchdog_interval({"WATCHDOG_USEC": value}, pid=PID)
    assert "expected a positive decimal integer of microseconds" in str(info.value)


@pytest.mark.parametrize("value", ["", "0", "-1", "abc", "04242", str(INT_MAX + 1)])
def test_watchdog_pid_not_a_process_id_is_a_value_error(value: str) -> None:
    """A malformed WATCHDOG_PID is a ValueError naming it: we cannot tell
    whether the watchdog is ours."""
    with pytest.raises(ValueError, match=f"^WATCHDOG_PID={value!r}: expected a process id"):
        watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": value}, pid=PID)


# --- the fd store -----------------------------------------------------------------


def test_fd_store_names_the_fds_it_carries() -> None:
    """FDSTORE=1 with FDNAME=: the fds come back at the next start under that name."""
    assert fd_store("web") == b"FDSTORE=1\nFDNAME=web"
    assert parse_notify_message(fd_store("web")) == {"FDSTORE": "1", "FDNAME": "web"}


def test_fd_store_remove_names_the_fds_to_drop() -> None:
    assert fd_store_remove("old") == b"FDSTOREREMOVE=1\nFDNAME=old"


@pytest.mark.parametrize("build", [fd_store, fd_store_remove])
@pytest.mark.parametrize(
    ("name", "problem"),
    [("", "is empty"), ("a:b", "contains ':'"), ("caf\u00e9", "non-ASCII"), ("x" * 256, "longer than 255")],
)
def test_an_fd_name_systemd_would_refuse_is_an_error(
    build: Callable[[str], bytes], name: str, problem: str
) -> None:
    """systemd ignores an invalid FDNAME= and stores the fds as 'stored', which no manifest finds."""
    with pytest.raises(ValueError, match=f"^FDNAME=.*: the fd name .*{problem}"):
        build(name)
