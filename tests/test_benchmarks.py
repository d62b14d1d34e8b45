"""The benchmark harness keeps working: ``benchmarks/run.py --quick`` runs and reports.

These tests check that the harness runs, prints its table and writes JSON of
the documented shape; they never assert on speed (figures on a shared
machine are noise; the targets are checked by running the harness, see
benchmarks/README.md).  Without wrk the load scenarios are skipped with a
note saying how to install it, and the run still succeeds.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"
RUN = BENCH / "run.py"

SCENARIO_IDS = [
    "1-keepalive",
    "1-keepalive-cpu",
    "2-close",
    "2-close-cpu",
    "3-startup",
    "4a-rss-idle",
    "4b-rss-1000",
    "5a-workers-keepalive",
    "5a-workers-keepalive-cpu",
    "5b-workers-close",
    "5b-workers-close-cpu",
    "6a-reload-failed",
    "6b-reload-time",
]
ROW_KEYS = {
    "contender",
    "label",
    "skipped",
    "samples",
    "median",
    "min",
    "max",
    "ratio",
    "delta",
    "errors",
    "notes",
}


def run_harness(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType, ModuleType]:
    """``harness``, ``report`` and ``asyncio_server`` from benchmarks/, imported as run.py imports them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import asyncio_server
    import harness
    import report

    return harness, report, asyncio_server


def check_shape(data: dict[str, object], ids: list[str]) -> None:
    assert {"machine", "settings", "scenarios"} <= data.keys()
    machine = data["machine"]
    assert isinstance(machine, dict)
    assert {"cores", "python", "trio", "trio_activate", "install", "wrk", "nginx"} <= machine.keys()
    assert machine["install"] in ("editable", "regular", "unknown")
    scenarios = data["scenarios"]
    assert isinstance(scenarios, list)
    assert [s["id"] for s in scenarios] == ids
    for scenario in scenarios:
        assert {"id", "title", "unit", "better", "baseline", "skipped", "notes", "rows"} <= scenario.keys()
        assert scenario["better"] in ("higher", "lower")
        for row in scenario["rows"]:
            assert row.keys() >= ROW_KEYS
            assert all(v is None or math.isfinite(v) for v in row["samples"])
            if row["skipped"] is None and scenario["skipped"] is None:
                assert row["samples"], (scenario["id"], row["contender"])


@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    """The whole quick run: every scenario is in the table and the JSON (skipped ones with a reason)."""
    out = tmp_path / "bench.json"
    done = run_harness("--quick", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| Scenario | Contender | Median | Min - max | vs Trio | Notes |" in done.stdout
    assert "Machine: " in done.stdout
    data = json.loads(out.read_text())
    check_shape(data, SCENARIO_IDS)
    for scenario in data["scenarios"]:
        assert scenario["title"] in done.stdout
        if scenario["skipped"] is not None:
            assert not scenario["skipped"].startswith("FAILED"), scenario["skipped"]


def test_without_wrk_the_load_scenarios_are_skipped_with_how_to_install_it(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_harness(
        "--quick", "--only", "keepalive,startup", "--wrk", str(tmp_path / "no-wrk-here"), "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "apt-get install wrk" in done.stderr
    data = json.loads(out.read_text())
    check_shape(data, ["1-keepalive", "1-keepalive-cpu", "3-startup"])
    keepalive, _, startup = data["scenarios"]
    assert "apt-get install wrk" in keepalive["skipped"]
    assert startup["skipped"] is None
    assert "apt-get install wrk" in done.stdout


def test_unknown_scenario_names_are_refused() -> None:
    done = run_harness("--only", "keepalive,nonsense", timeout=60)
    assert done.returncode != 0
    assert "nonsense" in done.stderr


def test_the_asyncio_port_sends_the_bytes_hello_http_sends(
    bench_modules: tuple[ModuleType, ModuleType, ModuleType],
) -> None:
    """The asyncio contender copies hello_http's response rather than import trio; the copies must agree."""
    from trio_activate import examples

    harness, _, asyncio_server = bench_modules
    assert examples._response(True) == asyncio_server.RESPONSE_CLOSE
    assert examples._response(False) == asyncio_server.RESPONSE_KEEP_ALIVE
    assert examples.HELLO_BODY == asyncio_server.HELLO_BODY == harness.HELLO_BODY
    assert examples._MAX_HEADER_BYTES == asyncio_server.MAX_HEADER_BYTES


def test_ratios_pair_samples_by_round(bench_modules: tuple[ModuleType, ModuleType, ModuleType]) -> None:
    """A row's ratio is the median of per-round ratios, not a ratio of medians; failed samples drop out."""
    _, report, _ = bench_modules
    scenario = report.Scenario("x", "x", "req/s", "higher")
    base = report.Row("trio", "trio", samples=[100.0, 200.0, 300.0])
    fast = report.Row("serve", "serve", samples=[150.0, 400.0, float("nan")])
    scenario.rows = [base, fast]
    assert scenario.ratio(fast) == pytest.approx(1.75)  # median of 1.5 and 2.0
    assert scenario.ratio(base) == pytest.approx(1.0)
    assert fast.median == pytest.approx(275.0)
    table = report.render_table([scenario])
    assert "| 1.75x |" in table


def test_deltas_pair_samples_by_round(bench_modules: tuple[ModuleType, ModuleType, ModuleType]) -> None:
    """A row's delta is the median of per-round differences, not a difference of medians
    (a slow spell moves every contender of its round together); failed samples drop out."""
    _, report, _ = bench_modules
    scenario = report.Scenario("3-startup", "3 Exec to first answer", "ms", "lower", show_delta=True)
    base = report.Row("trio", "trio", samples=[100.0, 200.0, 300.0, float("nan")])
    serve = report.Row("serve", "serve", samples=[110.0, 290.0, 330.0, 500.0])
    scenario.rows = [base, serve]
    # Pairs: +10, +90, +30, and one dropped: median +30 (the medians differ by 90).
    assert scenario.delta(serve) == pytest.approx(30.0)
    assert "+30.0 ms vs trio" in report.render_table([scenario])


def test_wrk_report_line_is_parsed(bench_modules: tuple[ModuleType, ModuleType, ModuleType]) -> None:
    harness, _, _ = bench_modules
    output = (
        "Running 1s test @ http://127.0.0.1:1/\n"
        'WRK_JSON {"requests": 5000, "duration_us": 2000000, "bytes": 1, "connect": 1, "read": 2, '
        '"write": 0, "status": 3, "timeout": 0, "latency_p50_us": 1500, "latency_p99_us": 9000}\n'
    )
    result = harness.parse_wrk(output)
    assert result.requests_per_second == 2500
    assert result.failed == 6
    assert result.latency_p99_ms == 9.0
    with pytest.raises(harness.BenchError):
        harness.parse_wrk("no report here")


FAULTS = BENCH / "faults.py"


@pytest.mark.slow
def test_faults_quick_run_leaks_no_fd_and_recovers_from_emfile() -> None:
    """``faults.py --quick`` on the parts that need no wrk: no fd is left behind by the mix of
    resets, half-closes and silent connections, and a connection queued while the server was out
    of fds is answered once one closes (no timing is asserted)."""
    done = subprocess.run(
        [sys.executable, str(FAULTS), "--quick", "--only", "fds,emfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| part | figure | target | measured | met? |" in done.stdout
    assert "| fds | fds leaked over the second 400 connections | 0 | +0 | yes |" in done.stdout
    assert "0 connections that should have been answered were not" in done.stdout
    assert "freed fd to the queued connection's answer" in done.stdout
    assert "the server logged 'accept failed: Too many open files'" in done.stdout


def test_faults_refuses_unknown_parts() -> None:
    done = subprocess.run(
        [sys.executable, str(FAULTS), "--only", "fds,nonsense"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "nonsense" in done.stderr


ASGI = BENCH / "asgi.py"
ASGI_HEADER = (
    "| part | load | figure | trio-activate serve | hypercorn alone | trio-activate / hypercorn "
    "| target | met? |"
)


@pytest.mark.slow
def test_asgi_quick_run_sets_both_servers_side_by_side_and_trio_activate_reloads_fail_nothing(
    tmp_path: Path,
) -> None:
    """``asgi.py --quick``: throughput of the same ASGI app under ``trio-activate serve`` and
    hypercorn alone, both loads, and 2 reloads of each under load; trio-activate's reloads fail
    no request (a behaviour; no timing is asserted)."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk)")
    out = tmp_path / "asgi.json"
    done = subprocess.run(
        [sys.executable, str(ASGI), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ASGI_HEADER in done.stdout
    assert "Machine: " in done.stdout
    assert "load average" in done.stdout
    data = json.loads(out.read_text())
    assert {"hypercorn", "trio_activate", "install", "loadavg", "loadavg_end"} <= data["machine"].keys()
    lines = data["lines"]
    loads = ["keep-alive", "keep-alive", "Connection: close", "Connection: close"]
    assert [(x["part"], x["load"]) for x in lines] == [("throughput", load) for load in loads] + [
        ("reloads", load) for load in loads
    ]
    for line in lines[:4]:
        samples = line["data"]["samples"]
        assert len(samples["trio-activate"]) == len(samples["hypercorn"]) == 1
        assert line["data"]["ratio"] > 0
    for line in (lines[4], lines[6]):
        ours, theirs = line["data"]["trio-activate"], line["data"]["hypercorn"]
        assert ours["requests"] > 0
        assert theirs["requests"] > 0
        assert ours["failed"] == 0, line
        assert line["met"] is True
    for line in (lines[5], lines[7]):
        assert (
            len(line["data"]["trio-activate"]["times_ms"]) == len(line["data"]["hypercorn"]["times_ms"]) == 2
        )


def test_asgi_refuses_unknown_parts() -> None:
    done = subprocess.run(
        [sys.executable, str(ASGI), "--only", "reloads,nonsense"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "nonsense" in done.stderr


ACTIVATE = BENCH / "activate.py"


def test_activate_quick_run_sets_both_activators_side_by_side_on_the_same_commands(tmp_path: Path) -> None:
    """``activate.py --quick``: ``--accept`` rates (``--inetd`` and ``LISTEN_FDS``) and the lazy first
    answer of ``trio-activate activate`` and ``systemd-socket-activate``, every connection answered
    (a behaviour; no timing is asserted)."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate not installed (apt-get install systemd)")
    out = tmp_path / "activate.json"
    done = subprocess.run(
        [sys.executable, str(ACTIVATE), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| part | figure | trio-activate activate | systemd-socket-activate |" in done.stdout
    data = json.loads(out.read_text())
    lines = data["lines"]
    assert [line["part"] for line in lines] == [
        "accept --inetd /bin/echo hello",
        "accept --inetd /bin/echo hello",
        "accept /bin/sh -c echo hello >&3",
        "accept /bin/sh -c echo hello >&3",
        "lazy",
    ]
    for line in (lines[0], lines[2]):
        assert line["notes"] == []  # no connection failed
        assert all(rate > 0 for rates in line["data"]["rates"].values() for rate in rates)
    assert all(len(times) == 3 for times in lines[4]["data"]["times_ms"].values())


def test_activate_refuses_unknown_parts() -> None:
    done = subprocess.run(
        [sys.executable, str(ACTIVATE), "--only", "lazy,nonsense"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "nonsense" in done.stderr
