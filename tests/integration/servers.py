"""Real servers the source tests and the HTTP benchmark run against: nginx, a
server that ignores Range, moto's S3, qemu-nbd. Each is a child process (or a
thread) that the caller stops in a ``finally``."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from liveclone.process import stop_process
from tests.conftest import LIVECLONE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None,
                   timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(0.02)


stop = stop_process


class Nginx:
    """nginx serving ``root`` on a loopback port, configured and run from ``workdir``."""

    def __init__(self, root: Path, workdir: Path, port: int | None = None,
                 access_log: bool = False, limit_rate: str | None = None,
                 max_ranges: int | None = None) -> None:
        """``access_log``: log each request's status and body bytes to
        ``self.access_log`` (see ``bytes_sent``). ``limit_rate``: nginx's per-connection
        send rate, e.g. "1m", for a source slow enough to be caught mid-copy.
        ``max_ranges``: nginx answers a request for more ranges with the whole file."""
        self.root, self.workdir = root, workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.access_log = workdir / "access.log"
        self.conf = workdir / "nginx.conf"
        log = (f"log_format sent '$status $body_bytes_sent $request_uri';\n"
               f"    access_log {self.access_log} sent;") if access_log else "access_log off;"
        rate = f"limit_rate {limit_rate};" if limit_rate else ""
        if max_ranges is not None:
            rate += f" max_ranges {max_ranges};"
        self.conf.write_text(f"""
user root;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    {log}
    {rate}
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        location /secret/ {{ deny all; }}
    }}
}}
""")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def bytes_sent(self) -> int:
        """Body bytes sent so far, the sum of ``$body_bytes_sent`` in the access log
        (nginx writes each line when its request ends)."""
        if not self.access_log.exists():
            return 0
        return sum(int(line.split()[1]) for line in self.access_log.read_text().splitlines())

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.workdir), "-c", str(self.conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@contextlib.contextmanager
def nginx(root: Path, workdir: Path) -> Iterator[Nginx]:
    server = Nginx(root, workdir).start()
    try:
        yield server
    finally:
        server.stop()


class _NoRangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files whole, ignoring Range, as some servers do."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def no_range_server(root: Path) -> Iterator[str]:
    """A Python http.server on loopback that answers every GET with 200 and the file."""
    def handler(*args: object, **kwargs: object) -> _NoRangeHandler:
        return _NoRangeHandler(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's standalone server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def wait_status(clone: Path, pred: Callable[[dict[str, Any]], bool],
                proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Poll CLONE.lcstatus until ``pred(status)`` holds; the clone must still run."""
    path = Path(str(clone) + ".lcstatus")
    while True:
        assert proc.poll() is None, "the clone finished before the test could act"
        try:
            st: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            st = {}
        if st and pred(st):
            return st
        time.sleep(0.05)


def clone_partly(source: str, clone: Path, rate: str = "4M") -> None:
    """Run ``liveclone clone`` slowly and stop it once some regions are present."""
    proc = subprocess.Popen([LIVECLONE, "clone", source, str(clone), "--rate", rate],
                            stderr=subprocess.DEVNULL)
    try:
        wait_status(clone, lambda s: s["regions_present"] > 0, proc)
    finally:
        proc.terminate()
        proc.wait()


class TcpProxy:
    """A loopback TCP proxy to ``target_port`` that can be cut: ``down()`` closes the
    listener and every connection (a network outage: connections are refused),
    ``up()`` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for s in ([listener] if listener else []) + conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def make_pki(d: Path) -> Path:
    """A CA and a server certificate for localhost in ``d``, laid out as nbdkit and
    qemu want (ca-cert.pem, server-cert.pem, server-key.pem)."""
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
        "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=liveclone test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out",
        "server.csr", "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                           "extendedKeyUsage=serverAuth\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext")
    return d
