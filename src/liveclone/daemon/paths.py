"""Where the daemon keeps things by default, for root and for other users.

root: the state directory ``/var/lib/liveclone``, sockets in ``/run/liveclone/``.
Others: ``$XDG_STATE_HOME/liveclone`` (``~/.local/state/liveclone``) and
``$XDG_RUNTIME_DIR/liveclone/`` (``/tmp/liveclone-UID/`` without it). The CLI's
client commands find the API socket the same way (``LIVECLONE_API`` overrides).
Imports nothing heavy: the client commands use it.
"""

from __future__ import annotations

import os

API_NAME = "api.sock"
NBD_NAME = "nbd.sock"


def state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/liveclone"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "liveclone")


def runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/liveclone"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "liveclone")
    return f"/tmp/liveclone-{os.geteuid()}"


def api_socket() -> str:
    """The API socket a client talks to: ``LIVECLONE_API``, else the default."""
    return os.environ.get("LIVECLONE_API") or os.path.join(runtime_dir(), API_NAME)


def nbd_socket() -> str:
    return os.path.join(runtime_dir(), NBD_NAME)
