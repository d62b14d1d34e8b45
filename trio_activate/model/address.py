"""Listen addresses: the text forms of systemd's ``ListenStream=`` as typed values.

Layer 1: pure, no syscalls, no trio.

The forms, as ``systemd.socket(5)`` defines them:

- ``"7000"``: a bare port.  systemd listens on IPv6 ``[::]:7000`` and, unless
  ``BindIPv6Only=ipv6-only``, takes IPv4 connections on it too; where the
  host has no IPv6 it falls back to ``0.0.0.0:7000``.  Kept as its own form
  (``InetAddress(host=None)``) so it can be written back as written.
- ``"127.0.0.1:7000"``, ``"[::1]:7000"``, ``"[fe80::1%eth0]:7000"``: a numeric
  host and a port.  Host names are not resolved, as systemd does not either:
  a socket unit must not depend on DNS at boot.
- ``"/run/x.sock"``: a unix socket file.  ``"./x.sock"`` and ``"../x.sock"``
  are relative to the manifest's folder (trio-activate's extension: systemd
  units need absolute paths, so ``trio-activate systemd`` rejects them).
- ``"@name"``: a socket in Linux's abstract namespace (``"\\0name"``).

Port 0 is accepted (systemd refuses it): it asks the kernel for a free port,
which is what tests and throw-away development services want.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import PurePosixPath

from .records import record
from .text import is_decimal

__all__ = [
    "AbstractAddress",
    "Address",
    "InetAddress",
    "UnixAddress",
    "address_from_sockname",
    "parse_address",
]

# sun_path is 108 bytes on Linux.  A path needs its terminating NUL; an
# abstract name starts with one.  Either way 107 bytes are left.
UNIX_PATH_MAX = 107


@record
class InetAddress:
    """An IPv4 or IPv6 address and port.  ``host is None`` is the bare-port form."""

    host: str | None
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        if self.host is None or ":" in self.host:
            return socket.AF_INET6
        return socket.AF_INET

    @property
    def bind_host(self) -> str:
        """The host to bind: the bare-port form binds IPv6's any-address."""
        return "::" if self.host is None else self.host

    def __str__(self) -> str:
        if self.host is None:
            return str(self.port)
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@record
class UnixAddress:
    """A unix socket file.  ``path`` is as written: absolute, or relative to the manifest."""

    path: str

    family = socket.AF_UNIX

    @property
    def is_relative(self) -> bool:
        return not self.path.startswith("/")

    def resolved(self, base: PurePosixPath | str) -> UnixAddress:
        """The same address with a relative path made absolute against ``base``."""
        if not self.is_relative:
            return self
        return UnixAddress(str(PurePosixPath(base) / self.path))

    def __str__(self) -> str:
        return self.path


@record
class AbstractAddress:
    """A socket in the abstract namespace; ``name`` is without the leading ``@``."""

    name: str

    family = socket.AF_UNIX

    @property
    def sockaddr(self) -> bytes:
        return b"\0" + self.name.encode()

    def __str__(self) -> str:
        return "@" + self.name


Address = InetAddress | UnixAddress | AbstractAddress

FORMS = 'a port ("7000"), "host:port", "[v6]:port", "/path.sock", "./path.sock" or "@name"'


def parse_address(text: str) -> Address:
    """Parse one listen address; raise ``ValueError`` with a phrase saying what is wrong.

    The phrase names the value but not where it came from: the caller (the
    manifest) puts the file and key in front of it.
    """
    if text.startswith("@"):
        return _parse_abstract(text)
    if text.startswith(("/", "./", "../")):
        return _parse_unix_path(text)
    if is_decimal(text):
        return InetAddress(None, _parse_port(text, text))
    if text.startswith("["):
        return _parse_bracketed_ipv6(text)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not a listen address: expected {FORMS}")
    if ":" in host:
        raise ValueError(f'{text!r}: an IPv6 address needs brackets, as in "[::1]:{port}"')
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(
            f"{text!r}: host {host!r} is not a numeric IP address "
            "(host names are not resolved; use e.g. 127.0.0.1 or [::1])"
        ) from None
    return InetAddress(str(ip), _parse_port(port, text))


def _parse_bracketed_ipv6(text: str) -> InetAddress:
    host, sep, rest = text[1:].partition("]")
    if not sep or not rest.startswith(":"):
        raise ValueError(f'{text!r} is not a listen address: expected "[v6]:port"')
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    return InetAddress(str(ip), _parse_port(rest[1:], text))


def _parse_port(port: str, text: str) -> int:
    if not is_decimal(port):
        raise ValueError(f"{text!r}: port {port!r} is not a number")
    number = int(port)
    if number > 65535:
        raise ValueError(f"{text!r}: port {number} is out of range 0-65535")
    return number


def _parse_unix_path(text: str) -> UnixAddress:
    _check_unix_name(text, text)
    if text.endswith("/"):
        raise ValueError(f"{text!r}: a unix socket path must name a file, not a folder")
    return UnixAddress(text)


def _parse_abstract(text: str) -> AbstractAddress:
    name = text[1:]
    if not name:
        raise ValueError(f"{text!r}: an abstract socket needs a name after '@'")
    _check_unix_name(name, text)
    return AbstractAddress(name)


def _check_unix_name(name: str, text: str) -> None:
    if "\0" in name:
        raise ValueError(f"{text!r}: contains a NUL character")
    size = len(name.encode())
    if size > UNIX_PATH_MAX:
        raise ValueError(
            f"{text!r}: is {size} bytes long; a unix socket address holds at most {UNIX_PATH_MAX}"
        )


def address_from_sockname(family: int, sockname: object) -> Address | None:
    """Turn what ``socket.getsockname()`` returned into an ``Address``.

    Returns ``None`` for an unnamed unix socket (e.g. one end of a socketpair)
    and for families trio-activate does not serve.
    """
    if family == socket.AF_INET and isinstance(sockname, tuple):
        return InetAddress(str(sockname[0]), int(sockname[1]))
    if family == socket.AF_INET6 and isinstance(sockname, tuple):
        return InetAddress(str(sockname[0]), int(sockname[1]))
    if family == socket.AF_UNIX:
        if isinstance(sockname, bytes):
            # Python returns abstract names as bytes, starting with NUL.
            if sockname.startswith(b"\0"):
                return AbstractAddress(sockname[1:].decode(errors="surrogateescape"))
            sockname = sockname.decode(errors="surrogateescape")
        if isinstance(sockname, str):
            if sockname.startswith("\0"):
                return AbstractAddress(sockname[1:])
            return UnixAddress(sockname) if sockname else None
    return None
