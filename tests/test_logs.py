"""Log lines: timestamped text, journald's priority prefix, JSON; the options on either side of the command.

The line shapes are checked pure (`model.log_lines`), the journald rule on
real fds (`system.journal_stream`), and then on real services: stderr to a
file that ``JOURNAL_STREAM`` names (as systemd sets it up) or not, JSON
lines from a supervisor and its workers, ``--log-level`` after the command,
a single-process reload's successor.  The journal itself, under the real
systemd, is in ``test_systemd.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest
from helpers import (
    TEXT_LINE,
    app_manifest,
    ask,
    clean_env,
    loopback,
    run_cli,
    running,
    write_handler,
    write_manifest,
)

from trio_activate.model.log_lines import (
    journal_text,
    json_line,
    local_time,
    parse_journal_stream,
    syslog_priority,
    utc_time,
)
from trio_activate.system.journal_stream import is_journal_stream

# --- the shapes, pure -------------------------------------------------------------


@pytest.mark.parametrize(("levelno", "priority"), [(50, 3), (40, 3), (30, 4), (20, 6), (10, 7), (5, 7)])
def test_levels_map_to_syslog_priorities(levelno: int, priority: int) -> None:
    assert syslog_priority(levelno) == priority


def test_journal_text_prefixes_every_line_so_a_traceback_keeps_its_priority() -> None:
    assert journal_text(3, "failed\nTraceback:\n  line", tag="worker 7: ") == (
        "<3>worker 7: failed\n<3>worker 7: Traceback:\n<3>worker 7:   line"
    )
    assert journal_text(6, "ready") == "<6>ready"


def test_times_have_milliseconds_local_and_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", local_time(1_700_000_000.9996))
    assert utc_time(1_700_000_000.9996) == "2023-11-14T22:13:20.999Z"
    assert utc_time(1_700_000_000.0) == "2023-11-14T22:13:20.000Z"


def test_a_json_line_is_one_line_with_the_fields_that_are_set() -> None:
    line = json_line(
        seconds=1_700_000_000.5,
        level="error",
        pid=42,
        logger="trio_activate",
        message="two\nlines \u00e9",
        fields={"socket": "web", "handler": None, "generation": 3},
        exception="Traceback (most recent call last):\n  boom",
    )
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.500Z",
        "level": "error",
        "pid": 42,
        "logger": "trio_activate",
        "message": "two\nlines \u00e9",
        "socket": "web",
        "generation": 3,
        "exception": "Traceback (most recent call last):\n  boom",
    }


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("8:1234", (8, 1234)),
        ("0:0", (0, 0)),
        ("", None),
        ("8", None),
        ("8:", None),
        ("x:1", None),
        ("8:1:2", None),
    ],
)
def test_journal_stream_is_device_colon_inode(text: str, parsed: tuple[int, int] | None) -> None:
    assert parse_journal_stream(text) == parsed


def test_only_the_stream_journal_stream_names_is_the_journal(tmp_path: Path) -> None:
    named, other = tmp_path / "named", tmp_path / "other"
    with named.open("w") as stream, other.open("w") as elsewhere:
        st = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal_stream(stream.fileno(), environ)
        assert not is_journal_stream(elsewhere.fileno(), environ)
        assert not is_journal_stream(stream.fileno(), {})
        assert not is_journal_stream(stream.fileno(), {"JOURNAL_STREAM": "garbage"})


# --- real services ----------------------------------------------------------------


def journal_stream_of(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def test_under_journald_lines_carry_a_priority_and_no_timestamp_or_prefix(tmp_path: Path) -> None:
    """stderr is the file JOURNAL_STREAM names, as systemd sets up a service's stream."""
    stderr = tmp_path / "stderr"
    stderr.touch()
    manifest = app_manifest(tmp_path, workers=2)
    write_handler(tmp_path, "v1")
    env = clean_env(JOURNAL_STREAM=journal_stream_of(stderr))
    with running("serve", manifest, cwd=tmp_path, env=env, stderr_file=stderr) as service:
        service.wait_for(r"^<6>ready: generation 1, 2 worker")
        assert service.stop() == 0
    lines = service.lines
    assert lines, service.log
    for line in lines:
        assert re.match(r"<[3467]>", line), line
        assert "trio-activate[" not in line, line
        assert not re.search(r"\d\d:\d\d:\d\d", line), line
    # journald tells the lines of the process it started (the supervisor) by their PID,
    # not those of its workers, which write to the same stream: theirs name them.
    tagged = {int(m[1]) for line in lines if (m := re.match(r"<6>worker (\d+): ready: ", line))}
    assert len(tagged) == 2, service.log
    assert service.pid not in tagged
    assert "<6>ready: generation 1, 2 worker(s)" in lines


def test_a_journal_stream_that_is_not_stderr_gives_timestamped_text(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited, stderr redirected since: the terminal's format."""
    elsewhere = tmp_path / "journal"
    elsewhere.touch()
    manifest = app_manifest(tmp_path)
    write_handler(tmp_path, "v1")
    env = clean_env(JOURNAL_STREAM=journal_stream_of(elsewhere))
    with running("serve", manifest, cwd=tmp_path, env=env) as service:
        service.wait_for(TEXT_LINE + r"ready: ")
        assert service.stop() == 0
    for line in service.lines:
        assert re.match(TEXT_LINE, line), line
        assert not line.startswith("<"), line


BROKEN_HANDLER = """\
async def handle(stream):
    await stream.receive_some(100)
    raise RuntimeError("broken on purpose")
"""


def test_json_lines_parse_and_carry_what_each_line_is_about(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(BROKEN_HANDLER)
    manifest = app_manifest(tmp_path, workers=2)
    with running(
        "serve", "--log-format", "json", "--log-level", "debug", manifest, cwd=tmp_path, env=clean_env()
    ) as service:
        port = service.wait_for(r'"message": "sockets.web: listening on 127.0.0.1:(\d+)')[1]
        service.wait_for(r'"message": "ready: generation 1')
        with socket.create_connection(loopback(int(port)), timeout=5) as client:
            client.sendall(b"x\n")
            assert client.recv(10) == b""
        service.wait_for(r"a connection on sockets.web raised")
        assert service.stop() == 0
    records = [json.loads(line) for line in service.lines]
    for record in records:
        assert set(record) >= {"time", "level", "pid", "logger", "message"}, record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        assert record["level"] in {"debug", "info", "warning", "error"}
        assert record["logger"] == "trio_activate"
    started = [r for r in records if r["message"].startswith("generation 1: started worker ")]
    assert len(started) == 2
    workers = {r["worker_pid"] for r in started}
    assert all(r["generation"] == 1 and r["pid"] == service.pid for r in started)
    assert workers == {int(r["message"].rsplit(" ", 1)[1]) for r in started}
    ready = [r for r in records if r["message"].startswith("worker ") and r["message"].endswith(" ready")]
    assert {r["worker_pid"] for r in ready} == workers
    # Each worker's own lines, under its own PID; the banner names the socket.
    banners = [r for r in records if r["message"].startswith("sockets.web: 127.0.0.1:")]
    assert {r["pid"] for r in banners} == workers
    assert all(r["socket"] == "web" for r in banners)
    (failed,) = [r for r in records if "raised" in r["message"]]
    assert failed["level"] == "error"
    assert (failed["socket"], failed["handler"]) == ("web", "web")
    assert failed["pid"] in workers
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].rstrip().endswith("RuntimeError: broken on purpose")


def test_log_level_after_the_command_reaches_the_workers(tmp_path: Path) -> None:
    manifest = app_manifest(tmp_path, workers=2)
    write_handler(tmp_path, "v1")
    with running("serve", "--log-level", "debug", manifest, cwd=tmp_path, env=clean_env()) as service:
        service.wait_for(r"ready: generation 1, 2 worker")
        workers = service.workers_of(1)
        assert len(workers) == 2
        # Each worker logs at debug too: each adopted the socket it was passed.
        for pid in workers:
            service.wait_for(rf"trio-activate\[{pid}\]: debug: sockets\.web: adopted fd 3 \(IPv4 stream ")
        # The supervisor's own adoption, and the command line each worker got.
        assert service.count(rf"trio-activate\[{service.pid}\]: debug: sockets\.web: adopted fd 3 ") == 1
        spawned = service.count(r"debug: spawned process \d+: .* --log-level debug --log-format text serve ")
        assert spawned == 2
        assert service.stop() == 0
    for line in service.lines:
        assert re.match(TEXT_LINE, line), line


def test_a_single_process_reload_gives_the_successor_the_same_level_and_format(tmp_path: Path) -> None:
    manifest = app_manifest(tmp_path)
    write_handler(tmp_path, "v1")
    args = ("serve", "--log-format", "json", "--log-level", "debug", manifest)
    with running(*args, cwd=tmp_path, env=clean_env()) as service:
        port = int(service.wait_for(r'"message": "sockets.web: listening on 127.0.0.1:(\d+)')[1])
        service.wait_for(r'"message": "ready: ')
        write_handler(tmp_path, "v2")
        service.send_signal(signal.SIGHUP)
        service.wait_for(r'"message": "handed over to process \d+"')
        assert ask(loopback(port), "x").version == "v2"
        records = [json.loads(line) for line in service.lines]
        (handed,) = [r for r in records if r["message"].startswith("handed over")]
        successor = handed["worker_pid"]
        steps = [r["message"] for r in records if r["message"].startswith("reload: ")]
        assert steps == [
            f"reload: started the successor {successor}; waiting for its READY=1",
            f"reload: the successor {successor} is ready",
        ]
        mine = [r for r in records if r["pid"] == successor]
        assert any(r["level"] == "debug" and "adopted fd 3" in r["message"] for r in mine), mine
        since = service.mark()
        os.kill(successor, signal.SIGTERM)
        service.wait_for(rf'"pid": {successor}, .*"message": "stopped: ', since=since)


@pytest.mark.parametrize(
    "args",
    [
        ["--log-format", "xml", "check", "m.toml"],
        ["check", "--log-format", "xml", "m.toml"],
        ["serve", "--log-format=xml", "m.toml"],
    ],
)
def test_an_unknown_log_format_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --log-format: invalid choice: 'xml'" in result.stderr
    assert "Traceback" not in result.stderr


def test_options_after_the_command_win_over_those_before(tmp_path: Path) -> None:
    write_manifest(
        tmp_path,
        """
        [sockets.web]
        listen = "127.0.0.1:0"
        [sockets.spare]
        listen = "127.0.0.1:0"
        [handlers.web]
        socket = "web"
        call = "trio_activate.examples:echo"
        """,
    )
    result = run_cli("--log-format", "text", "check", "--log-format", "json", "service.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (warning,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert warning["level"] == "warning"
    assert "spare" in warning["message"]
    result = run_cli("--log-level", "error", "check", "service.toml", cwd=tmp_path)
    assert result.stderr == ""
    result = run_cli("--log-level", "error", "check", "--log-level", "warning", "service.toml", cwd=tmp_path)
    assert re.match(TEXT_LINE, result.stderr)


def test_a_manifest_error_is_one_line_in_each_format(tmp_path: Path) -> None:
    write_manifest(tmp_path, '[sockets.web]\nlisten = "127.0.0.1:70000"\n')
    text = run_cli("serve", "service.toml", cwd=tmp_path)
    assert text.returncode == 2
    assert text.stderr.startswith("trio-activate: service.toml: sockets.web.listen: "), text.stderr
    as_json = run_cli("serve", "--log-format", "json", "service.toml", cwd=tmp_path)
    assert as_json.returncode == 2
    (record,) = [json.loads(line) for line in as_json.stderr.splitlines()]
    assert record["level"] == "error"
    assert record["message"].startswith("service.toml: sockets.web.listen: ")
    journal = run_cli("serve", "--log-format", "journal", "service.toml", cwd=tmp_path)
    assert journal.returncode == 2
    assert journal.stderr.startswith("<3>service.toml: sockets.web.listen: "), journal.stderr
    assert journal.stderr.count("\n") == 1
