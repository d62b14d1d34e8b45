"""Layer 1, pure values and parsing: what the manifest, ``LISTEN_*`` and sd_notify say, and unit text.

Owns: the manifest (TOML to frozen objects and back, `manifest`), addresses
(`address`), the ``LISTEN_*`` reader (`listen_env`), the sd_notify message
format (`notify_message`), matching described fds to the manifest (`match`),
the generated systemd unit text (`units`), the shape of a log line in
each format: syslog priorities, JSON records, timestamps (`log_lines`), the
private variables' names (`private_env`), the cheap dataclasses they are
made of (`records`), and the one rule for numbers in text and for values
quoted in messages (`text`).

May import: the standard library and `trio_activate.errors`, nothing else of
the package.  No syscalls (the callers pass the pid, the environment, the
file's text), no trio: these run before any fd is touched, on the CLI's
fast path too.

Closes nothing: nothing here opens an fd.
"""
