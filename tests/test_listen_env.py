"""Tests for trio_activate.model.listen_env: the LISTEN_* rules, one test per rule.

The reader is pure, so every test drives it with a plain dict, a pid and a
pidfd id; no fds or processes are needed, except to check the reader side
by side with libsystemd's own ``sd_listen_fds_with_names()`` (through
ctypes), in a child process that the shell made the LISTEN_PID of.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_activate.errors import ListenEnvError
from trio_activate.model.listen_env import (
    CONNECTION_NAME,
    LISTEN_VARIABLES,
    SD_LISTEN_FDS_START,
    SPECIAL_NAMES,
    STORED_NAME,
    UNKNOWN_NAME,
    ListenFds,
    NotActivated,
    fd_name_problem,
    format_listen_env,
    read_listen_env,
    take_listen_env,
    unset_listen_env,
)

PID = 4242
OTHER_PID = 1234
PIDFD_ID = 777
INT_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
MAX_FDS = 2**20 - 3  # fds 3 .. 2**20-1, below Linux's default fs.nr_open

# Values that are not plain decimal digits without a leading zero, by class.
# Shared by LISTEN_PID, LISTEN_PIDFDID and LISTEN_FDS.
NOT_PLAIN_DECIMAL = [
    pytest.param("abc", id="garbage"),
    pytest.param("12abc", id="trailing-garbage"),
    pytest.param("1e3", id="exponent"),
    pytest.param("4_242", id="underscore"),
    pytest.param("\u0664\u0662", id="non-ascii-digits"),
    pytest.param("+5", id="plus-sign"),
    pytest.param("-5", id="minus-sign"),
    pytest.param("-0", id="minus-zero"),
    pytest.param(" 5", id="leading-space"),
    pytest.param("\t5", id="leading-tab"),
    pytest.param("5 ", id="trailing-space"),
    pytest.param("5\n", id="trailing-newline"),
    pytest.param("4 2", id="inner-space"),
    pytest.param("0x5", id="hex-prefix"),
    pytest.param("0X5", id="hex-prefix-upper"),
    pytest.param("0o5", id="octal-prefix"),
    pytest.param("0b1", id="binary-prefix"),
    pytest.param("05", id="leading-zero"),
    pytest.param("00", id="double-zero"),
    pytest.param("", id="empty"),
]


def error_pattern(variable: str, value: str) -> str:
    """The start every ListenEnvError message must have: VAR=repr(value),
    the value cut to its first 80 characters."""
    return "^" + re.escape(f"{variable}={value[:80]!r}")


def activated_env(**overrides: str | None) -> dict[str, str]:
    """LISTEN_* for PID with two fds named a and b; None removes a variable."""
    env = {
        "LISTEN_PID": str(PID),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "a:b",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def read(env: dict[str, str], pidfd_id: int | None = None) -> ListenFds | NotActivated:
    return read_listen_env(env, pid=PID, pidfd_id=pidfd_id)


def read_or_error(
    env: dict[str, str], pidfd_id: int | None = None
) -> ListenFds | NotActivated | ListenEnvError:
    """The result, or the ListenEnvError raised; any other exception escapes."""
    try:
        return read_listen_env(env, pid=PID, pidfd_id=pidfd_id)
    except ListenEnvError as error:
        return error


def read_activated(env: dict[str, str], pidfd_id: int | None = None) -> ListenFds:
    result = read(env, pidfd_id)
    assert isinstance(result, ListenFds), result
    return result


def read_not_activated(env: dict[str, str], pidfd_id: int | None = None) -> str:
    result = read(env, pidfd_id)
    assert isinstance(result, NotActivated), result
    return result.reason


# --- constants --------------------------------------------------------------


def test_protocol_constants_match_systemd() -> None:
    """The fd start, the variable set and the special names are systemd's."""
    assert SD_LISTEN_FDS_START == 3
    assert LISTEN_VARIABLES == (
        "LISTEN_PID",
        "LISTEN_PIDFDID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    )
    assert (UNKNOWN_NAME, STORED_NAME, CONNECTION_NAME) == (
        "unknown",
        "stored",
        "connection",
    )
    assert SPECIAL_NAMES == ("unknown", "stored", "connection")


# --- the activated case -----------------------------------------------------


def test_activated_gives_fds_from_3_and_the_names() -> None:
    """fds are 3 .. 3+n-1, names in order, names_given when LISTEN_FDNAMES set."""
    result = read(activated_env(LISTEN_FDS="3", LISTEN_FDNAMES="http:https:admin"))
    assert result == ListenFds(
        fds=(3, 4, 5),
        names=("http", "https", "admin"),
        names_given=True,
        pidfd_checked=False,
    )


def test_read_does_not_change_environ() -> None:
    """read_listen_env only reads; unsetting is take_listen_env's job."""
    env = activated_env()
    before = dict(env)
    read_activated(env)
    assert env == before


# --- LISTEN_PID -------------------------------------------------------------


def test_listen_pid_absent_means_not_activated() -> None:
    """No LISTEN_PID: not activated, even when the other variables are set."""
    reason = read_not_activated(activated_env(LISTEN_PID=None, LISTEN_PIDFDID="5"))
    assert reason == "LISTEN_PID is not set"


def test_listen_pid_of_another_process_means_not_activated() -> None:
    """A valid PID that is not ours: not for us, not an error."""
    reason = read_not_activated(activated_env(LISTEN_PID=str(OTHER_PID)))
    assert reason == f"LISTEN_PID={OTHER_PID} is for another process (this is {PID})"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"LISTEN_FDS": "garbage"}, id="bad-fds"),
        pytest.param({"LISTEN_FDS": "0"}, id="zero-fds"),
        pytest.param({"LISTEN_FDNAMES": "only-one"}, id="names-count"),
        pytest.param({"LISTEN_FDNAMES": "a:\x01"}, id="bad-name"),
        pytest.param({"LISTEN_PIDFDID": "garbage"}, id="bad-pidfdid"),
    ],
)
def test_other_variables_are_not_checked_when_not_for_us(
    overrides: dict[str, str],
) -> None:
    """Malformed later variables next to another process's LISTEN_PID are
    not our business: not activated, no error (libsystemd's order)."""
    env = activated_env(LISTEN_PID=str(OTHER_PID), **overrides)
    assert "another process" in read_not_activated(env)


@pytest.mark.parametrize(
    "value",
    [
        *NOT_PLAIN_DECIMAL,
        pytest.param("0", id="zero"),
        pytest.param(str(INT_MAX + 1), id="beyond-pid_t"),
        pytest.param("9" * 30, id="overflow"),
        pytest.param("9" * 5000, id="huge"),
    ],
)
def test_listen_pid_not_a_valid_pid_is_an_error(value: str) -> None:
    """LISTEN_PID must be plain decimal digits in 1 .. 2**31-1 (pid_t)."""
    with pytest.raises(ListenEnvError, match=error_pattern("LISTEN_PID", value)) as info:
        read(activated_env(LISTEN_PID=value))
    message = str(info.value)
    assert "expected a process id" in message
    assert "\n" not in message


def test_listen_pid_largest_pid_t_is_accepted() -> None:
    """2**31-1 is the largest pid_t and is a valid LISTEN_PID."""
    env = activated_env(LISTEN_PID=str(INT_MAX))
    result = read_listen_env(env, pid=INT_MAX, pidfd_id=None)
    assert isinstance(result, ListenFds)


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("", "the value is empty"),
        (" 5", "whitespace is not allowed"),
        ("5\n", "whitespace is not allowed"),
        ("+5", "a sign is not allowed"),
        ("-5", "a sign is not allowed"),
        ("0x5", "a base prefix (0x, 0o, 0b) is not allowed"),
        ("-0b1", "a base prefix (0x, 0o, 0b) is not allowed"),
        ("05", "a leading 0 is not allowed (libsystemd would read it as octal)"),
        ("0", f"expected a process id, a decimal integer from 1 to {INT_MAX}"),
        (str(INT_MAX + 1), f"the value is larger than {INT_MAX}"),
    ],
)
def test_number_errors_say_what_is_wrong(value: str, hint: str) -> None:
    """The message names the usual mistake, not just 'invalid'."""
    with pytest.raises(ListenEnvError) as info:
        read(activated_env(LISTEN_PID=value))
    assert hint in str(info.value)


def test_error_message_truncates_a_huge_value() -> None:
    """A huge garbage value still gives one short readable line."""
    value = "x" * 10_000
    with pytest.raises(ListenEnvError) as info:
        read(activated_env(LISTEN_PID=value))
    message = str(info.value)
    assert message.startswith("LISTEN_PID='" + "x" * 80 + "'... (10000 characters)")
    assert len(message) < 300


# --- LISTEN_PIDFDID ---------------------------------------------------------


def test_listen_pidfdid_matching_our_id_is_checked() -> None:
    """LISTEN_PIDFDID equal to our pidfd id: activated, pidfd_checked."""
    result = read_activated(activated_env(LISTEN_PIDFDID=str(PIDFD_ID)), PIDFD_ID)
    assert result.pidfd_checked is True
    assert result.fds == (3, 4)


def test_listen_pidfdid_of_another_process_means_not_activated() -> None:
    """Same PID but another pidfd id (PID reuse): not for us."""
    reason = read_not_activated(activated_env(LISTEN_PIDFDID="778"), PIDFD_ID)
    assert reason == (f"LISTEN_PIDFDID=778 is for another process (this pidfd id is {PIDFD_ID})")


def test_listen_pidfdid_mismatch_wins_over_a_bad_listen_fds() -> None:
    """The pidfd check comes before LISTEN_FDS, as in sd_listen_fds."""
    env = activated_env(LISTEN_PIDFDID="778", LISTEN_FDS="garbage")
    assert "LISTEN_PIDFDID=778" in read_not_activated(env, PIDFD_ID)


def test_listen_pidfdid_unknown_own_id_skips_the_check() -> None:
    """Our pidfd id unknown (old kernel): compare nothing, pidfd_checked False."""
    result = read_activated(activated_env(LISTEN_PIDFDID="778"), None)
    assert result.pidfd_checked is False
    assert result.names == ("a", "b")


def test_listen_pidfdid_absent_is_not_checked() -> None:
    """No LISTEN_PIDFDID (older managers): activated, pidfd_checked False."""
    result = read_activated(activated_env(), PIDFD_ID)
    assert result.pidfd_checked is False


def test_listen_pidfdid_without_listen_pid_means_not_activated() -> None:
    """LISTEN_PIDFDID alone does not activate: LISTEN_PID is checked first."""
    env = activated_env(LISTEN_PID=None, LISTEN_PIDFDID=str(PIDFD_ID))
    assert read_not_activated(env, PIDFD_ID) == "LISTEN_PID is not set"


@pytest.mark.parametrize("value", ["0", str(UINT64_MAX)], ids=["zero", "uint64-max"])
def test_listen_pidfdid_accepts_the_whole_uint64_range(value: str) -> None:
    """0 .. 2**64-1 parse; the value is then compared with our id."""
    assert read_activated(activated_env(LISTEN_PIDFDID=value), int(value)).pidfd_checked
    assert "is for another process" in read_not_activated(activated_env(LISTEN_PIDFDID=value), 12345)


@pytest.mark.parametrize(
    "value",
    [
        *NOT_PLAIN_DECIMAL,
        pytest.param(str(2**64), id="overflow-2**64"),
        pytest.param("9" * 30, id="overflow"),
        pytest.param("9" * 5000, id="huge"),
    ],
)
def test_listen_pidfdid_not_a_uint64_is_an_error(value: str) -> None:
    """LISTEN_PIDFDID must be an unsigned 64-bit decimal, even when our own
    id is unknown (it is parsed before the comparison is skipped)."""
    for pidfd_id in (PIDFD_ID, None):
        with pytest.raises(ListenEnvError, match=error_pattern("LISTEN_PIDFDID", value)) as info:
            read(activated_env(LISTEN_PIDFDID=value), pidfd_id)
        assert "expected a pidfd id" in str(info.value)


# --- LISTEN_FDS -------------------------------------------------------------


def test_listen_fds_absent_means_not_activated() -> None:
    """LISTEN_PID for us but no LISTEN_FDS: not activated."""
    assert read_not_activated(activated_env(LISTEN_FDS=None)) == "LISTEN_FDS is not set"


@pytest.mark.parametrize(
    "value",
    [
        *NOT_PLAIN_DECIMAL,
        pytest.param("0", id="zero"),
        pytest.param(str(INT_MAX - 3 + 1), id="3+n-overflows-int"),
        pytest.param(str(INT_MAX), id="int-max"),
        pytest.param("9" * 30, id="overflow"),
        pytest.param("9" * 5000, id="huge"),
    ],
)
def test_listen_fds_not_a_positive_count_is_an_error(value: str) -> None:
    """LISTEN_FDS must be a positive decimal integer whose fds fit."""
    with pytest.raises(ListenEnvError, match=error_pattern("LISTEN_FDS", value)) as info:
        read(activated_env(LISTEN_FDS=value, LISTEN_FDNAMES=None))
    assert "expected a positive decimal integer" in str(info.value)


def test_listen_fds_example_message() -> None:
    """The message format: variable, repr of the value, what was expected."""
    with pytest.raises(ListenEnvError) as info:
        read(activated_env(LISTEN_FDS="0x3", LISTEN_FDNAMES=None))
    assert str(info.value) == (
        "LISTEN_FDS='0x3': expected a positive decimal integer; a base prefix (0x, 0o, 0b) is not allowed"
    )


def test_listen_fds_limit_is_below_the_default_fd_limit() -> None:
    """At most 2**20-3 fds (the last is 2**20-1, below Linux's default
    fs.nr_open); one more is an error, not a multi-gigabyte tuple."""
    result = read_activated(activated_env(LISTEN_FDS=str(MAX_FDS), LISTEN_FDNAMES=None))
    assert len(result.fds) == MAX_FDS
    assert result.fds[-1] == 2**20 - 1
    with pytest.raises(ListenEnvError, match=r"larger than 1048573.*fs\.nr_open"):
        read(activated_env(LISTEN_FDS=str(MAX_FDS + 1), LISTEN_FDNAMES=None))


# --- LISTEN_FDNAMES ---------------------------------------------------------


def test_listen_fdnames_absent_names_every_fd_unknown() -> None:
    """No LISTEN_FDNAMES: every name is 'unknown', names_given False."""
    result = read_activated(activated_env(LISTEN_FDS="3", LISTEN_FDNAMES=None))
    assert result.fds == (3, 4, 5)
    assert result.names == ("unknown", "unknown", "unknown")
    assert result.names_given is False


@pytest.mark.parametrize(
    ("value", "names"),
    [
        pytest.param("a::b", ("a", "", "b"), id="empty-middle"),
        pytest.param(":a", ("", "a"), id="empty-first"),
        pytest.param("a:", ("a", ""), id="empty-last"),
        pytest.param("::", ("", "", ""), id="all-empty"),
        pytest.param("", ("",), id="empty-value-is-one-empty-name"),
    ],
)
def test_listen_fdnames_empty_fields_are_not_merged(value: str, names: tuple[str, ...]) -> None:
    """Split on ':' without merging empty fields; "" is one empty name, as
    libsystemd's strv_split_full(EXTRACT_DONT_COALESCE_SEPARATORS) gives."""
    env = activated_env(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=value)
    result = read_activated(env)
    assert result.names == names
    assert result.names_given is True


@pytest.mark.parametrize(
    ("value", "count", "n_names"),
    [
        pytest.param("a:b", 3, 2, id="fewer"),
        pytest.param("a:b:c:d", 3, 4, id="more"),
        pytest.param("a::b", 2, 3, id="empty-field-counts"),
        pytest.param("", 2, 1, id="empty-value"),
    ],
)
def test_listen_fdnames_count_must_equal_listen_fds(value: str, count: int, n_names: int) -> None:
    """A name count different from LISTEN_FDS is an error naming both."""
    env = activated_env(LISTEN_FDS=str(count), LISTEN_FDNAMES=value)
    with pytest.raises(ListenEnvError) as info:
        read(env)
    assert str(info.value) == (f"LISTEN_FDNAMES={value!r} names {n_names} fds but LISTEN_FDS={count}")


def test_listen_fdnames_colon_always_separates() -> None:
    """A name cannot contain ':': it always splits, so 'a:b' is two names."""
    result = read_activated(activated_env(LISTEN_FDS="2", LISTEN_FDNAMES="a:b"))
    assert result.names == ("a", "b")
    with pytest.raises(ListenEnvError, match="names 2 fds but LISTEN_FDS=1"):
        read(activated_env(LISTEN_FDS="1", LISTEN_FDNAMES="a:b"))


def test_listen_fdnames_backslash_is_literal() -> None:
    """Managers never escape, so '\\' is part of the name (libsystemd's
    splitter would unescape 'a\\:b' into one name 'a:b'; we do not)."""
    result = read_activated(activated_env(LISTEN_FDS="2", LISTEN_FDNAMES="a\\:b"))
    assert result.names == ("a\\", "b")


@pytest.mark.parametrize(
    "name",
    ["\x00", "a\x01b", "a\tb", "a\nb", "a\x7fb", "caf\xe9", "\u540d", "\U0001f600", "y" * 256, "z" * 5000],
    ids=["nul", "control", "tab", "newline", "del", "latin1", "cjk", "emoji", "256", "5000"],
)
def test_listen_fdnames_names_are_taken_as_passed_without_validation(name: str) -> None:
    """libsystemd takes any characters and any length in a passed name; so
    does the reader.  Whether a name is acceptable is judged where it is
    declared (the manifest), and an undeclared passed name is only unclaimed."""
    result = read_activated(activated_env(LISTEN_FDNAMES="fine:" + name))
    assert result.names == ("fine", name)


def test_listen_fdnames_duplicates_are_valid() -> None:
    """Several fds may share one name."""
    env = activated_env(LISTEN_FDS="3", LISTEN_FDNAMES="web:web:connection")
    assert read_activated(env).names == ("web", "web", "connection")


# --- fd_name_problem --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "http", " ", "~", "a b", "a\\b", "unknown", "x" * 255],
    ids=["empty", "word", "space", "tilde", "inner-space", "backslash", "special", "255"],
)
def test_fd_name_problem_accepts_valid_names(name: str) -> None:
    """Up to 255 printable ASCII characters without ':' (empty included)."""
    assert fd_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (":", "contains ':'"),
        ("a:b", "contains ':'"),
        ("x" * 256, "is longer than 255 characters (256)"),
        ("a\x1fb", "contains a non-printable or non-ASCII character '\\x1f' at position 1"),
        ("\x7f", "contains a non-printable or non-ASCII character '\\x7f' at position 0"),
        ("caf\xe9", "contains a non-printable or non-ASCII character '\xe9' at position 3"),
    ],
)
def test_fd_name_problem_says_why(name: str, problem: str) -> None:
    """An invalid name gets a short phrase saying what is wrong."""
    assert fd_name_problem(name) == problem


# --- format_listen_env ------------------------------------------------------


def test_format_listen_env_without_pidfd_id() -> None:
    """LISTEN_PIDFDID is left out when the pidfd id is unknown."""
    assert format_listen_env(["a", "", "a"], pid=PID, pidfd_id=None) == {
        "LISTEN_PID": str(PID),
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "a::a",
    }


@pytest.mark.parametrize("pidfd_id", [0, PIDFD_ID, UINT64_MAX])
def test_format_listen_env_with_pidfd_id(pidfd_id: int) -> None:
    """LISTEN_PIDFDID is set whenever the id is known, 0 included."""
    env = format_listen_env(("web",), pid=PID, pidfd_id=pidfd_id)
    assert env == {
        "LISTEN_PID": str(PID),
        "LISTEN_PIDFDID": str(pidfd_id),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "web",
    }


@pytest.mark.parametrize(
    ("names", "pid", "pidfd_id", "match"),
    [
        pytest.param([], PID, None, "zero fds", id="no-names"),
        pytest.param(["a", "b:c"], PID, None, r"fd name 1 'b:c' contains ':'", id="colon"),
        pytest.param(["a\n"], PID, None, "non-printable", id="newline"),
        pytest.param(["x" * 256], PID, None, "longer than 255", id="too-long"),
        pytest.param(["a"], 0, None, "pid 0", id="pid-zero"),
        pytest.param(["a"], INT_MAX + 1, None, "not a valid process id", id="pid-big"),
        pytest.param(["a"], PID, -1, "pidfd id -1", id="pidfd-negative"),
        pytest.param(["a"], PID, 2**64, "unsigned 64-bit", id="pidfd-big"),
    ],
)
def test_format_listen_env_rejects_what_no_reader_accepts(
    names: list[str], pid: int, pidfd_id: int | None, match: str
) -> None:
    """An activator cannot produce variables that read_listen_env rejects."""
    with pytest.raises(ValueError, match=match):
        format_listen_env(names, pid=pid, pidfd_id=pidfd_id)


def test_format_listen_env_rejects_a_single_string() -> None:
    """A str is a Sequence[str]; 'web' must not become names w, e, b."""
    with pytest.raises(TypeError):
        format_listen_env("web", pid=PID, pidfd_id=None)


def test_format_then_read_round_trips() -> None:
    """What an activator sets is read back as the same fds and names."""
    names = ("http", "", "http", "unknown", "a b")
    env = format_listen_env(names, pid=PID, pidfd_id=PIDFD_ID)
    assert read_listen_env(env, pid=PID, pidfd_id=PIDFD_ID) == ListenFds(
        fds=(3, 4, 5, 6, 7), names=names, names_given=True, pidfd_checked=True
    )


# --- unset_listen_env and take_listen_env -----------------------------------


def test_unset_listen_env_removes_only_the_four_variables() -> None:
    """All four go, absent ones are fine, other variables stay."""
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "PATH": "/bin", "LISTEN_FOO": "x"}
    unset_listen_env(env)
    assert env == {"PATH": "/bin", "LISTEN_FOO": "x"}


TAKE_PATHS = [
    pytest.param(activated_env(LISTEN_PIDFDID=str(PIDFD_ID)), ListenFds, id="activated"),
    pytest.param(
        activated_env(LISTEN_PID=str(OTHER_PID), LISTEN_PIDFDID="1"),
        NotActivated,
        id="not-for-us",
    ),
    pytest.param(
        activated_env(LISTEN_PIDFDID=str(PIDFD_ID + 1)),
        NotActivated,
        id="pidfd-not-for-us",
    ),
    pytest.param(
        activated_env(LISTEN_FDS="3", LISTEN_PIDFDID=str(PIDFD_ID)),
        ListenEnvError,
        id="error",
    ),
]


@pytest.mark.parametrize(("listen", "outcome"), TAKE_PATHS)
def test_take_listen_env_unsets_on_every_path(listen: dict[str, str], outcome: type[object]) -> None:
    """take_listen_env removes all four variables whether the result is
    activated, not for us, or an error, and leaves other variables alone."""
    env = {**listen, "PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/n"}
    assert set(LISTEN_VARIABLES) <= set(env)
    if outcome is ListenEnvError:
        with pytest.raises(ListenEnvError):
            take_listen_env(env, pid=PID, pidfd_id=PIDFD_ID)
    else:
        result = take_listen_env(env, pid=PID, pidfd_id=PIDFD_ID)
        assert isinstance(result, outcome)
    assert env == {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/n"}


@pytest.mark.parametrize(("listen", "outcome"), TAKE_PATHS)
def test_take_listen_env_unset_false_keeps_the_variables(
    listen: dict[str, str], outcome: type[object]
) -> None:
    """With unset=False the environment is left exactly as it was."""
    env = dict(listen)
    if outcome is ListenEnvError:
        with pytest.raises(ListenEnvError):
            take_listen_env(env, pid=PID, pidfd_id=PIDFD_ID, unset=False)
    else:
        result = take_listen_env(env, pid=PID, pidfd_id=PIDFD_ID, unset=False)
        assert isinstance(result, outcome)
    assert env == listen


# --- properties -------------------------------------------------------------

valid_names = st.lists(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=":"),
        max_size=255,
    ),
    min_size=1,
    max_size=20,
)


@given(
    names=valid_names,
    pid=st.integers(min_value=1, max_value=INT_MAX),
    pidfd_id=st.none() | st.integers(min_value=0, max_value=UINT64_MAX),
)
def test_property_format_then_read_round_trips(names: list[str], pid: int, pidfd_id: int | None) -> None:
    """For any valid names and pid, reading what format_listen_env wrote gives
    the names back on fds 3 .. 3+n-1."""
    env = format_listen_env(names, pid=pid, pidfd_id=pidfd_id)
    result = read_listen_env(env, pid=pid, pidfd_id=pidfd_id)
    assert result == ListenFds(
        fds=tuple(range(3, 3 + len(names))),
        names=tuple(names),
        names_given=True,
        pidfd_checked=pidfd_id is not None,
    )


any_number_text = (
    st.text()
    | st.integers(min_value=-(2**70), max_value=2**70).map(str)
    | st.from_regex(r"\A[ +\-0]?(0[xob])?[0-9]{1,25}\s?\Z")
)


@given(value=any_number_text)
def test_property_any_listen_fds_value_is_a_result_or_listen_env_error(
    value: str,
) -> None:
    """Whatever LISTEN_FDS holds, the reader returns or raises ListenEnvError,
    and it only accepts the canonical decimal spelling of the count."""
    result = read_or_error(activated_env(LISTEN_FDS=value, LISTEN_FDNAMES=None))
    if isinstance(result, ListenEnvError):
        assert str(result).startswith("LISTEN_FDS=")
        return
    assert isinstance(result, ListenFds)
    assert value == str(len(result.fds))
    assert result.fds == tuple(range(3, 3 + len(result.fds)))


optional_text = st.none() | st.text(max_size=40) | any_number_text


@given(
    pid_value=st.just(str(PID)) | optional_text,
    pidfd_value=optional_text,
    fds_value=optional_text,
    names_value=optional_text,
    pidfd_id=st.none() | st.integers(min_value=0, max_value=UINT64_MAX),
)
def test_property_any_environment_is_a_result_or_listen_env_error(
    pid_value: str | None,
    pidfd_value: str | None,
    fds_value: str | None,
    names_value: str | None,
    pidfd_id: int | None,
) -> None:
    """No combination of the four variables raises anything but
    ListenEnvError; an activation always has one name per fd."""
    env = {
        key: value
        for key, value in zip(LISTEN_VARIABLES, (pid_value, pidfd_value, fds_value, names_value), strict=True)
        if value is not None
    }
    result = read_or_error(env, pidfd_id)
    if isinstance(result, ListenEnvError):
        assert str(result).split("=", 1)[0] in LISTEN_VARIABLES
    elif isinstance(result, ListenFds):
        assert len(result.names) == len(result.fds) >= 1
        assert all(":" not in name for name in result.names)


# --- side by side with libsystemd ---------------------------------------------

# Runs in a child that the shell made the LISTEN_PID of: libsystemd's
# sd_listen_fds_with_names() first (without unsetting), then this reader, on
# the same environment and the same open fds 3...
_SIDE_BY_SIDE = r"""
import ctypes, json, os
from trio_activate.errors import ListenEnvError
from trio_activate.system.fds import own_pidfd_id
from trio_activate.model.listen_env import ListenFds, read_listen_env

lib = ctypes.CDLL("libsystemd.so.0")
names_out = ctypes.POINTER(ctypes.c_char_p)()
lib.sd_listen_fds_with_names.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.POINTER(ctypes.c_char_p))]
count = lib.sd_listen_fds_with_names(0, ctypes.byref(names_out))
theirs = [names_out[i].decode("utf-8") for i in range(count)] if count > 0 else -count
try:
    result = read_listen_env(os.environ, pid=os.getpid(), pidfd_id=own_pidfd_id())
    ours = list(result.names) if isinstance(result, ListenFds) else result.reason
except ListenEnvError as exc:
    ours = str(exc)
print(json.dumps({"libsystemd": theirs, "trio_activate": ours}))
"""


def _libsystemd_available() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libsystemd.so.0")
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    not _libsystemd_available(), reason="libsystemd.so.0 is not installed (Debian package libsystemd0)"
)
@pytest.mark.parametrize(
    "names",
    [
        pytest.param(["web", "a\tb"], id="tab"),
        pytest.param(["web", "a\x01b"], id="control"),
        pytest.param(["web", "a\x7fb"], id="del"),
        pytest.param(["web", "caf\xe9-\u540d"], id="utf-8"),
        pytest.param(["web", "x" * 256], id="256-characters"),
        pytest.param(["", "web", ""], id="empty-names"),
        pytest.param([""], id="one-empty-name"),
    ],
)
def test_listen_fdnames_are_read_as_libsystemd_reads_them(names: list[str]) -> None:
    """sd_listen_fds_with_names() and read_listen_env() give the same names,
    in a real process whose LISTEN_PID the shell set to its own PID ($$)."""
    opens = " ".join(f"{SD_LISTEN_FDS_START + index}</dev/null" for index in range(len(names)))
    env = {
        **os.environ,
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
    }
    for variable in ("LISTEN_PID", "LISTEN_PIDFDID"):
        env.pop(variable, None)
    out = subprocess.run(
        ["/bin/sh", "-c", f'exec {opens}; LISTEN_PID=$$ exec "$0" "$@"', sys.executable, "-c", _SIDE_BY_SIDE],
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert json.loads(out.stdout) == {"libsystemd": names, "trio_activate": names}
