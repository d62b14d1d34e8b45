"""The hand-written Trio baseline: ``trio.serve_tcp`` running the package's own ``hello_http``.

Usage: ``python benchmarks/trio_server.py PORT``.  Binds 127.0.0.1 only.
This is what a user would write without trio-activate, so the only
difference from ``trio-activate serve`` is the serving machinery.  It is
also the "bare Trio script" of the start-up and memory scenarios.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from trio_activate.examples import hello_http


def main() -> None:
    port = int(sys.argv[1])
    trio.run(partial(trio.serve_tcp, hello_http, port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
