"""`notify`: tells systemd how a `Type=notify` daemon is doing (READY=1, STOPPING=1), without a dependency.

systemd passes the path of a unix datagram socket in `$NOTIFY_SOCKET` (a
leading ``@`` names an abstract socket); a daemon writes ``KEY=value`` lines
to it. Outside systemd the variable is unset and `notify` does nothing, so the
daemons call it unconditionally.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Sends ``state`` (e.g. ``READY=1``) to systemd; False where no one listens (not run by systemd)."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True
