"""A real ``liveclone daemon`` for the tests, driven through its public surfaces only:
``curl --unix-socket`` for the API, NBD clients for the exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import LIVECLONE


class Daemon:
    def __init__(self, root: Path, *args: str, listen: str | None = None) -> None:
        """``listen``: NBD on TCP (``--listen``) instead of the unix socket."""
        self.root = root
        self.state = root / "state"
        self.api = str(root / "api.sock")
        self.nbd = str(root / "nbd.sock")
        self.args = list(args) + (["--listen", listen] if listen else
                                  ["--nbd-socket", self.nbd])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"

    def start(self, timeout: float = 90.0) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [LIVECLONE, "daemon", "--state-dir", str(self.state), "--api", self.api,
                 *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n"
                                   + self.log.read_text())
            if os.path.exists(self.api):
                code, _ = self.curl("GET", "/openapi.json", check=False)
                if code == 200:
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not answer:\n" + self.log.read_text())
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def curl(self, method: str, path: str, body: Any = None, raw: str | None = None,
             check: bool = True) -> tuple[int, Any]:
        """(status, JSON answer) of one request with curl over the unix socket."""
        cmd = ["curl", "-sS", "--unix-socket", self.api, "-X", method, "-o", "-",
               "-w", "\n%{http_code}", f"http://localhost{path}"]
        data = raw if raw is not None else json.dumps(body) if body is not None else None
        if data is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", data]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            if check:
                raise AssertionError(f"curl failed: {r.stderr}")
            return 0, None
        text, _, code = r.stdout.rpartition("\n")
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = text
        return int(code), answer

    def add(self, source: Path | str, clone: Path, **extra: Any) -> dict[str, Any]:
        code, answer = self.curl("POST", "/v1/clones",
                                 {"source": str(source), "clone": str(clone), **extra})
        assert code == 201, answer
        return dict(answer)

    def status(self, name: str) -> dict[str, Any]:
        code, answer = self.curl("GET", f"/v1/clones/{name}")
        assert code == 200, answer
        return dict(answer["status"])

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if st["phase"] == phase:
                return st
            assert time.monotonic() < deadline, st
            time.sleep(0.1)


class Events:
    """An SSE client on /v1/events (curl -N), collecting events in a thread."""

    def __init__(self, api: str) -> None:
        self.proc = subprocess.Popen(
            ["curl", "-sSN", "--unix-socket", api, "http://localhost/v1/events"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        kind = None
        for line in self.proc.stdout:
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                kind = text[7:]
            elif text.startswith("data: ") and kind is not None:
                with self._cond:
                    self.events.append((kind, json.loads(text[6:])))
                    self._cond.notify_all()
                kind = None

    def wait_for(self, kind: str, name: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for k, data in self.events:
                    if k == kind and data["name"] == name:
                        return data
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} event for {name}: {self.events}"
                self._cond.wait(left)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self._thread.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    return r.stdout
