"""Layer 3, Trio: serving the sockets, running the handlers, readiness, the watchdog and shutdown.

Owns: the accept loops and datagram readers (`serving`), telling a client
that went away from a handler's error and the access log (`access`),
importing and checking the handlers (`handlers`), one service's task tree,
readiness and drain (`service`), the shutdown and reload signal loop of every process
that serves, the supervisor's included (`signals`), what a handler can learn
of the stop (`stopping`, public), watchdog pings (`watchdog`) and the embedded
``activated()`` API (`embedded`, public).

May import: `trio_activate.system`, `trio_activate.model`,
`trio_activate.errors`, trio.

Who closes what: the caller that acquired the sockets keeps them
(``ServiceSockets``); this layer wraps them in trio sockets without taking
ownership, and closes only the connections it accepted, each in the task
that serves it, cancellation included.
"""
