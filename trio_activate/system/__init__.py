"""Layer 2, syscalls without trio: fds, sockets, adoption, the activator and the fast start.

Owns: inspecting fds and the pidfd id (`fds`), creating the manifest's sockets
(`create`), owning and adopting passed fds (`passed`), deciding where the
sockets come from (`acquire`), the activator that passes them by re-exec or
to a child (`activator`, `activator_channel`, `fast_start`), sending sd_notify
messages (`notifier`), telling a reload's outcome (`reload_outcome`), signals
during start-up (`start_signals`), importing handler code from source
(`fresh_imports`), the ``fds`` report (`fds_report`), the paths a unit
must reach (`unit_paths`) and whether stderr is journald's stream
(`journal_stream`).

May import: `trio_activate.model`, `trio_activate.errors` and the standard
library; never trio (the CLI runs this before the re-exec, and importing
trio costs about 150 ms).

Who closes what: a `passed.PassedFds` owns every passed fd until each is
taken or closed; `create` hands each created socket to its caller, who owns
it; an `acquire.ServiceSockets` owns the service's sockets (and the socket
files it made) until its ``close()``.
"""
