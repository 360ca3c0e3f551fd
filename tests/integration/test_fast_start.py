"""``liveclone serve`` on a new clone of a 1 TiB source: its first reads answer the
source's bytes, and making the clone costs what making a 1 GiB one costs. Nothing
grows with the source's size but the map's bits (a few bitmaps of one bit per
region, 2 MiB each at 1 TiB) and the digest file's slots (reserved on disk when it is
made, so a full disk cannot stop the digests: 16 bytes per region): no byte or
object per region in memory, no block of the clone file allocated, a map and
journal of a few hundred KiB. And ``serve`` imports nothing before it serves that
its first reads do not need: the interpreter's own record of its imports says so."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

from liveclone.core.digests import HEADER_SIZE, SLOT_SIZE
from liveclone.nbdwire.client import Connection, parse_uri
from liveclone.process import stop_process
from tests.conftest import LIVECLONE, allocated

REGION = 64 << 10
GiB, TiB, MiB = 1 << 30, 1 << 40, 1 << 20
# Peak RSS a 1 TiB clone may take beyond a 1 GiB one: the map's bitmaps (bits per
# region, 2 MiB each, given memory only where bits are set) and no more: one byte
# per region would be 16 MiB, and bitmaps made of touched pages were 12 MiB.
RSS_GROWTH = 4 * MiB
MAP_FILES = 1 * MiB  # superblock + journal (its 256 KiB reserve), whatever the size
# Modules `serve` (a local source, a unix socket, no TLS, no mount) must not import
# before it serves: each cost milliseconds of its start and is needed later or never.
NOT_BEFORE_SERVING = {
    "dataclasses",  # @dataclass compiles each class's methods (liveclone/values.py)
    "ctypes",  # mallopt, 0.1 s after the server starts (nbd/limits.py)
    "urllib.parse", "ipaddress",  # URIs needing no quoting (nbd/listeners.py)
    "liveclone.fuse.mount", "liveclone.sources.http", "liveclone.sources.nbd",
    "liveclone.nbdwire.client", "liveclone.core.verify", "liveclone.cli.status",
}
# Nor at all, from its start to its exit.
NEVER = {"dataclasses", "urllib.parse", "ipaddress"}


def serve_new_clone(tmp_path: Path, size: int, env: dict[str, str] | None = None
                    ) -> tuple[int, dict[str, int], str]:
    """Serve a new clone of a sparse ``size`` source (copier paused, so nothing but
    making the clone touches it), check three reads against the source's bytes; return
    the server's peak RSS, the blocks each of the clone's files holds and what it
    wrote on stderr."""
    rng = random.Random(size)
    head, tail = rng.randbytes(4096), rng.randbytes(4096)
    source = tmp_path / f"source-{size}.img"
    with open(source, "wb") as f:
        f.truncate(size)
        f.write(head)
        f.seek(size - len(tail))
        f.write(tail)
    clone = tmp_path / f"clone-{size}.img"
    Path(f"{clone}.lcpause").touch()  # the background copy never starts
    proc = subprocess.Popen([LIVECLONE, "serve", str(source), str(clone), "--socket",
                             str(tmp_path / f"{size}.sock")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri, f"serve printed no URI: {proc.communicate(timeout=30)}"
        conn = Connection(parse_uri(uri))
        try:
            for offset, want in ((0, head), (size - len(tail), tail),
                                 (size // 2 + 12345, bytes(4096))):
                got = bytearray(len(want))
                conn.pread_into(memoryview(got), offset)
                assert got == want, f"wrong bytes at {offset}"
        finally:
            conn.close()
        with open(f"/proc/{proc.pid}/status") as status:
            hwm = next(int(line.split()[1]) << 10 for line in status
                       if line.startswith("VmHWM:"))
        blocks = {suffix: allocated(Path(f"{clone}{suffix}"))
                  for suffix in ("", ".lcmap", ".lcjournal", ".lcdigest")}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        stop_process(proc, 10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    for p in tmp_path.glob(f"*-{size}.img*"):
        os.unlink(p)
    return hwm, blocks, err


def test_new_1tib_clone_serves_at_once_for_the_cost_of_1gib(tmp_path: Path) -> None:
    small_rss, small, _ = serve_new_clone(tmp_path, GiB)
    big_rss, big, _ = serve_new_clone(tmp_path, TiB)
    assert big_rss - small_rss <= RSS_GROWTH, (small_rss, big_rss)
    for blocks in (small, big):
        assert blocks[""] == 0  # nothing copied, nothing written: the clone is all hole
        assert blocks[".lcmap"] + blocks[".lcjournal"] <= MAP_FILES, blocks
    # The digest file holds its slots' space and nothing more.
    for size, blocks in ((GiB, small), (TiB, big)):
        assert blocks[".lcdigest"] <= HEADER_SIZE + size // REGION * SLOT_SIZE + MiB, blocks


def imported(stderr: str) -> list[str]:
    """The modules named by PYTHONPROFILEIMPORTTIME's lines, in the order they were
    imported; every other line as ``"> line"``."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rpartition("|")[2].strip()
            if name != "imported package":
                out.append(name)
        else:
            out.append("> " + line)
    return out


def test_serve_imports_nothing_it_does_not_need_before_it_serves(tmp_path: Path) -> None:
    """Until it says it is serving (the event loop has not run yet: no client was
    answered), and until it exits after a client's reads, ``serve`` of a new clone
    has imported none of NOT_BEFORE_SERVING, resp. NEVER."""
    _, _, err = serve_new_clone(tmp_path, GiB, {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    names = imported(err)
    serving = next(i for i, n in enumerate(names) if n.startswith("> liveclone: serving"))
    assert "liveclone.nbd.server" in names[:serving]  # the record is there
    early = NOT_BEFORE_SERVING & set(names[:serving])
    assert not early, f"imported before serving: {sorted(early)}"
    needless = NEVER & set(names)
    assert not needless, f"imported: {sorted(needless)}"
