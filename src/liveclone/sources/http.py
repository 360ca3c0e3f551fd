"""An image served over HTTP(S), read with range requests.

Several threads read at once through one urllib3 pool of keep-alive
connections. Opening asks for the first byte (``Range: bytes=0-0``): the 206
answer proves range support and its ``Content-Range`` gives the size, with the
ETag and Last-Modified that make the identity. Every later read checks that the
server still serves the same ETag, so an image replaced mid-copy is noticed.

Many small ranges (a fill of a map the guest fragmented) go out in few requests:
``read_ranges`` asks for up to ``MAX_RANGES`` at once (``Range: bytes=a-b,c-d``)
and takes the ``multipart/byteranges`` answer apart by each part's
``Content-Range``. A server that answers such a request with the whole image
(200: nginx past its ``max_ranges``), with one range that does not hold them all,
or with a multipart body that does not parse, is asked one range at a time from
then on.
"""

from __future__ import annotations

import bisect
import errno
import functools
import itertools
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import urllib3

from liveclone.errors import SourceChangedError, SourceError, SourceUnreachableError
from liveclone.sources.base import sample_fingerprint
from liveclone.sources.retry import RemoteSource, Retrier, RetryPolicy, TransientError

# Connections kept open to the server: copier threads plus guest reads.
POOL_SIZE = 8
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
# Opening retries briefly: a server that is down at the start is an error to report.
OPEN_POLICY = RetryPolicy(tries=3, budget=3.0)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CONTENT_RANGE_EMPTY = re.compile(r"bytes\s+\*/(\d+)")
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# Ranges asked for in one request, and the longest Range header: servers refuse
# long header lines (nginx at 8 KiB by default, many proxies at 8 KiB in all).
MAX_RANGES = 128
MAX_RANGE_HEADER = 4096
# While the server takes many ranges a request, another range costs its part's
# headers (about 100 bytes) and a seek on the server, not a round trip: a present
# gap longer than this is left out of the reads (over a real network the bytes
# read along are what a copy waits for).
MULTI_RANGE_ALONG = 16 << 10


class HttpSource(RemoteSource):
    """A read-only image at an ``http://`` or ``https://`` URL."""

    def __init__(self, url: str, policy: RetryPolicy | None = None,
                 pool_size: int = POOL_SIZE) -> None:
        self.spec = url
        self._shown = _redact(url)
        self._url, self._headers = _split_credentials(url)
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=pool_size, block=True,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
            # Redirects are followed; every other retry is ours, in the Retrier.
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                  redirect=10, raise_on_redirect=True),
        )
        self.retrier = Retrier(f"HTTP source {self._shown}", policy)
        try:
            self._etag, self._last_modified, self.size = self.retrier.call(
                self._probe, "opening", policy=OPEN_POLICY)
        except OSError as e:
            self._pool.clear()
            raise SourceUnreachableError(
                f"cannot reach HTTP source {self._shown}: {e.__cause__ or e}. "
                "Check the URL and that the server is up"
            ) from None
        except BaseException:
            self._pool.clear()
            raise
        self._fingerprint: str | None = None
        # The server answers requests for several ranges usefully (``read_ranges``);
        # set False for good by the first answer that does not.
        self._multi_range = True

    # -- requests ----------------------------------------------------------------

    def _get(self, first: int, last: int) -> urllib3.BaseHTTPResponse:
        """GET bytes ``[first, last]``, body not yet read; network failures and 5xx
        become TransientError, a TLS failure is a SourceError."""
        return self._get_range(f"bytes={first}-{last}")

    def _get_range(self, spec: str) -> urllib3.BaseHTTPResponse:
        """GET with ``Range: spec``, as ``_get``."""
        headers = {**self._headers, "Range": spec}
        try:
            r = self._pool.request("GET", self._url, headers=headers, preload_content=False)
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.SSLError):
                raise SourceError(
                    f"HTTPS source {self._shown}: TLS failed ({_describe(e.reason)}); check "
                    "the URL's host name, or install the CA that signed the server's "
                    "certificate (SSL_CERT_FILE)"
                ) from None
            if isinstance(e.reason, urllib3.exceptions.ResponseError):  # too many redirects
                raise SourceError(f"HTTP source {self._shown}: {e.reason}") from None
            raise TransientError(_describe(e.reason or e)) from None
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(_describe(e)) from None
        if r.status >= 500 or r.status in (408, 429):
            _discard(r)
            raise TransientError(f"server answered {r.status} {r.reason}")
        return r

    def _body(self, r: urllib3.BaseHTTPResponse) -> bytes:
        try:
            return r.read()
        except urllib3.exceptions.HTTPError as e:  # cut off mid-body
            _discard(r)
            raise TransientError(_describe(e)) from None
        finally:
            r.release_conn()

    def _probe(self) -> tuple[str | None, str | None, int]:
        """Ask for the first byte: proves range support and gives size and validators."""
        r = self._get(0, 0)
        if r.status != 206:
            _discard(r)
        else:
            self._body(r)
        if r.status == 416:  # an empty object has no byte 0
            m = _CONTENT_RANGE_EMPTY.match(r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == 0:
                return r.headers.get("ETag"), r.headers.get("Last-Modified"), 0
        self._check_status(r)
        if r.status != 206:
            raise SourceError(
                f"HTTP source {self._shown} does not support range requests (it answered "
                f"{r.status} to a request for one byte, Accept-Ranges: "
                f"{r.headers.get('Accept-Ranges', 'absent')}). liveclone needs ranges to read "
                "the image piece by piece: serve it from a server that honours Range "
                "(nginx, Apache, S3), or download it first and clone the local file"
            )
        m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
        if m is None or m.group(3) == "*":
            raise SourceError(
                f"HTTP source {self._shown} answered a range request without the total size "
                f"(Content-Range: {r.headers.get('Content-Range')!r}); liveclone needs the "
                "image's size: serve it as a plain file"
            )
        return r.headers.get("ETag"), r.headers.get("Last-Modified"), int(m.group(3))

    def _check_status(self, r: urllib3.BaseHTTPResponse) -> None:
        if r.status in (200, 206):
            return
        if r.status == 404 or r.status == 410:
            raise SourceError(
                f"HTTP source {self._shown} was not found ({r.status} {r.reason}): "
                "check the URL"
            )
        if r.status in (401, 403):
            raise SourceError(
                f"HTTP source {self._shown} refused access ({r.status} {r.reason}): give a "
                "URL you may read (credentials in the URL, or a signed URL), or fix the "
                "server's permissions"
            )
        if r.status == 412:
            raise SourceChangedError(
                f"HTTP source {self._shown} changed while being cloned ({r.status}); "
                "restore the original image, or delete the clone and start again"
            )
        raise SourceError(f"HTTP source {self._shown} answered {r.status} {r.reason}")

    def _get_ranged(self, spec: str) -> urllib3.BaseHTTPResponse:
        """GET ranges of the image: a 206 with its body to read, or a 200 already
        discarded (the whole image: never read); any other answer raises."""
        r = self._get_range(spec)
        if r.status != 206:
            _discard(r)
        if r.status == 416:
            raise SourceError(
                f"HTTP source {self._shown} is shorter than the {self.size} bytes it had: "
                "it was replaced or truncated while in use"
            )
        self._check_status(r)
        return r

    def _check_etag(self, r: urllib3.BaseHTTPResponse) -> None:
        etag = r.headers.get("ETag")
        if self._etag is not None and etag is not None and etag != self._etag:
            _discard(r)
            raise SourceChangedError(
                f"HTTP source {self._shown} changed while being cloned (ETag was "
                f"{self._etag}, now {etag}); restore the original image, or delete the "
                "clone and start again"
            )

    def _read_many_once(self, ranges: Sequence[tuple[int, int]]
                        ) -> list[memoryview] | None:
        """The bytes of several ``(offset, length)`` ranges inside the image, sorted
        and apart, in one request; None if the server's answer cannot give them
        (the caller reads them one by one)."""
        r = self._get_ranged("bytes=" + ",".join(f"{o}-{o + n - 1}" for o, n in ranges))
        if r.status == 200:
            return None
        self._check_etag(r)
        content_type = r.headers.get("Content-Type", "")
        content_range = r.headers.get("Content-Range", "")
        body = self._body(r)
        try:
            if content_type.lower().startswith("multipart/byteranges"):
                parts = parse_byteranges(body, content_type)
            else:  # one range: the server may have joined ours into one
                parts = [(_first_of(content_range), memoryview(body))]
            return _cut(parts, ranges)
        except ValueError:
            return None

    def read_along(self) -> int | None:
        return MULTI_RANGE_ALONG if self._multi_range else None

    def batch_reads(self) -> int | None:
        return MAX_RANGES  # one request's worth (or, one range a request, as many)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = [b""] * len(ranges)
        inside = [i for i, (o, n) in enumerate(ranges) if n > 0 and o + n <= self.size]
        groups: list[list[int]] = []
        header = 0
        for i in inside:  # at most MAX_RANGES and MAX_RANGE_HEADER bytes a request
            item = len(f"{ranges[i][0]}-{sum(ranges[i]) - 1},")
            if not groups or len(groups[-1]) == MAX_RANGES or header + item > MAX_RANGE_HEADER:
                groups.append([])
                header = len("bytes=")
            groups[-1].append(i)
            header += item
        for group in groups:
            if len(group) < 2 or not self._multi_range:
                continue
            asked = sorted((ranges[i], i) for i in group)
            if any(a[0][0] + a[0][1] > b[0][0] for a, b in itertools.pairwise(asked)):
                continue  # overlapping ranges: a server may join them; ask one by one
            try:
                got = self.retrier.call(
                    functools.partial(self._read_many_once, [rng for rng, _ in asked]),
                    f"reading {len(asked)} ranges from offset {asked[0][0][0]}",
                    before_retry=self._before_retry)
            except SourceError as e:
                raise OSError(errno.EIO, e.message) from e
            if got is None:
                self._multi_range = False  # this server cannot: one range a request
                continue
            for (_, i), data in zip(asked, got, strict=True):
                out[i] = data
        for i, (o, n) in enumerate(ranges):
            if not len(out[i]) and n > 0:
                out[i] = self.pread(o, n)
        return out

    def _read_once(self, offset: int, length: int) -> bytes:
        r = self._get_ranged(f"bytes={offset}-{offset + length - 1}")
        if r.status == 200:
            raise SourceError(
                f"HTTP source {self._shown} stopped honouring range requests (it sent the "
                "whole image for a range); serve the image from a server that supports Range"
            )
        self._check_etag(r)
        data = self._body(r)
        m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
        if m is None or int(m.group(1)) != offset or len(data) != length:
            # A cut-off body or a proxy that mangled the range: ask again.
            raise TransientError(
                f"asked for {length} bytes at {offset}, got {len(data)} "
                f"(Content-Range: {r.headers.get('Content-Range')!r})"
            )
        return data

    # -- the Source interface ------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "kind": "http",
            "path": self._shown,
            "size": self.size,
            "etag": self._etag,
            "last_modified": self._last_modified,
        }
        if self._etag is None and self._last_modified is None:
            # Nothing the server vouches for: sample the content instead.
            if self._fingerprint is None:
                self._fingerprint = sample_fingerprint(self.pread, self.size)
            ident["fingerprint"] = self._fingerprint
        return ident

    def close(self) -> None:
        self._pool.clear()


def parse_byteranges(body: bytes, content_type: str) -> list[tuple[int, memoryview]]:
    """The parts of a ``multipart/byteranges`` body as ``(first byte, data)``, in
    the body's order. Each part's length comes from its ``Content-Range``, so data
    that happens to hold the boundary cannot cut it short. ValueError if the body
    does not parse (no boundary, a part without Content-Range, a part cut off)."""
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise ValueError(f"no boundary in Content-Type {content_type!r}")
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    view = memoryview(body)
    parts: list[tuple[int, memoryview]] = []
    pos = body.find(delimiter)  # a preamble before the first one is ignored
    if pos < 0:
        raise ValueError("no boundary in the body")
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):  # the close delimiter
            return parts
        line_end = body.find(b"\r\n", pos)  # after optional padding
        head_end = body.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0:
            raise ValueError("a part's headers are cut off")
        content_range = None
        for line in body[line_end + 2:head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                content_range = value.strip().decode("latin-1")
        first = _first_of(content_range or "")
        cr = _CONTENT_RANGE.match(content_range or "")
        assert cr is not None  # _first_of checked it
        start = head_end + 4
        end = start + int(cr.group(2)) - first + 1
        if end > len(body) or not body.startswith(b"\r\n" + delimiter, end):
            raise ValueError(f"the part {content_range} is cut off or too long")
        parts.append((first, view[start:end]))
        pos = end + 2


def _first_of(content_range: str) -> int:
    m = _CONTENT_RANGE.match(content_range)
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise ValueError(f"bad Content-Range {content_range!r}")
    return int(m.group(1))


def _cut(parts: list[tuple[int, memoryview]],
         ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
    """Each range's bytes, from the parts that hold it (a server may join or
    reorder ranges); ValueError if some range is not held whole by one part."""
    parts = sorted(parts, key=lambda p: p[0])
    starts = [p[0] for p in parts]
    out = []
    for offset, length in ranges:
        k = bisect.bisect_right(starts, offset) - 1
        if k < 0 or offset + length > starts[k] + len(parts[k][1]):
            raise ValueError(f"no part holds bytes {offset}-{offset + length - 1}")
        out.append(parts[k][1][offset - starts[k]:offset - starts[k] + length])
    return out


def _describe(e: BaseException) -> str:
    """A short reason for a network failure: 'Connection refused', 'timed out'..."""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out",
                   "Connection reset", "Temporary failure in name resolution",
                   "certificate verify failed", "No route to host"):
        if marker in text:
            return marker
    return text


def _discard(r: urllib3.BaseHTTPResponse) -> None:
    """Drop a response without reading its body: close its connection (a 200 for a
    range could be the whole image) and give the slot back to the pool."""
    r.close()
    r.release_conn()


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """``http://user:pw@host/x`` → (``http://host/x``, Basic authorization header)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    from urllib.parse import unquote

    headers = urllib3.make_headers(basic_auth=unquote(userinfo))
    return urlunsplit((parts.scheme, host, parts.path, parts.query, "")), dict(headers)


def _redact(url: str) -> str:
    """The URL without a password or query string (signatures), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "?..." if parts.query else "", ""))
