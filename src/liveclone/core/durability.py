"""Durability: pending and committed maps, the commit thread, and the failed mode.

Invariant 6, data first, then map. A ``flush`` takes the runs made present since
the last commit (and the sub-blocks written in absent regions: they are committed
the same way), makes the clone file's data durable (fdatasync), then their digest
slots (``core.digests``), and only then commits those runs to the journal
(``MapStore.commit``). FLUSH and FUA are
acknowledged only after that. Without a FLUSH, a commit runs at least once a
second while runs are pending.

Invariant 9, a failed sync is never retried into success. If the fdatasync, the
journal commit or a compaction step after the superblock's rename fails, the runs
of that flush are never committed (their data may not be on disk: Linux reports
a writeback error once and then marks the pages clean), the lifecycle enters its
failed mode, and every later flush raises EIO. Only a reopen leaves it; the
reopened clone resumes from the committed map.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from liveclone.core import fsops
from liveclone.core.digests import Digester
from liveclone.core.lifecycle import Lifecycle
from liveclone.core.metadata import COMPACT_RECORDS, MapStore
from liveclone.core.ownership import Run
from liveclone.core.regions import RegionMap
from liveclone.errors import CloneClosedError

# Invariant 6: commit at least this often while bits are pending.
COMMIT_INTERVAL = 1.0
# Compact once the journal holds this many records. LIVECLONE_COMPACT_RECORDS sets
# it (crash tests use a small value so power cuts land inside compactions).
COMPACT_RECORDS = int(os.environ.get("LIVECLONE_COMPACT_RECORDS", "0")) or COMPACT_RECORDS

_FIX = ("The clone is now read-only: guests get EIO on writes and flushes, committed "
        "data is still served, and the copy has stopped. Fix the cause (see the kernel "
        "log for disk errors; free space), then stop liveclone and run it again on the "
        "clone: it resumes from the last committed map.")


class Durability:
    """The commit side of one clone."""

    def __init__(self, fd: int, store: MapStore, committed: RegionMap,
                 lifecycle: Lifecycle) -> None:
        self._fd = fd
        self._store = store
        self._lifecycle = lifecycle
        self._lock = threading.Lock()
        # --- guarded by _lock ------------------------------------------------------
        # Invariant: bit r set ⇒ r's bytes were fdatasynced before the bit reached
        # the journal; the same for each sub-block in committed.blocks.
        # committed ⊆ the in-core map.
        self._committed = committed
        # Runs set in the in-core map and not yet committed, in the order set.
        self._pending: list[Run] = []
        # Sub-blocks marked written in the in-core map and not yet committed.
        self._pending_blocks: dict[int, int] = {}
        self.commits = 0
        self.last_commit = 0.0
        self.note: str | None = None  # a harmless event worth showing (postponed compaction)
        # --- end -------------------------------------------------------------------
        self._group = threading.Condition()  # group commit; guards the three below
        self._asked = 0  # flush requests, numbered in arrival order
        self._covered = 0  # every request numbered up to this one is durable
        self._committing = False  # a commit (and compaction) is running: one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the in-core side -----------------------------------------------------------

    def note_present(self, run: Run) -> None:
        """A run's bits were just set in the in-core map (called under ownership's lock)."""
        with self._lock:
            self._pending.append(run)

    def note_blocks(self, region: int, mask: int) -> None:
        """Sub-blocks of an absent region were just marked written (under
        ownership's lock, after their bytes were written)."""
        with self._lock:
            self._pending_blocks[region] = self._pending_blocks.get(region, 0) | mask

    @property
    def committed_blocks(self) -> dict[int, int]:
        with self._lock:
            return dict(self._committed.blocks)

    def committed_snapshot(self) -> bytes:
        with self._lock:
            return self._committed.to_bytes()

    @property
    def committed_count(self) -> int:
        return self._committed.present_count

    # -- committing -------------------------------------------------------------------

    def flush(self, closing: bool = False) -> None:
        """Make every run made present so far durable (invariant 6). Blocks. Raises
        OSError(EIO) in the failed mode, and enters it if a step fails here.
        ``closing``: the last flush, made by ``close`` while the clone is closing.

        Group commit: flushes that arrive while a commit runs are answered together
        by the next one (one fdatasync, one journal write), which starts after all
        of them arrived and so covers every write they acknowledge."""
        with self._group:
            self._asked += 1
            ticket = self._asked
            while self._covered < ticket:
                if self._committing:
                    self._group.wait()
                    continue
                self._committing = True  # lead the next commit
                target = self._asked
                self._group.release()
                try:
                    self._commit(closing)
                finally:
                    self._group.acquire()
                    self._committing = False
                    self._group.notify_all()
                self._covered = max(self._covered, target)

    def _commit(self, closing: bool) -> None:
        """One commit: fdatasync the data, journal the runs pending now, compact if
        due. Only ``flush`` calls it, one at a time."""
        if closing:
            if self._lifecycle.failure is not None:
                raise OSError(errno.EIO, self._lifecycle.failure)
        else:
            self._lifecycle.check_writable()
        with self._lock:
            ranges, self._pending = self._pending, []
            blocks, self._pending_blocks = self._pending_blocks, {}
        try:
            # step 1: data first (always: writes to present regions pend no runs)
            fsops.fdatasync(self._fd)
        except OSError as e:
            raise self._fail("fdatasync of the clone file", e) from None
        try:
            # step 1b: then the digest slots of those regions, written before their
            # bits were set: a committed bit never vouches for a slot not durable
            self._store.digests.sync()
        except OSError as e:
            raise self._fail("fdatasync of the digest file", e) from None
        try:
            self._store.commit(_merge(ranges), blocks)  # step 2: then the map
        except OSError as e:
            raise self._fail("the journal commit", e) from None
        with self._lock:
            for a, b in ranges:
                self._committed.set(a, b)
            for r, mask in blocks.items():  # after the ranges: present supersedes
                self._committed.add_blocks(r, mask)
            self.commits += 1
            self.last_commit = time.time()
            compact = (self._store.records > COMPACT_RECORDS
                       or (self._committed.complete and self._store.records > 0))
            snapshot = self._committed.copy() if compact else None
        if snapshot is not None:
            try:
                done = self._store.compact(snapshot)
            except OSError as e:
                raise self._fail("map compaction", e) from None
            with self._lock:
                self.note = None if done else \
                    "map compaction postponed (could not write the new superblock)"

    # -- digest slots (core.digests): written before the bits they go with -------------
    # A failed write or sync of the digest file is the failed mode, as the journal's
    # is (invariant 9): the slots' state on disk is then unknown.

    def record_digests(self, digests: Digester, runs: list[Run]) -> None:
        """Slots of regions a fill copied, before their bits are set."""
        try:
            self._store.digests.record(digests, runs)
        except OSError as e:
            raise self._fail("writing the digest file", e) from None

    def guest_made_present(self, runs: list[Run]) -> None:
        """"guest" slots of absent regions a guest is about to make present."""
        try:
            self._store.digests.guest_made_present(runs)
        except OSError as e:
            raise self._fail("writing the digest file", e) from None

    def guest_intent(self, runs: list[Run]) -> None:
        """Write intent: before a guest changes present regions, their digest slots
        say "guest", durably (``DigestStore.guest_intent``). Raises OSError(EIO) in
        the failed mode, and enters it if the write or sync fails."""
        self._lifecycle.check_writable()
        try:
            self._store.digests.guest_intent(runs)
        except OSError as e:
            raise self._fail("writing or syncing the digest file", e) from None

    def close_zones(self) -> None:
        """After the last commit: the digest zones opened for writes closed
        (``DigestStore.close_zones``); if that fails, the failed mode."""
        try:
            self._store.digests.close_zones()
        except OSError as e:
            raise self._fail("closing the digest file's zones", e) from None

    def _fail(self, step: str, e: OSError) -> OSError:
        reason = f"{step} failed ({e.strerror or e}). {_FIX}"
        self._lifecycle.fail(reason)
        return OSError(errno.EIO, f"the clone is read-only after a failure: {reason}")

    # -- the commit thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="commit", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(COMMIT_INTERVAL):
            if self._lifecycle.failure is not None:
                return
            with self._lock:
                idle = not self._pending and not self._pending_blocks
            if idle:
                continue
            try:
                self.flush()
            except OSError:
                return  # the lifecycle holds the failure and its reason
            except CloneClosedError:
                return  # closing began after the wait: close's own flush commits

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        self._store.close()


def _merge(ranges: list[Run]) -> list[Run]:
    out: list[Run] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
