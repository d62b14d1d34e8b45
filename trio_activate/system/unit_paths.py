"""What a generated unit's service reads, and whether its user can: the machine's side of `units`.

Layer 2: looks at the file system (``stat``) and the user database (``pwd``,
``grp``); `units.render_units` stays pure and takes the results.

The service, under the sandbox `units` writes, reads:

- the interpreter and its installation: the resolved executable,
  ``sys.base_prefix`` (the standard library), ``sys.prefix`` (a venv), the
  ``sys.path`` folders holding trio_activate and trio, and the command the
  unit runs (the ``trio-activate`` script);
- the manifest, in its folder;
- the manifest's ``python-path`` folders, where the handlers are imported from;
- the TLS files of asgi handlers (``certfile``, ``keyfile``, ``ca-certs`` in
  ``[handlers.NAME.http]``), read by each worker as it starts: kept
  reachable themselves, as a folder is, since they may lie anywhere
  (``/etc/ssl``, a home folder), and bound back alone (a file bind), not with
  the folder holding them.

Unix socket folders are not among them: systemd creates the sockets and
passes them, and the service never opens a socket file by its path.

`needed_paths` lists those paths (folders, and the TLS files); `units` binds back, read-only, the ones the
sandbox hides (under ``/home``, ``/root``, ``/tmp``, ...), each on an empty
tmpfs or private ``/tmp`` whose folders are ``0755``.  So for a bound path
only its own mode and the modes below it count, not its parents'.

`check_reachable` walks each path as the unit's user would: for
``DynamicUser=yes`` (no ``[service] user``), an id no file belongs to, only
the "other" permission bits count; for a named user, the owner, group or
other bits, as the kernel picks them, with the user's groups.  The unit has
no capabilities (``CapabilityBoundingSet=`` is empty), so even ``root``
passes by these bits alone.  A path the user cannot reach is a
`ManifestError`: one line naming the path, why it is blocked and what to do,
instead of a unit that fails at start.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ManifestError
from ..model.manifest import Manifest
from ..model.records import record
from ..model.text import is_decimal
from ..model.units import NeededPath, hidden_by

__all__ = ["ServiceUser", "check_reachable", "needed_paths", "service_user"]

# The permission a path needs: read and enter (folders one lists or imports from), read (a file), or run.
READ_FOLDER = os.R_OK | os.X_OK
READ = os.R_OK
RUN = os.X_OK


@record
class ServiceUser:
    """Who the unit runs as, for permission checks.  ``uid is None``: a DynamicUser."""

    description: str
    uid: int | None = None
    gids: frozenset[int] = frozenset()


@record
class _Access:
    """A path the service reads, the permission it needs there, and whether the unit keeps it reachable."""

    path: Path
    mode: int
    why: str
    # Folders (and TLS files) are kept reachable (bound back when hidden); other files are
    # reached through the folders.
    keep: bool = True


def needed_paths(manifest: Manifest, manifest_path: Path, command: Sequence[str]) -> list[NeededPath]:
    """The folders and TLS files the service reads (see the module docstring), absolute, in a stable order."""
    return [NeededPath(str(a.path), a.why) for a in _accesses(manifest, manifest_path, command) if a.keep]


def _accesses(manifest: Manifest, manifest_path: Path, command: Sequence[str]) -> list[_Access]:
    manifest_path = manifest_path.absolute()
    interpreter = Path(sys.executable).resolve()
    found = [
        _Access(interpreter.parent, os.X_OK, "The interpreter's folder"),
        _Access(interpreter, RUN, "The interpreter", keep=False),
        _Access(Path(sys.base_prefix).resolve(), READ_FOLDER, "The interpreter's installation"),
        _Access(Path(sys.prefix).resolve(), READ_FOLDER, "The interpreter's environment"),
        _Access(_import_root("trio_activate"), READ_FOLDER, "The folder holding trio_activate"),
        _Access(_import_root("trio"), READ_FOLDER, "The folder holding trio"),
    ]
    if command and Path(command[0]).resolve() != interpreter:
        script = Path(command[0]).resolve()
        found.append(_Access(script.parent, os.X_OK, "The trio-activate script's folder"))
        found.append(_Access(script, READ | RUN, "The trio-activate script", keep=False))
    found.append(_Access(manifest_path.parent, os.X_OK, "The manifest's folder"))
    found.append(_Access(manifest_path, READ, "The manifest", keep=False))
    for entry in manifest.service.python_path:
        folder = Path(os.path.normpath(manifest_path.parent / entry))
        found.append(_Access(folder, READ_FOLDER, f"The python-path folder {entry!r}"))
    for handler in manifest.handlers:
        http = handler.http
        if http is None:
            continue
        files = {"certfile": http.certfile, "keyfile": http.keyfile, "ca-certs": http.ca_certs}
        for key, name in files.items():
            if name is not None:
                # As the runtime opens it: relative to the manifest's folder.
                file = Path(os.path.normpath(manifest_path.parent / name))
                found.append(_Access(file, READ, f"The TLS file handlers.{handler.name}.http.{key}"))
    merged: dict[Path, _Access] = {}
    for access in found:
        first = merged.get(access.path)
        # One path, two reasons: it needs both permissions; the first reason names it.
        merged[access.path] = (
            access if first is None else _Access(first.path, first.mode | access.mode, first.why, first.keep)
        )
    return list(merged.values())


def _import_root(package: str) -> Path:
    """The sys.path folder ``package`` is imported from (found, not imported: importing trio is slow)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, package
    assert spec.origin is not None, package
    return Path(spec.origin).resolve().parent.parent


def service_user(manifest: Manifest) -> ServiceUser:
    """Who the unit runs as: ``[service] user`` and ``group``, looked up in this machine's user database."""
    service = manifest.service
    if service.user is None:
        return ServiceUser("the service's DynamicUser")
    try:
        entry = pwd.getpwuid(int(service.user)) if is_decimal(service.user) else pwd.getpwnam(service.user)
    except KeyError:
        if not is_decimal(service.user):
            raise ManifestError(
                f"{manifest.source}: service.user: no user {service.user!r} on this machine "
                "(systemd would fail to start the unit); create it, or leave user unset for DynamicUser="
            ) from None
        entry = None
    uid = entry.pw_uid if entry is not None else int(service.user)
    gid = entry.pw_gid if entry is not None else None
    if service.group is not None:
        try:
            gid = (
                grp.getgrgid(int(service.group)).gr_gid
                if is_decimal(service.group)
                else grp.getgrnam(service.group).gr_gid
            )
        except KeyError:
            if not is_decimal(service.group):
                raise ManifestError(
                    f"{manifest.source}: service.group: no group {service.group!r} on this machine "
                    "(systemd would fail to start the unit)"
                ) from None
            gid = int(service.group)
    gids = set() if gid is None else {gid}
    if entry is not None:
        # systemd gives a named user its supplementary groups (initgroups).
        gids |= set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return ServiceUser(f"user {service.user!r}", uid, frozenset(gids))


def check_reachable(
    manifest: Manifest, manifest_path: Path, command: Sequence[str], user: ServiceUser
) -> None:
    """Raise `ManifestError` when ``user`` cannot reach a path the service reads, under the sandbox."""
    accesses = _accesses(manifest, manifest_path, command)
    # The outermost hidden folders the unit binds back: below them, the modes are the file system's.
    bound = sorted({str(a.path) for a in accesses if a.keep and hidden_by(str(a.path))})
    for access in accesses:
        start = next((Path(b) for b in bound if _within(str(access.path), b)), Path("/"))
        problem = _walk(start, access.path, access.mode, user)
        if problem is None:
            continue
        blocked, info, verb = problem
        if access.why.startswith("The TLS file"):
            advice = (
                "each worker reads it as it starts"
                if verb == "reach"
                else "set [service] user or group to one that may read it "
                "(a DynamicUser reads only what every user may)"
            )
        elif not access.why.startswith(("The manifest", "The python-path")):
            advice = (
                "install trio-activate where that user can read it (a venv outside home folders, "
                "e.g. made from /usr/bin/python3), or set [service] user"
            )
        else:
            advice = "set [service] user to a user who can, or move it where that user can read it"
        raise ManifestError(
            f"{manifest.source}: {access.why} {access.path}: {user.description} cannot {verb} "
            f"{blocked} ({info}); {advice}"
        )


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _walk(start: Path, path: Path, mode: int, user: ServiceUser) -> tuple[Path, str, str] | None:
    """The first path on the way from ``start`` to ``path`` that ``user`` cannot pass, or None."""
    steps = [start, *[p for p in reversed(path.parents) if _within(str(p), str(start)) and p != start]]
    if path != start:
        steps.append(path)
    for step in steps:
        wanted = mode if step == path else os.X_OK
        try:
            st = os.stat(step)
        except OSError as exc:
            return step, exc.strerror or str(exc), "reach"
        if not _allowed(st, wanted, user):
            verb = (
                "enter"
                if wanted == os.X_OK and stat.S_ISDIR(st.st_mode)
                else ("run" if wanted == RUN else "read")
            )
            return step, _describe(st), verb
    return None


def _allowed(st: os.stat_result, wanted: int, user: ServiceUser) -> bool:
    """The kernel's choice of bits: the owner's, else the group's, else the others'."""
    if user.uid is not None and st.st_uid == user.uid:
        bits = (st.st_mode >> 6) & 0o7
    elif st.st_gid in user.gids:
        bits = (st.st_mode >> 3) & 0o7
    else:
        bits = st.st_mode & 0o7
    return bits & wanted == wanted


def _describe(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}:{group}"
