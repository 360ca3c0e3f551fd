"""HttpSource against a small in-process range server that fails on demand."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from liveclone.errors import SourceChangedError, SourceError
from liveclone.sources.http import MAX_RANGES, HttpSource, parse_byteranges
from liveclone.sources.retry import RetryPolicy

DATA = bytes(range(256)) * 4096  # 1 MiB
FAST = RetryPolicy(tries=5, budget=10, first_delay=0.01, max_delay=0.05)


class Server(http.server.ThreadingHTTPServer):
    fail_next = 0  # answer this many requests with 503
    etag = '"v1"'
    honour_ranges = True
    # A request for several ranges gets: "first" (a 206 of the first one only),
    # "parts" (multipart/byteranges), "joined" (one 206 from the first byte asked
    # to the last) or "whole" (200 and the whole image).
    several = "first"
    boundary = "THIS_STRING_SEPARATES"
    requests = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that closes on a 200 of the whole image: expected


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.server.fail_next > 0:
            self.server.fail_next -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.requests += 1
        asked = [(int(a), int(b)) for a, b in re.findall(r"(\d+)-(\d+)",
                                                          self.headers.get("Range", ""))]
        if len(asked) > 1 and self.server.honour_ranges and self.server.several != "first":
            self._several(asked)
            return
        m = re.match(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if m and self.server.honour_ranges:
            a, b = int(m.group(1)), min(int(m.group(2)), len(DATA) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(DATA)}")
            body = DATA[a:b + 1]
        else:
            self.send_response(200)
            body = DATA
        self.send_header("ETag", self.server.etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


    def _several(self, asked: list[tuple[int, int]]) -> None:
        how = self.server.several
        if how == "whole":
            self.send_response(200)
            body = DATA
        elif how == "joined":
            a, b = asked[0][0], asked[-1][1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(DATA)}")
            body = DATA[a:b + 1]
        else:
            self.send_response(206)
            self.send_header("Content-Type",
                             f'multipart/byteranges; boundary="{self.server.boundary}"')
            body = byteranges(asked, self.server.boundary)
        self.send_header("ETag", self.server.etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def byteranges(asked: list[tuple[int, int]], boundary: str, data: bytes = DATA) -> bytes:
    """A multipart/byteranges body as RFC 9110 shows it, with a preamble."""
    out = b"preamble, ignored\r\n"
    for a, b in asked:
        out += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {a}-{b}/{len(data)}\r\n\r\n").encode()
        out += data[a:b + 1] + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = Server(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/disk.img"


def test_reads_from_threads(server: Server) -> None:
    with HttpSource(url(server), FAST) as s:
        assert s.size == len(DATA)
        results: dict[int, bytes] = {}

        def read(i: int) -> None:
            results[i] = s.pread(i * 65536 + 3, 65536)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):
            assert results[i] == DATA[i * 65536 + 3:(i + 1) * 65536 + 3]
        assert s.pread(len(DATA) - 2, 4) == DATA[-2:] + b"\0\0"  # past the end: zeros


def test_transient_errors_are_retried_and_reported(server: Server) -> None:
    with HttpSource(url(server), FAST) as s:
        server.fail_next = 2
        assert s.pread(100, 10) == DATA[100:110]
        st = s.status()
        assert st["recoveries"] == 1 and st["failures"] == 2
        assert "503" in st["last_error"] and st["retrying"] == 0
        server.fail_next = 100
        with pytest.raises(OSError) as info:
            s.pread(0, 10)
        assert info.value.errno == 5 and "failed 5 times" in str(info.value)
        server.fail_next = 0


def test_changed_etag_fails_the_read(server: Server) -> None:
    with HttpSource(url(server), FAST) as s:
        ident = s.identity()
        server.etag = '"v2"'
        with pytest.raises(OSError) as info:
            s.pread(0, 10)
        assert isinstance(info.value.__cause__, SourceChangedError)
        assert "changed while being cloned" in str(info.value)
        with HttpSource(url(server), FAST) as again:
            assert again.identity_mismatch(ident) == "etag was '\"v1\"', now '\"v2\"'"


def test_no_ranges(server: Server) -> None:
    server.honour_ranges = False
    with pytest.raises(SourceError, match="does not support range requests"):
        HttpSource(url(server), FAST)


def test_credentials_are_not_shown(server: Server) -> None:
    u = url(server).replace("http://", "http://user:secret@") + "?sig=abc"
    with HttpSource(u, FAST) as s:
        assert "secret" not in s.identity()["path"] and "sig" not in s.identity()["path"]
        assert s.pread(0, 4) == DATA[:4]


RANGES = [(5, 100), (70_000, 4096), (300_000, 1), (500_000, 65536), (1_048_000, 576)]


@pytest.mark.parametrize("several", ["parts", "joined"])
def test_several_ranges_in_one_request(server: Server, several: str) -> None:
    server.several = several
    with HttpSource(url(server), FAST) as s:
        before = server.requests
        got = s.read_ranges(RANGES)
        assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in RANGES]
        assert server.requests == before + 1


@pytest.mark.parametrize("several", ["first", "whole"])
def test_a_server_that_cannot_is_asked_one_range_at_a_time(server: Server,
                                                           several: str) -> None:
    """A 206 of only the first range, or a 200 of the whole image: the ranges are
    read one by one, and later calls do not ask for several again."""
    server.several = several
    with HttpSource(url(server), FAST) as s:
        got = s.read_ranges(RANGES)
        assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in RANGES]
        before = server.requests
        got = s.read_ranges(RANGES[:2])
        assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in RANGES[:2]]
        assert server.requests == before + 2


def test_many_ranges_go_in_capped_requests(server: Server) -> None:
    server.several = "parts"
    many = [(i * 2000, 1000) for i in range(300)]  # past MAX_RANGES a request
    with HttpSource(url(server), FAST) as s:
        before = server.requests
        got = s.read_ranges(many)
        assert [bytes(g) for g in got] == [DATA[o:o + n] for o, n in many]
        assert server.requests - before == -(-300 // MAX_RANGES)


def test_multipart_parts_are_cut_by_their_content_range() -> None:
    """A part whose data holds the boundary is not cut short; a part cut off, a
    part without Content-Range and a body without its boundary do not parse."""
    data = b"\r\n--B\r\nxy" * 100  # the delimiter itself, in the data
    asked = [(0, 9), (100, 150), (890, 899)]
    body = byteranges(asked, "B", data)
    parts = parse_byteranges(body, "multipart/byteranges; boundary=B")
    assert [(a, bytes(p)) for a, p in parts] == [(a, data[a:b + 1]) for a, b in asked]
    with pytest.raises(ValueError):
        parse_byteranges(body[:-60], "multipart/byteranges; boundary=B")
    with pytest.raises(ValueError):
        parse_byteranges(body.replace(b"Content-Range", b"Content-Rnage"),
                         "multipart/byteranges; boundary=B")
    with pytest.raises(ValueError):
        parse_byteranges(body, "multipart/byteranges; boundary=C")
    with pytest.raises(ValueError):
        parse_byteranges(body, "multipart/byteranges")
