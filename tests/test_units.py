"""systemd units from a manifest: every option mapped, verified by systemd itself, and run for real."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import free_port, require_peer
from helpers.systemd_versions import SYSTEMD_254_VARIABLE, systemd_254_root

from trio_activate.errors import ManifestError
from trio_activate.model.manifest import load_manifest, parse_manifest
from trio_activate.model.units import NeededPath, hidden_by, render_units, unit_name_part

CONFIG = Path(__file__).parent.parent / "config"
COMMAND = [sys.executable, "-m", "trio_activate"]

EVERY_OPTION = """
[service]
name = "every"
grace-period = 12.5

[sockets.web]
listen = ["127.0.0.1:8080", "[::1]:8080", "8081"]
backlog = 128
reuse-port = true
ipv6-only = true
free-bind = true

[sockets.api]
listen = "/run/every/api.sock"
type = "seqpacket"
mode = "0660"
owner = "root"
group = "root"
remove-on-stop = true

[sockets.dns]
listen = ["127.0.0.1:5353", "@every-dns"]
type = "datagram"

[handlers.web]
socket = ["web", "api"]
call = "m:f"

[handlers.dns]
socket = "dns"
call = "m:g"
"""


def units_of(text: str, **options: object) -> dict[str, str]:
    manifest = parse_manifest(textwrap.dedent(text), source="every.toml")
    defaults: dict[str, object] = {
        "command": COMMAND,
        "manifest_path": "/srv/every.toml",
        "systemd_version": 252,
    }
    defaults.update(options)
    return {unit.name: unit.text for unit in render_units(manifest, **defaults)}  # type: ignore[arg-type]


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if "=" in line]


def test_one_socket_unit_per_socket_name_with_every_option_mapped() -> None:
    units = units_of(EVERY_OPTION)
    assert list(units) == ["every-web.socket", "every-api.socket", "every-dns.socket", "every.service"]
    assert directives(units["every-web.socket"]) == [
        "Description=every: socket web",
        "ListenStream=127.0.0.1:8080",
        "ListenStream=[::1]:8080",
        "ListenStream=8081",
        "FileDescriptorName=web",
        "Service=every.service",
        "Backlog=128",
        "ReusePort=yes",
        "FreeBind=yes",
        "BindIPv6Only=ipv6-only",
        "WantedBy=sockets.target",
    ]
    api = directives(units["every-api.socket"])
    assert "ListenSequentialPacket=/run/every/api.sock" in api
    assert {"SocketMode=0660", "SocketUser=root", "SocketGroup=root", "RemoveOnStop=yes"} <= set(api)
    dns = directives(units["every-dns.socket"])
    assert dns[1:3] == ["ListenDatagram=127.0.0.1:5353", "ListenDatagram=@every-dns"]
    assert not any(line.startswith("Backlog=") for line in dns), "Backlog= is for stream sockets"


def test_the_service_runs_serve_with_every_socket() -> None:
    service = directives(units_of(EVERY_OPTION)["every.service"])
    sockets = "every-web.socket every-api.socket every-dns.socket"
    assert f"Sockets={sockets}" in service
    assert f"Requires={sockets}" in service
    assert f"ExecStart={shlex.join(COMMAND)} serve --supervise /srv/every.toml" in service, (
        "a supervisor keeps the main PID: systemd 252 cannot follow a hand-over"
    )
    assert "Type=notify" in service
    # start-timeout 30 + grace-period 12.5, rounded up, + 10: the worst case of a failed reload.
    assert f"ExecReload={shlex.join(COMMAND)} reload --wait --timeout 53 $MAINPID" in service
    assert "NotifyAccess=main" in service
    assert "KillMode=mixed" in service
    assert "TimeoutStopSec=23" in service, "above grace-period (12.5 s, rounded up) with a margin"
    assert "WantedBy=multi-user.target" in service


def test_a_configuration_error_is_not_restarted() -> None:
    service = directives(units_of(EVERY_OPTION)["every.service"])
    assert "Restart=on-failure" in service
    assert "RestartPreventExitStatus=2" in service, "exit 2: the one-line error; restarting cannot help"


def test_the_access_log_is_no_systemd_directive() -> None:
    """``access-log`` is the runtime's: the units are the same with it on."""
    with_log = EVERY_OPTION.replace('call = "m:f"\n', 'call = "m:f"\naccess-log = true\n')
    assert with_log != EVERY_OPTION
    assert units_of(with_log) == units_of(EVERY_OPTION)


def test_watchdog_becomes_watchdog_sec() -> None:
    for value, directive in (("3", "WatchdogSec=3"), ("1.5", "WatchdogSec=1500ms")):
        text = EVERY_OPTION.replace("grace-period = 12.5", f"grace-period = 12.5\nwatchdog = {value}")
        assert directive in directives(units_of(text)["every.service"])
    assert not any(
        line.startswith("WatchdogSec=") for line in directives(units_of(EVERY_OPTION)["every.service"])
    )


def test_an_accept_socket_gets_accept_yes_and_a_template_service_of_its_own() -> None:
    text = EVERY_OPTION.replace("free-bind = true", "free-bind = true\naccept = true").replace(
        'call = "m:f"', 'call = "m:f"\nmax-connections = 32'
    )
    units = units_of(text)
    assert list(units) == [
        "every-web.socket",
        "every-api.socket",
        "every-dns.socket",
        "every.service",
        "every-web@.service",
    ]
    web = directives(units["every-web.socket"])
    assert "Accept=yes" in web
    assert "MaxConnections=32" in web
    assert not any(line.startswith("Service=") for line in web), "Accept=yes takes no Service="
    service = directives(units["every.service"])
    assert "Sockets=every-api.socket every-dns.socket" in service, "the listening sockets only"
    template = directives(units["every-web@.service"])
    assert f"ExecStart={shlex.join(COMMAND)} serve /srv/every.toml" in template
    assert not any(line.startswith(("Type=notify", "ExecReload=")) for line in template)


def test_only_accept_sockets_means_no_main_service() -> None:
    text = """
    [sockets.c]
    listen = "127.0.0.1:9000"
    accept = true
    [handlers.c]
    socket = "c"
    call = "m:f"
    """
    assert list(units_of(text)) == ["service-c.socket", "service-c@.service"]


def test_systemd_253_and_later_get_notify_reload_and_the_reload_that_can_fail() -> None:
    service = directives(units_of(EVERY_OPTION, systemd_version=253)["every.service"])
    assert "Type=notify-reload" in service
    # READY=1 alone always ends a notify-reload well: the waiting command sends SIGHUP and
    # fails the reload; systemd's own signal must not start a second one.
    assert "ReloadSignal=SIGCONT" in service
    assert f"ExecReload={shlex.join(COMMAND)} reload --wait --timeout 53 $MAINPID" in service


def test_unknown_systemd_version_gets_plain_notify() -> None:
    assert "Type=notify" in directives(units_of(EVERY_OPTION, systemd_version=None)["every.service"])


def test_user_units_are_wanted_by_default_target() -> None:
    assert "WantedBy=default.target" in units_of(EVERY_OPTION, user=True)["every.service"]


def test_name_overrides_the_service_name() -> None:
    assert "other.service" in units_of(EVERY_OPTION, name="other")


def test_socket_names_are_escaped_for_unit_names_and_specifiers() -> None:
    units = units_of('[sockets."a b%"]\nlisten = "127.0.0.1:1"\n')
    assert "service-a\\x20b\\x25.socket" in units
    assert "FileDescriptorName=a b%%" in units["service-a\\x20b\\x25.socket"]
    assert unit_name_part(".hidden") == "\\x2ehidden"


def test_socket_user_and_group_are_escaped_for_specifiers() -> None:
    """A '%' in an owner or group name is literal: systemd expands specifiers in SocketUser=/SocketGroup=."""
    units = units_of('[sockets.s]\nlisten = "/run/s.sock"\nowner = "a%i"\ngroup = "b%%"\n')
    socket_unit = directives(units["service-s.socket"])
    assert "SocketUser=a%%i" in socket_unit
    assert "SocketGroup=b%%%%" in socket_unit


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ('"./x.sock"', r"sockets.s.listen: ./x.sock is relative; systemd units need an absolute path"),
        ('"127.0.0.1:0"', r"sockets.s.listen: 127.0.0.1:0 asks the kernel for a port"),
        ('["127.0.0.1:1", "0"]', r"sockets.s.listen\[1\]: 0 asks the kernel for a port"),
    ],
)
def test_what_systemd_cannot_express_is_an_error_naming_the_key(listen: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        units_of(f"[sockets.s]\nlisten = {listen}\n")


def readable(tmp_path: Path) -> Path:
    """A folder the unit's DynamicUser may read: pytest makes tmp_path 0700, which it cannot enter."""
    folder = tmp_path / "readable"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    return folder


# --- least privilege ------------------------------------------------------------

ECHO = '[sockets.echo]\nlisten = "127.0.0.1:7000"\n'


def service_lines(text: str, **options: object) -> list[str]:
    (service,) = [unit for name, unit in units_of(text, **options).items() if name.endswith(".service")]
    return service.splitlines()


def test_without_a_user_the_service_runs_as_a_dynamic_user() -> None:
    lines = service_lines(ECHO)
    assert "DynamicUser=yes" in lines
    assert not any(line.startswith(("User=", "Group=")) for line in lines)


def test_user_and_group_become_user_and_group() -> None:
    lines = service_lines('[service]\nuser = "www"\ngroup = 33\n' + ECHO)
    assert {"User=www", "Group=33"} <= set(lines)
    assert "DynamicUser=yes" not in lines


def test_the_service_is_sandboxed_and_has_no_capabilities() -> None:
    lines = set(service_lines(ECHO))
    assert {
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "PrivateUsers=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "SystemCallArchitectures=native",
        "SystemCallErrorNumber=EPERM",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "UMask=0077",
        "IPAddressDeny=any",
    } <= lines


@pytest.mark.parametrize(
    ("listen", "families"),
    [
        ('"/run/x.sock"', "AF_UNIX"),
        ('"@x"', "AF_UNIX"),
        ('"127.0.0.1:1"', "AF_UNIX AF_INET"),
        ('"[::1]:1"', "AF_UNIX AF_INET6"),
        ('"1"', "AF_UNIX AF_INET AF_INET6"),
    ],
)
def test_address_families_are_af_unix_and_the_manifests(listen: str, families: str) -> None:
    assert f"RestrictAddressFamilies={families}" in service_lines(f"[sockets.s]\nlisten = {listen}\n")


def test_a_needed_path_the_sandbox_hides_is_bound_back_read_only_saying_why() -> None:
    needed = [
        NeededPath("/root/.pyenv/versions/3.11.7", "The interpreter's installation"),
        NeededPath("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages", "The folder holding trio"),
        NeededPath("/tmp/svc", "The manifest's folder"),
        NeededPath("/srv/app", "The python-path folder 'app'"),
    ]
    lines = service_lines(ECHO, needed_paths=needed)
    assert "ProtectHome=tmpfs" in lines, "an empty home hierarchy, on which bound folders appear"
    binds = [line for line in lines if line.startswith("BindReadOnlyPaths=")]
    assert binds == ["BindReadOnlyPaths=/root/.pyenv/versions/3.11.7", "BindReadOnlyPaths=/tmp/svc"], (
        "one bind per hidden folder, none inside another, none for what stays visible"
    )
    assert (
        "# The interpreter's installation (/root/.pyenv/versions/3.11.7) is hidden by ProtectHome=: "
        "bound back, read-only."
    ) in lines
    assert "# The manifest's folder (/tmp/svc) is hidden by PrivateTmp=: bound back, read-only." in lines


def test_tls_files_outside_the_manifests_folder_are_bound_back_read_only_and_the_units_verify(
    tmp_path: Path,
) -> None:
    """The service reads an asgi handler's TLS files: /tmp is PrivateTmp=, so each is bound back."""
    folder = readable(tmp_path)
    tls = folder / "tls"
    tls.mkdir(mode=0o755)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tls / name).write_text("PEM")
        (tls / name).chmod(0o644)
    manifest = folder / "svc" / "web.toml"
    manifest.parent.mkdir(mode=0o755)
    (manifest.parent / "inside.pem").write_text("PEM")
    manifest.write_text(
        '[sockets.web]\nlisten = "127.0.0.1:8443"\n[handlers.web]\nsocket = "web"\nkind = "asgi"\n'
        'call = "app:app"\n[handlers.web.http]\ncertfile = "../tls/cert.pem"\n'
        f'keyfile = "{tls / "key.pem"}"\nca-certs = "inside.pem"\n'
    )
    out = tmp_path / "units"
    out.mkdir()
    result = write_units(manifest, out)
    assert result.returncode == 0, result.stderr
    lines = (out / "web.service").read_text().splitlines()
    prefix = "BindReadOnlyPaths="
    binds = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
    assert str(tls / "cert.pem") in binds
    assert str(tls / "key.pem") in binds
    assert str(manifest.parent) in binds
    assert str(manifest.parent / "inside.pem") not in binds, "reached through the manifest's folder"
    assert (
        f"# The TLS file handlers.web.http.keyfile ({tls / 'key.pem'}) is hidden by PrivateTmp=: "
        "bound back, read-only."
    ) in lines
    checked = verify(out)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_hidden_by_names_the_setting() -> None:
    assert [hidden_by(p) for p in ("/home/a", "/root", "/run/user/1/x", "/tmp/x", "/var/tmp", "/srv")] == [
        "ProtectHome=",
        "ProtectHome=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateTmp=",
        None,
    ]
    assert hidden_by("/homework") is None


def test_unit_extra_comes_last_in_the_service_section_under_a_comment() -> None:
    manifest = parse_manifest(
        '[service]\nunit-extra = ["IPAddressAllow=10.0.0.1", "MemoryDenyWriteExecute=no"]\n' + ECHO,
        path=Path("/srv/app.toml"),
    )
    service = render_units(manifest, command=COMMAND, manifest_path="/srv/app.toml", systemd_version=252)[-1]
    section = service.text.split("[Service]\n")[1].split("\n\n")[0].splitlines()
    assert section[-3:] == [
        "# From app.toml's [service] unit-extra (later lines override the ones above):",
        "IPAddressAllow=10.0.0.1",
        "MemoryDenyWriteExecute=no",
    ]


def test_user_units_get_the_unprivileged_settings_only() -> None:
    lines = service_lines(ECHO, user=True, needed_paths=[NeededPath("/home/me/venv", "The interpreter")])
    assert "NoNewPrivileges=yes" in lines
    assert "SystemCallFilter=@system-service" in lines
    for needs_a_system_manager in ("DynamicUser=", "ProtectSystem=", "PrivateUsers=", "BindReadOnlyPaths="):
        assert not any(line.startswith(needs_a_system_manager) for line in lines)


def test_a_user_unit_with_a_user_is_an_error() -> None:
    manifest = parse_manifest('[service]\nuser = "www"\n' + ECHO, path=Path("/srv/every.toml"))
    with pytest.raises(ManifestError) as info:
        render_units(
            manifest, command=COMMAND, manifest_path="/srv/every.toml", systemd_version=252, user=True
        )
    assert str(info.value) == (
        "every.toml: service.user: a --user unit runs as its manager's user; leave user unset for --user"
    )


def exposure(analyze: str, service: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(service)], capture_output=True, text=True, timeout=60
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("path", sorted(CONFIG.glob("*.toml")), ids=lambda p: p.name)
def test_systemd_analyze_security_rates_every_example_ok(path: Path, tmp_path: Path) -> None:
    """`systemd-analyze security` rates 0-4.9 "OK" or better; the README gives the figures."""
    analyze = require_peer("systemd-analyze")
    assert write_units(path, tmp_path).returncode == 0
    (service,) = tmp_path.glob("*.service")
    assert exposure(analyze, service) <= 4.9


def test_the_exposure_check_can_fail(tmp_path: Path) -> None:
    analyze = require_peer("systemd-analyze")
    assert write_units(CONFIG / "echo.toml", tmp_path).returncode == 0
    service = tmp_path / "echo.service"
    plain = [line for line in service.read_text().splitlines() if "=" not in line or "Exec" in line]
    service.write_text("\n".join(plain) + "\n")
    assert exposure(analyze, service) > 4.9


def verify(folder: Path) -> subprocess.CompletedProcess[str]:
    analyze = require_peer("systemd-analyze")
    names = sorted(str(p) for p in folder.iterdir())
    return subprocess.run([analyze, "verify", *names], capture_output=True, text=True, timeout=60)


def write_units(manifest: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "systemd", str(manifest), "--output", str(folder), "--systemd-version", "252", *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("path", sorted(CONFIG.glob("*.toml")), ids=lambda p: p.name)
def test_units_for_every_example_verify_cleanly(path: Path, tmp_path: Path) -> None:
    if any(a for s in load_manifest(path).sockets for a in s.listen if str(a).startswith(".")):
        pytest.skip("relative unix paths are for development")
    result = write_units(path, tmp_path)
    assert result.returncode == 0, result.stderr
    checked = verify(tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == "", "systemd-analyze warns about anything it ignores"


@pytest.mark.parametrize(
    "text",
    [
        EVERY_OPTION,
        EVERY_OPTION.replace("free-bind = true", "free-bind = true\naccept = true").replace(
            "grace-period = 12.5", "grace-period = 12.5\nwatchdog = 1.5"
        ),
    ],
    ids=["listening", "accept-and-watchdog"],
)
def test_units_with_every_option_verify_cleanly(tmp_path: Path, text: str) -> None:
    manifest = readable(tmp_path) / "every.toml"
    manifest.write_text(text)
    out = tmp_path / "units"
    out.mkdir()
    result = write_units(manifest, out)
    assert result.returncode == 0, result.stderr
    checked = verify(out)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_verify_catches_a_broken_unit_so_the_check_can_fail(tmp_path: Path) -> None:
    manifest = readable(tmp_path) / "every.toml"
    manifest.write_text(EVERY_OPTION)
    out = tmp_path / "units"
    out.mkdir()
    write_units(manifest, out)
    socket_unit = out / "every-web.socket"
    socket_unit.write_text(socket_unit.read_text().replace("Backlog=", "Backlogg="))
    assert "Backlogg" in verify(out).stderr


def test_units_are_printed_with_a_header_per_file_without_output(tmp_path: Path) -> None:
    result = subprocess.run(
        [*COMMAND, "systemd", str(CONFIG / "echo.toml"), "--systemd-version", "252"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^### (\S+)$", result.stdout, re.M) == ["echo-echo.socket", "echo.service"]


def test_existing_units_are_never_overwritten_without_force(tmp_path: Path) -> None:
    (tmp_path / "echo.service").write_text("mine")
    result = write_units(CONFIG / "echo.toml", tmp_path)
    assert result.returncode == 2
    assert "echo.service: already exists; --force overwrites" in result.stderr
    assert (tmp_path / "echo.service").read_text() == "mine"
    assert not (tmp_path / "echo-echo.socket").exists(), "all or nothing"
    assert write_units(CONFIG / "echo.toml", tmp_path, "--force").returncode == 0
    assert (tmp_path / "echo.service").read_text().startswith("[Unit]")


def test_a_manifest_systemd_cannot_express_is_one_line_exit_2(tmp_path: Path) -> None:
    manifest = tmp_path / "rel.toml"
    manifest.write_text('[sockets.s]\nlisten = "./s.sock"\n')
    result = write_units(manifest, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"trio-activate: {manifest.name}: sockets.s.listen: ./s.sock is relative; "
        "systemd units need an absolute path"
    ]


def test_the_generated_exec_start_serves_under_systemd_socket_activate(tmp_path: Path) -> None:
    """The .socket unit's Listen lines and name, given to systemd-socket-activate, reach the service."""
    activate = require_peer("systemd-socket-activate")
    # free_port: systemd-socket-activate -l refuses port 0 ("Failed to parse socket address").
    port = free_port()
    manifest = readable(tmp_path) / "echo.toml"
    manifest.write_text(
        f'[sockets.echo]\nlisten = "127.0.0.1:{port}"\n'
        '[handlers.echo]\nsocket = "echo"\ncall = "trio_activate.examples:echo"\n'
    )
    out = tmp_path / "units"
    out.mkdir()
    assert write_units(manifest, out).returncode == 0
    socket_lines = directives((out / "echo-echo.socket").read_text())
    listen = [line.split("=", 1)[1] for line in socket_lines if line.startswith("ListenStream=")]
    (name,) = [line.split("=", 1)[1] for line in socket_lines if line.startswith("FileDescriptorName=")]
    (exec_start,) = [
        line.split("=", 1)[1]
        for line in directives((out / "echo.service").read_text())
        if "ExecStart" in line
    ]
    argv = [
        activate,
        *[f"--listen={address}" for address in listen],
        f"--fdname={name}",
        *shlex.split(exec_start),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                time.sleep(0.05)
        with client:
            client.sendall(b"ping\n")
            assert client.recv(100) == b"ping\n"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err.decode()


# --- fd-store --------------------------------------------------------------------

FD_STORE = """
[service]
name = "kept"
fd-store = true

[sockets.web]
listen = ["127.0.0.1:8080", "[::1]:8080"]

[sockets.api]
listen = "/run/kept/api.sock"

[handlers.web]
socket = ["web", "api"]
call = "m:f"
"""


@pytest.mark.parametrize("version", [252, 254])
def test_fd_store_writes_no_socket_unit_and_a_store_for_every_fd(version: int) -> None:
    """The service makes its sockets and stores them: one fd per address, no .socket unit."""
    units = units_of(FD_STORE, systemd_version=version)
    assert sorted(units) == ["kept.service"]
    service = directives(units["kept.service"])
    assert "FileDescriptorStoreMax=3" in service
    assert not any(line.startswith(("Sockets=", "Requires=", "After=")) for line in service), service
    # It binds its own sockets: no IP filter on them, and the unix socket's folder is writable.
    assert "IPAddressDeny=any" not in service
    assert "ReadWritePaths=/run/kept" in service
    assert "NotifyAccess=main" in service


def test_fd_store_is_preserved_across_a_stop_only_where_systemd_has_the_setting() -> None:
    """FileDescriptorStorePreserve= came with systemd 254; 252 ignores it with a warning."""
    assert "FileDescriptorStorePreserve=yes" in directives(
        units_of(FD_STORE, systemd_version=254)["kept.service"]
    )
    for version in (252, 253, None):
        text = units_of(FD_STORE, systemd_version=version)["kept.service"]
        assert "FileDescriptorStorePreserve" not in text, version


def test_without_fd_store_there_is_no_store() -> None:
    service = units_of(EVERY_OPTION, systemd_version=254)["every.service"]
    assert "FileDescriptorStore" not in service
    assert "IPAddressDeny=any" in directives(service)


def test_fd_store_with_a_privileged_port_is_an_error_naming_the_key() -> None:
    text = FD_STORE.replace('"[::1]:8080"', '"[::1]:443"')
    with pytest.raises(ManifestError) as raised:
        units_of(text)
    assert str(raised.value).startswith("<manifest>: sockets.web.listen[1]: port 443 needs a privilege")


def test_fd_store_units_verify_cleanly(tmp_path: Path) -> None:
    manifest = readable(tmp_path) / "kept.toml"
    manifest.write_text(FD_STORE.replace("/run/kept/api.sock", "/run/api.sock"))
    out = tmp_path / "units"
    out.mkdir()
    result = write_units(manifest, out)
    assert result.returncode == 0, result.stderr
    checked = verify(out)
    assert (checked.returncode, checked.stderr) == (0, "")


# --- the runtime directory: the control socket's default home ------------------------


def runtime_lines(text: str, **options: object) -> list[str]:
    return [line for line in service_lines(text, **options) if line.startswith("RuntimeDirectory")]


def test_every_service_gets_a_runtime_directory_named_after_it_for_its_control_socket() -> None:
    """systemd sets RUNTIME_DIRECTORY, so the service makes $RUNTIME_DIRECTORY/control.sock without a
    manifest key: a folder of the service's user's (0700), removed at each stop and restart."""
    wanted = ["RuntimeDirectory=service", "RuntimeDirectoryMode=0700", "RuntimeDirectoryPreserve=no"]
    assert runtime_lines(ECHO) == wanted
    assert runtime_lines('[service]\nuser = "www"\n' + ECHO) == wanted
    assert runtime_lines(ECHO, user=True) == wanted, "a user manager makes it in $XDG_RUNTIME_DIR"
    assert runtime_lines(ECHO, name="other")[0] == "RuntimeDirectory=other", "named as the unit is"
    # systemd 254 reads RuntimeDirectory=a:b as folder a and a symlink b.
    assert runtime_lines(ECHO, name="web:blue")[0] == "RuntimeDirectory=web_blue"
    fd_store = FD_STORE.replace("/run/kept/api.sock", "/srv/api.sock")
    assert runtime_lines(fd_store)[0] == "RuntimeDirectory=kept"


def test_a_connection_template_has_no_runtime_directory() -> None:
    """Each Accept=yes instance would share it, and the first to stop would remove it from the others."""
    units = units_of(ECHO + "accept = true\n")
    assert list(units) == ["service-echo.socket", "service-echo@.service"]
    assert "RuntimeDirectory" not in units["service-echo@.service"]


@pytest.mark.parametrize(
    ("listen", "user", "folder"),
    [
        ("/run/service/web.sock", False, "service/control"),
        ("/var/run/service/web.sock", False, "service/control"),
        ("/run/service/deeper/web.sock", False, "service/control"),
        ("/run/user/1000/service/web.sock", True, "service/control"),
        # Not the service's folder: the runtime directory is /run/service itself.
        ("/run/service.sock", False, "service"),
        ("/run/services/web.sock", False, "service"),
        ("/srv/run/service/web.sock", False, "service"),
        ("/run/user/1000/service/web.sock", False, "service"),
        ("/run/service/web.sock", True, "service"),
        ("@service", False, "service"),
    ],
)
def test_socket_files_in_the_services_run_folder_keep_it_and_the_control_socket_goes_inside(
    listen: str, user: bool, folder: str
) -> None:
    """systemd would make their folder 0700 (clients locked out) and remove it, socket files and all,
    at every stop: the runtime directory becomes NAME/control, inside it."""
    assert (
        runtime_lines(f'[sockets.web]\nlisten = "{listen}"\n', user=user)[0] == f"RuntimeDirectory={folder}"
    )


def systemd_analyze_254() -> list[str]:
    """systemd 254's systemd-analyze, run from where .ci/fetch-systemd-254 unpacked it."""
    root = systemd_254_root()
    if root is None:
        if os.environ.get("REQUIRE_INTEROP_PEERS"):
            pytest.fail(f"{SYSTEMD_254_VARIABLE} is unset, and REQUIRE_INTEROP_PEERS is set")
        pytest.skip(f"{SYSTEMD_254_VARIABLE} is not set (.ci/fetch-systemd-254 unpacks 254)")
    library = root / "usr/lib/x86_64-linux-gnu/systemd"
    return ["env", f"LD_LIBRARY_PATH={library}", str(root / "usr/bin/systemd-analyze")]


@pytest.mark.parametrize("version", [252, 254])
@pytest.mark.parametrize(
    "text",
    [ECHO, EVERY_OPTION, FD_STORE.replace("/run/kept/api.sock", "/run/api.sock")],
    ids=["plain", "sockets-in-the-run-folder", "fd-store"],
)
def test_the_runtime_directory_verifies_cleanly_under_each_version(
    tmp_path: Path, text: str, version: int
) -> None:
    analyze = [require_peer("systemd-analyze")] if version == 252 else systemd_analyze_254()
    manifest = readable(tmp_path) / "service.toml"
    manifest.write_text(text)
    out = tmp_path / "units"
    out.mkdir()
    result = write_units(manifest, out, "--systemd-version", str(version))
    assert result.returncode == 0, result.stderr
    assert "RuntimeDirectory=" in "".join(path.read_text() for path in out.glob("*.service"))
    names = sorted(str(path) for path in out.iterdir())
    checked = subprocess.run([*analyze, "verify", *names], capture_output=True, text=True, timeout=60)
    assert (checked.returncode, checked.stderr) == (0, "")
