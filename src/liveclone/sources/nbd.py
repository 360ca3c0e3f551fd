"""An NBD export as a source: ``nbd://``, ``nbd+unix://``, ``nbds://`` URIs.

Reads and allocation extents go through ``liveclone.nbdwire.client``'s pool of
connections, so several copier threads and guest reads are served at once.
A server that drops connections (restarted, briefly unreachable) is reconnected
under the retry policy. NBD tells nothing like an mtime or ETag, so the
identity is the size and a fingerprint of sampled blocks.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from liveclone.errors import SourceError, SourceUnreachableError
from liveclone.nbdwire.client import (
    Address,
    NbdCommandError,
    NbdDisconnected,
    NbdError,
    NbdHandshakeError,
    Pool,
    parse_uri,
)
from liveclone.nbdwire.wire import EIO, ESHUTDOWN, STATE_ZERO, Rep
from liveclone.sources.base import Extent, sample_fingerprint
from liveclone.sources.retry import RemoteSource, Retrier, RetryPolicy, TransientError

T = TypeVar("T")

POOL_SIZE = 4
OPEN_POLICY = RetryPolicy(tries=3, budget=3.0)


class NbdSource(RemoteSource):
    """A read-only NBD export."""

    def __init__(self, address: Address, spec: str, policy: RetryPolicy | None = None,
                 pool_size: int = POOL_SIZE, what: str = "NBD source") -> None:
        self.spec = spec
        self.address = address
        self.pool_size = pool_size
        self.retrier = Retrier(f"{what} {spec}", policy)
        self._fingerprint: str | None = None
        try:
            self.pool = self.retrier.call(self._connect, "connecting", policy=OPEN_POLICY)
        except OSError as e:
            raise SourceUnreachableError(
                f"cannot reach {what} {spec}: {e.__cause__ or e}. Check the URI and that "
                "the NBD server is running"
            ) from None
        self.size = self.pool.size_bytes

    @classmethod
    def from_uri(cls, uri: str) -> NbdSource:
        try:
            address = parse_uri(uri)
        except ValueError as e:
            raise SourceError(f"{e}; for example nbd://HOST:10809/EXPORT or "
                              "nbd+unix:///EXPORT?socket=/path/to.sock") from None
        return cls(address, uri)

    # -- requests ------------------------------------------------------------------------

    def _connect(self) -> Pool:
        try:
            return Pool(self.address, self.pool_size)
        except NbdDisconnected as e:
            raise TransientError(str(e)) from None
        except NbdHandshakeError as e:
            raise SourceError(self._explain_refusal(e)) from None
        except NbdError as e:
            raise SourceError(f"NBD source {self.spec}: {e}") from None

    def _explain_refusal(self, e: NbdHandshakeError) -> str:
        if e.reply == Rep.ERR_UNKNOWN:
            return (f"NBD source {self.spec}: {e}. The export name is wrong: list the "
                    f"server's exports with `nbdinfo --list {self.spec}`")
        if e.reply == Rep.ERR_TLS_REQD:
            return (f"NBD source {self.spec}: {e}. The server requires TLS: use nbds:// "
                    "(with ?tls-certificates=DIR holding ca-cert.pem)")
        if e.reply == Rep.ERR_POLICY:
            return f"NBD source {self.spec}: {e}. The server's policy forbids this client"
        return f"NBD source {self.spec}: {e}"

    def _attempt(self, fn: Callable[[], T]) -> T:
        """One request: a broken connection or EIO is worth retrying, the rest is not."""
        try:
            return fn()
        except NbdDisconnected as e:
            raise TransientError(str(e)) from None
        except NbdCommandError as e:
            if e.errno in (EIO, ESHUTDOWN):
                raise TransientError(f"server error {e}") from None
            raise SourceError(f"NBD source {self.spec} refused a request: {e}") from None
        except NbdError as e:
            raise SourceError(f"NBD source {self.spec}: {e}") from None

    def _read_once(self, offset: int, length: int) -> bytes:
        return bytes(self._attempt(lambda: self.pool.pread(offset, length)))

    def _status_once(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._attempt(lambda: self.pool.block_status(offset, length))

    # -- the Source interface ------------------------------------------------------------

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = min(offset + length, self.size)
        if not self.pool.can_extents:
            yield Extent(offset, length, True)
            return
        pos = offset
        while pos < end:
            at = pos
            try:
                runs = self.retrier.call(functools.partial(self._status_once, at, end - at),
                                         f"block status of {end - at} bytes at {at}",
                                         before_retry=self._before_retry)
            except SourceError as e:
                raise OSError(errno.EIO, e.message) from e
            for n, flags in runs:
                n = min(n, end - pos)
                yield Extent(pos, n, not flags & STATE_ZERO)
                pos += n
                if pos >= end:
                    break
        if offset + length > end:  # past the end reads as zeros
            yield Extent(end, offset + length - end, False)

    def identity(self) -> dict[str, Any]:
        return {"kind": "nbd", "path": self.spec, "size": self.size,
                "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = sample_fingerprint(self.pread, self.size)
        return self._fingerprint

    def close(self) -> None:
        self.pool.close()
