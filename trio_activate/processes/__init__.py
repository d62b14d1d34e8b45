"""Layer 4, processes: the supervisor and its workers, one service process and its hand-over.

Owns: spawning workers over the same sockets, and the one stop-then-kill
(`spawn`: the `Spawner` the supervisor is given, `stop_then_kill`),
generations of workers, restarts, reloads and liveness (`supervisor`, run
by `supervise_main`), one ``serve`` process, which may hand its sockets to
a successor on SIGHUP (`service_main`, `handoff`).

May import: `trio_activate.runtime` and everything below it, trio.

Who closes what: the caller's ``ServiceSockets`` stays the caller's; a worker
or successor inherits the same sockets at spawn (its own fds, which it
closes), and this process closes its own only through the caller.  Every
child process is waited for
(reaped) by the task that started it, and stopped (SIGTERM, then SIGKILL
after its grace period) before its parent returns.
"""
