"""A small synchronous QMP client: what ``liveclone boot`` needs to watch its VM.

QMP (the QEMU Machine Protocol) is JSON lines over a socket: a greeting, the
``qmp_capabilities`` handshake, then commands answered in order and events at
any time. The habits are qemu.qmp's (``python/qemu/qmp/protocol.py``), in the
small: one explicit :class:`Runstate`; one reader thread that owns the socket's
read half and sorts what arrives into replies (matched by ``id``) and events (a
queue); an error in that reader is kept and re-raised to the next caller, never
lost; a reply never waits forever.

The library itself is not a dependency (it is asyncio-only with a legacy sync
wrapper, and this needs three commands and the event stream).
"""

from __future__ import annotations

import enum
import itertools
import json
import queue
import socket
import threading
import time
from typing import Any

from liveclone.errors import LivecloneError


class QMPError(LivecloneError):
    """QEMU's monitor could not be reached, answered with an error or went away."""

    exit_code = 1


class Runstate(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"  # handshake done: commands and events flow
    DISCONNECTED = "disconnected"  # the socket closed (QEMU exited) or close() ran


class QMPClient:
    """One connection to a QEMU's ``-qmp unix:PATH,server=on,wait=off`` socket."""

    def __init__(self) -> None:
        self.runstate = Runstate.IDLE
        self.greeting: dict[str, Any] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _replies and _waiting
        self._replies: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition(self._lock)
        self._reader: threading.Thread | None = None
        self._reader_error: BaseException | None = None

    def connect(self, path: str, timeout: float = 10.0, alive: Any = None) -> None:
        """Connect (retrying until the socket exists, ``timeout`` at most, or until
        ``alive()`` says the QEMU is gone), read the greeting, negotiate."""
        if self.runstate is not Runstate.IDLE:
            raise QMPError(f"QMP client is {self.runstate.value}, not idle")
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                break
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline or (alive is not None and not alive()):
                    raise QMPError(f"cannot reach QEMU's monitor at {path}: {e}") from None
                time.sleep(0.02)
        sock.settimeout(timeout)
        self._sock = sock
        reader = sock.makefile("rb")
        line = reader.readline()
        try:
            self.greeting = json.loads(line)["QMP"]
        except (ValueError, KeyError, TypeError):
            sock.close()
            raise QMPError(f"not a QMP greeting: {line[:200]!r}") from None
        sock.settimeout(None)
        self.runstate = Runstate.RUNNING
        self._reader = threading.Thread(target=self._read_loop, args=(reader,),
                                        name="qmp-reader", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities", timeout=timeout)

    def _read_loop(self, reader: Any) -> None:
        """The read half: sort replies from events until EOF."""
        try:
            for line in reader:
                msg = json.loads(line)
                if "event" in msg:
                    self.events.put(msg)
                elif isinstance(msg.get("id"), int):
                    with self._lock:
                        self._replies[msg["id"]] = msg
                        self._arrived.notify_all()
        except (OSError, ValueError) as e:
            if self.runstate is Runstate.RUNNING:
                self._reader_error = e
        finally:
            with self._lock:
                self.runstate = Runstate.DISCONNECTED
                self._arrived.notify_all()

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 5.0) -> Any:
        """Run one command; its ``return`` value. QMPError on an error reply, a
        timeout, or a closed connection (with the reader's error, if it had one)."""
        if self.runstate is not Runstate.RUNNING or self._sock is None:
            raise QMPError(f"QEMU's monitor is {self.runstate.value}") from self._reader_error
        ident = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"QEMU's monitor went away: {e}") from None
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                left = deadline - time.monotonic()
                if self.runstate is not Runstate.RUNNING:
                    raise QMPError("QEMU's monitor went away") from self._reader_error
                if left <= 0:
                    raise QMPError(f"QEMU did not answer {command} in {timeout:.0f} s")
                self._arrived.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(f"QEMU refused {command}: {err.get('desc', err)}")
        return reply.get("return")

    def get_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None if none arrives within ``timeout``."""
        try:
            return self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        with self._lock:
            was = self.runstate
            self.runstate = Runstate.DISCONNECTED
        if self._sock is not None and was is Runstate.RUNNING:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)

