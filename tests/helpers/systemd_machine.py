"""A real systemd, booted as PID 1 of fresh namespaces, for tests of the generated units.

`SystemdMachine` boots Debian's own systemd binary (or another one, e.g. 254
unpacked from bookworm-backports) as PID 1 of new pid, mount, cgroup, net,
uts and ipc namespaces, on a private cgroup2 subtree, with only the units of
the test and the few special units it needs on its unit path.  Nothing of
the host's units is loaded, no generator runs, and the host is untouched:

- ``/run`` is a tmpfs of its own, the journal lives there (a tmpfs hides the
  host's ``/var/log/journal``), and ``/dev/console`` is a log file.
- Its network namespace has only loopback: services bind 127.0.0.1 there,
  and clients reach them through `connect`, which opens the socket inside
  that namespace (``setns`` in a short-lived thread: only that thread
  switches, and a socket stays in the namespace it was made in).
- systemd as PID 1 raises the global ``fs.file-max`` (and may raise
  ``fs.nr_open``); `close` puts both back, ends the manager with
  ``systemctl exit``, kills whatever is left in its cgroup and removes it.

Every wait here is bounded: a manager that does not come up or go away in
time is a test failure with the console log attached, never a hang.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

DEBIAN_SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0
TARGET = "trio-activate-test.target"
# The special units a minimal boot needs, copied from the host's systemd.
SPECIAL_UNITS = (
    "basic.target",
    "sysinit.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "slices.target",
    "local-fs.target",
    "multi-user.target",
    "default.target",
    "shutdown.target",
    "umount.target",
    "final.target",
    "exit.target",
    "systemd-exit.service",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
SYSCTLS = (Path("/proc/sys/fs/file-max"), Path("/proc/sys/fs/nr_open"))
CLONE_NEWNET = 0x40000000

_BOOT_SCRIPT = """\
set -e
mount -t tmpfs tmpfs /run
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mount --bind "$CONSOLE_LOG" /dev/console
for pair in $BIND_MOUNTS; do mount --bind "${pair%%=*}" "${pair#*=}"; done
exec env -i container=trio-activate-test SYSTEMD_UNIT_PATH="$UNIT_DIR" \
    SYSTEMD_GENERATOR_PATH="$EMPTY_DIR" SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$EMPTY_DIR" \
    PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    "$SYSTEMD" --system --unit="$TARGET" --log-target=journal
"""


def why_cannot_boot() -> str | None:
    """None when this machine can boot systemd in namespaces, else the reason (for a skip)."""
    if os.geteuid() != 0:
        return "booting systemd in namespaces needs root"
    if not DEBIAN_SYSTEMD.exists():
        return f"{DEBIAN_SYSTEMD} is missing (apt-get install systemd)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (util-linux)"
    if cgroup2_mount() is None:
        return "no cgroup2 mount (findmnt -t cgroup2)"
    return None


def cgroup2_mount() -> Path | None:
    """Where the machine's cgroup2 hierarchy is mounted (not always /sys/fs/cgroup)."""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                return Path(before.split()[4])
    return None


class SystemdMachine:
    """One booted manager; use as a context manager (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        systemd: Path = DEBIAN_SYSTEMD,
        bind_mounts: Sequence[tuple[Path, Path]] = (),
        special_units_from: Path = Path("/lib/systemd/system"),
        version: int = 252,
    ) -> None:
        self.workdir = workdir
        self.systemd = systemd
        # The booted systemd's version: tests render the units for it.
        self.version = version
        self.bind_mounts = bind_mounts
        self.unit_dir = workdir / "units"
        self.console_log = workdir / "console.log"
        self.special_units_from = special_units_from
        self.pid1: int | None = None
        self._unshare: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None
        self._sysctls: dict[Path, str] = {}

    # --- life ---------------------------------------------------------------

    def __enter__(self) -> SystemdMachine:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def boot(self) -> None:
        self.unit_dir.mkdir(parents=True)
        empty = self.workdir / "empty"
        empty.mkdir()
        self.console_log.touch()
        for name in SPECIAL_UNITS:
            shutil.copy(self.special_units_from / name, self.unit_dir / name)
        (self.unit_dir / TARGET).write_text(
            "[Unit]\nDescription=trio-activate tests\n"
            "Wants=systemd-journald.socket systemd-journald.service sockets.target\n"
            "After=systemd-journald.socket systemd-journald.service sockets.target\n"
        )
        self._sysctls = {path: path.read_text() for path in SYSCTLS if path.exists()}
        root = cgroup2_mount()
        assert root is not None
        self._cgroup = root / f"trio-activate-test-{os.getpid()}-{time.monotonic_ns()}"
        self._cgroup.mkdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CONSOLE_LOG": str(self.console_log),
            "UNIT_DIR": str(self.unit_dir),
            "EMPTY_DIR": str(empty),
            "SYSTEMD": str(self.systemd),
            "TARGET": TARGET,
            "BIND_MOUNTS": " ".join(f"{src}={dst}" for src, dst in self.bind_mounts),
        }
        # The shell moves itself into the fresh cgroup, then becomes unshare:
        # the new cgroup namespace is rooted at that cgroup.
        starter = (
            f'echo $$ > "{self._cgroup}/cgroup.procs" && exec unshare --pid --fork --mount --mount-proc '
            '--cgroup --net --uts --ipc --propagation private sh -c "$BOOT"'
        )
        env["BOOT"] = _BOOT_SCRIPT
        with open(self.workdir / "unshare.log", "wb") as log:
            self._unshare = subprocess.Popen(
                ["sh", "-c", starter],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self.pid1 = self._wait_for_pid1()
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.systemctl("is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if self._unshare.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"systemd did not come up (state {state!r}):\n{self.diagnostics()}")

    def _wait_for_pid1(self) -> int:
        assert self._unshare is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise RuntimeError(f"unshare exited with {self._unshare.returncode}:\n{self.diagnostics()}")
            for child in _children(self._unshare.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/exe").resolve() == self.systemd.resolve():
                        return child
            time.sleep(0.02)
        raise RuntimeError(f"systemd did not start as PID 1:\n{self.diagnostics()}")

    def close(self) -> None:
        """End the manager, kill what is left in its cgroup, remove it, put the sysctls back."""
        try:
            if self._unshare is not None and self._unshare.poll() is None:
                if self.pid1 is not None:
                    self.systemctl("exit", check=False, timeout=10)
                try:
                    self._unshare.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._kill_cgroup()
                    self._unshare.wait(timeout=10)
            self._kill_cgroup()
            self._remove_cgroup()
        finally:
            for path, value in self._sysctls.items():
                if path.read_text() != value:
                    path.write_text(value)

    def _kill_cgroup(self) -> None:
        if self._cgroup is None or not self._cgroup.exists():
            return
        kill = self._cgroup / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        else:
            for pid in _cgroup_pids(self._cgroup):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _cgroup_pids(self._cgroup) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _remove_cgroup(self) -> None:
        if self._cgroup is None or not self._cgroup.exists():
            return
        # Children before parents: rmdir of a cgroup needs it empty of cgroups.
        folders = sorted((p for p in self._cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for folder in [*folders, self._cgroup]:
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()

    # --- driving it ---------------------------------------------------------

    def run(
        self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT, namespaces: str = "-a"
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the machine's namespaces (all of them by default)."""
        assert self.pid1 is not None
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), namespaces, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def install(self, files: dict[str, str]) -> None:
        """Write unit files (name -> text) onto the unit path and reload the manager."""
        for name, text in files.items():
            (self.unit_dir / name).write_text(text)
        self.systemctl("daemon-reload")

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None) -> str:
        """The journal's lines (of `unit` and of systemd about it, when given), with the PIDs."""
        args = ["journalctl", "--no-pager", "-o", "short-monotonic", "--no-hostname"]
        if unit is not None:
            args += ["-u", unit]
        self.run("journalctl", "--sync", check=False)
        return self.run(*args).stdout

    def wait_for(self, unit: str, timeout: float = 20.0, **wanted: str) -> dict[str, str]:
        """Poll ``systemctl show`` until every property has the wanted value; the last values."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.show(unit, *wanted)
            if all(seen.get(key) == value for key, value in wanted.items()):
                return seen
            time.sleep(0.05)
        raise AssertionError(f"{unit}: wanted {wanted}, still {seen}\n{self.journal(unit)}")

    @contextlib.contextmanager
    def netns(self) -> Iterator[None]:
        """Enter the machine's network namespace in this thread (see `connect`)."""
        assert self.pid1 is not None
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/proc/{self.pid1}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the machine's network namespace")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test's network namespace")
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside the machine's network namespace (made in a thread that enters it)."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def make() -> None:
            try:
                with self.netns():
                    made.append(socket.socket(family, kind))
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if failed:
            raise failed[0]
        return made[0]

    def connect(self, address: tuple[str, int] | str, timeout: float = 10.0) -> socket.socket:
        """A client connected to `address` (host and port on the machine's loopback, or a unix path)."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = self.socket(family)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def diagnostics(self) -> str:
        parts = []
        for log in (self.workdir / "unshare.log", self.console_log):
            if log.exists():
                parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(word) for word in (task / "children").read_text().split()]
    return found


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(line) for line in procs.read_text().split()]
    return pids
