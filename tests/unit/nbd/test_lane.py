"""The lane (``nbd/lane.py``, compiled from ``nbd/lane.c``) answers exactly as the
protocol's path does: the same bytes for every READ of a clone whose regions are
partly present (absent ones come from the source, never from the lane), every
WRITE where it belongs, the same errors for requests it must leave alone, with
simple and structured replies. Each case runs with the lane and without it
(``LIVECLONE_LANE=0``), and both must agree byte for byte with a model of the
clone.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from liveclone.core import verify
from liveclone.core.clone import Clone
from liveclone.core.opening import open_clone
from liveclone.nbd import lane
from liveclone.nbd.server import ServerThread
from liveclone.nbdwire import wire
from liveclone.sources.local import LocalFileSource
from tests.conftest import make_image
from tests.unit.nbd.drive import recv_exact as _recv

RS = 64 << 10
SIZE = 8 << 20
HALF = SIZE // 2

pytestmark = pytest.mark.skipif(not lane.available(),
                                reason="the lane is not built (no C compiler at install)")


def _cache(path: Path) -> None:
    """Read a file into the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


@contextmanager
def _mostly_present(tmp_path: Path, seed: int,
                    rng: random.Random) -> Iterator[tuple[Clone, bytearray]]:
    """A clone of a random source of SIZE, three quarters of its regions (picked
    by ``rng``) copied and the rest absent; and the model of what it holds."""
    src = tmp_path / "source.img"
    model = bytearray(make_image(src, SIZE, seed=seed))
    with open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=RS,
                    create=True, exclusive=True) as clone:
        for region in rng.sample(range(clone.regions_total), clone.regions_total * 3 // 4):
            clone.fill(region, region + 1, wait=True)
        yield clone, model


def _connect(path: str, structured: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)  # against a hang only
    # A small send buffer: batches always outgrow it, so the server holds back
    # reading while its answers wait, every time, not only on a slow machine.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect(path)
    _recv(sock, wire.GREETING.size)
    sock.sendall(wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))
    if not structured:
        sock.sendall(wire.encode_option(wire.Opt.EXPORT_NAME, b""))
        _recv(sock, 10)
        return sock
    sock.sendall(wire.encode_option(wire.Opt.STRUCTURED_REPLY)
                 + wire.encode_option(wire.Opt.GO, wire.encode_info_request("", [])))
    acks = 0
    while acks < 2:
        hdr = wire.decode_option_reply_header(_recv(sock, wire.OPTION_REPLY_HEADER.size))
        _recv(sock, hdr.length)
        assert not wire.is_error_reply(hdr.reply), hdr
        acks += hdr.reply == wire.Rep.ACK
    return sock


def _answers(sock: socket.socket, lengths: dict[int, int],
             structured: bool) -> dict[int, tuple[int, bytes]]:
    """Read the replies to every cookie in ``lengths`` (a READ's length, or 0):
    cookie -> (NBD error, data)."""
    got: dict[int, tuple[int, bytes]] = {}
    parts: dict[int, bytearray] = {}
    while len(got) < len(lengths):
        magic = int.from_bytes(_recv(sock, 4), "big")
        if magic == wire.SIMPLE_REPLY_MAGIC:
            rest = _recv(sock, wire.SIMPLE_REPLY.size - 4)
            _, error, cookie = wire.SIMPLE_REPLY.unpack(magic.to_bytes(4, "big") + rest)
            assert not structured or error or lengths[cookie] == 0, "simple reply to a READ"
            data = _recv(sock, lengths[cookie]) if not error else b""
            got[cookie] = (error, data)
            continue
        assert magic == wire.STRUCTURED_REPLY_MAGIC and structured
        rest = _recv(sock, wire.STRUCTURED_REPLY.size - 4)
        _, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack(
            magic.to_bytes(4, "big") + rest)
        payload = _recv(sock, length)
        buf = parts.setdefault(cookie, bytearray())
        error = 0
        if rtype == wire.ReplyType.OFFSET_DATA:
            buf += payload[8:]
        elif rtype == wire.ReplyType.ERROR:
            error = int.from_bytes(payload[:4], "big")
        else:
            assert rtype == wire.ReplyType.NONE, rtype
        if flags & wire.REPLY_FLAG_DONE:
            got[cookie] = (error, bytes(buf) if not error else b"")
    return got


def _exchange(sock: socket.socket, wire_bytes: bytes | bytearray, lengths: dict[int, int],
              structured: bool) -> dict[int, tuple[int, bytes]]:
    """Send a batch while reading its answers, as a pipelining client must: a
    server stops reading requests while its answers wait to be read (its memory
    bound), so sending a large batch before reading any answer can deadlock."""
    sender = threading.Thread(target=sock.sendall, args=(bytes(wire_bytes),), daemon=True)
    sender.start()
    try:
        return _answers(sock, lengths, structured)
    finally:
        sender.join(timeout=30)


def _requests(rng: random.Random, max_block: int) -> list[tuple[int, int, int, int, bytes]]:
    """A mixed batch: (cookie, cmd, flags, offset, length-or-payload) ..."""
    out: list[tuple[int, int, int, int, bytes]] = []
    free = list(range(HALF // 16384))
    for cookie in range(1, 400):
        kind = rng.random()
        length = rng.choice([1, 512, 4096, 4096, 4096, 4096, 65536, 70000, 300000])
        # Reads in the upper half, writes in the lower: NBD runs a batch's
        # requests in any order, so a read must not overlap a write of its batch.
        offset = HALF + rng.randrange(HALF - length + 1)
        if kind < 0.75:
            out.append((cookie, wire.Cmd.READ, 0, offset, b"%d" % length))
        elif kind < 0.80:  # flags the lane leaves to the protocol (DF, FUA)
            flag = rng.choice([wire.CMD_FLAG_FUA, wire.CMD_FLAG_DF])
            out.append((cookie, wire.Cmd.READ, flag, offset, b"%d" % length))
        elif kind < 0.85:  # rejected: past the end, empty, over the maximum block
            bad = rng.choice([(SIZE - 10, 4096), (0, 0), (0, max_block + 1)])
            out.append((cookie, wire.Cmd.READ, 0, bad[0], b"%d" % bad[1]))
        else:  # in a 16 KiB slot of its own: writes of a batch never overlap
            data = rng.randbytes(rng.randrange(1, 9000))
            slot = rng.choice(free)
            free.remove(slot)
            out.append((cookie, wire.Cmd.WRITE, 0, slot * 16384 + rng.randrange(7000), data))
    return out


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("with_lane", [True, False], ids=["lane", "no-lane"])
def test_the_lane_answers_as_the_protocol_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               structured: bool, with_lane: bool) -> None:
    if not with_lane:
        monkeypatch.setenv(lane.ENV, "0")
    rng = random.Random(11)
    with _mostly_present(tmp_path, 3, rng) as (clone, model):
        # Guest writes: in the lower half (where the batches write), most of them,
        # so that most regions there need no write intent any more.
        for _ in range(60):
            offset = rng.randrange(HALF - 9000)
            chunk = rng.randbytes(rng.randrange(1, 9000))
            clone.write(offset, chunk)
            model[offset:offset + len(chunk)] = chunk
        assert 0 < clone.regions_present < clone.regions_total
        _cache(tmp_path / "clone.img")  # what the lane reads
        sock_path = str(tmp_path / "nbd.sock")
        with ServerThread(clone, export_name="") as server:
            server.start(unix_path=sock_path)
            max_block = server.server.export.max_block
            sock = _connect(sock_path, structured)
            n_writes = 0
            for _ in range(3):  # batches, each sent in one piece
                batch = _requests(rng, max_block)
                wire_bytes = bytearray()
                lengths = {}
                for cookie, cmd, flags, offset, arg in batch:
                    if cmd == wire.Cmd.WRITE:
                        wire_bytes += wire.encode_request(cmd, cookie, offset, len(arg), flags)
                        wire_bytes += arg
                        lengths[cookie] = 0
                    else:
                        wire_bytes += wire.encode_request(cmd, cookie, offset, int(arg), flags)
                        lengths[cookie] = int(arg)
                answers = _exchange(sock, wire_bytes, lengths, structured)
                n_writes += sum(cmd == wire.Cmd.WRITE for _, cmd, _, _, _ in batch)
                for cookie, cmd, _flags, offset, arg in batch:
                    if cmd == wire.Cmd.WRITE:
                        assert answers[cookie] == (0, b""), cookie
                        model[offset:offset + len(arg)] = arg
                for cookie, cmd, flags, offset, arg in batch:
                    if cmd != wire.Cmd.READ:
                        continue
                    length = int(arg)
                    error, data = answers[cookie]
                    if (length == 0 or length > max_block or offset + length > SIZE
                            or flags == wire.CMD_FLAG_DF and not structured):
                        assert error == wire.EINVAL, (cookie, offset, length)
                        continue
                    assert error == 0, (cookie, offset, length, error)
                    assert data == model[offset:offset + length], (cookie, offset)
            # Reads alone, after the writes: exactly the model.
            lengths = {}
            wire_bytes = bytearray()
            for cookie in range(1000, 1300):
                length = rng.choice([512, 4096, 4096, 65536, 200000])
                offset = rng.randrange(SIZE - length + 1)
                wire_bytes += wire.encode_request(wire.Cmd.READ, cookie, offset, length)
                lengths[cookie] = length
            answers = _exchange(sock, wire_bytes, lengths, structured)
            for cookie, length in lengths.items():
                offset = wire.decode_request(wire_bytes, (cookie - 1000) * wire.REQUEST.size).offset
                assert answers[cookie] == (0, bytes(model[offset:offset + length])), cookie
            sock.close()
        # Counted once the server stopped (a poll answering counts when it returns).
        lane_answers = server.server.stats.lane
        writes = clone.stats.guest_writes
        # The lane did many requests with it, none without it; every write counted.
        assert (lane_answers > 100) if with_lane else lane_answers == 0, lane_answers
        assert writes == 60 + n_writes


def test_lane_writes_never_skip_the_write_intent(tmp_path: Path) -> None:
    """A write over copied regions whose digest slots still hold the copy's digest
    needs write intent first (``core/digests.py``); the lane leaves those to the
    protocol's path and takes only regions already marked. Afterwards `verify`
    finds every written region as the guest's, and no mismatch."""
    src = tmp_path / "source.img"
    model = bytearray(make_image(src, SIZE, seed=5))
    rng = random.Random(13)
    path = str(tmp_path / "clone.img")
    with open_clone(path, LocalFileSource(str(src)), region_size=RS, create=True,
                    exclusive=True) as clone:
        clone.fill(0, clone.regions_total, wait=True)
        sock_path = str(tmp_path / "nbd.sock")
        with ServerThread(clone, export_name="") as server:
            server.start(unix_path=sock_path)
            sock = _connect(sock_path, structured=True)
            written: set[int] = set()
            for batch in range(4):  # the first writes need intent, later ones not
                wire_bytes = bytearray()
                lengths = {}
                # Distinct blocks in a batch (NBD runs a batch in any order); after
                # the first, blocks of the regions it wrote (marked by then).
                blocks = range(SIZE // 4096) if not batch else \
                    [r * (RS // 4096) + k for r in sorted(written) for k in range(RS // 4096)]
                for i, block in enumerate(rng.sample(blocks, 64)):
                    cookie = batch * 100 + i
                    offset = block * 4096
                    data = rng.randbytes(4096)
                    wire_bytes += wire.encode_request(wire.Cmd.WRITE, cookie, offset, 4096)
                    wire_bytes += data
                    lengths[cookie] = 0
                    model[offset:offset + 4096] = data
                    written.add(offset // RS)
                assert all(a == (0, b"") for a in _exchange(sock, wire_bytes, lengths,
                                                            True).values())
            sock.close()
        assert server.server.stats.lane > 0  # later batches went through the lane
    with open(path, "rb") as f:
        assert f.read() == model
    report = verify.verify_clone(path)
    assert report.mismatch_count == 0, report.mismatched
    guest = {r for a, b in report.guest_runs for r in range(a, b)}
    assert guest == written


def test_the_lane_never_reads_an_oversized_writes_payload_as_requests(tmp_path: Path) -> None:
    """A WRITE over the maximum block is refused and its payload skipped by the
    protocol (``_discard``). When that payload comes in later pieces, the lane
    must wait for the next message boundary (``to_boundary``): a payload made of
    valid READ requests gets no answer of its own."""
    src = tmp_path / "source.img"
    model = make_image(src, SIZE, seed=9)
    with open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=RS,
                    create=True, exclusive=True) as clone:
        clone.fill(0, clone.regions_total, wait=True)
        _cache(tmp_path / "clone.img")  # what the lane reads
        sock_path = str(tmp_path / "nbd.sock")
        with ServerThread(clone, export_name="") as server:
            server.start(unix_path=sock_path)
            max_block = server.server.export.max_block
            sock = _connect(sock_path, structured=False)
            fake = wire.encode_request(wire.Cmd.READ, 7, 0, 4096)
            length = (max_block // len(fake) + 1) * len(fake)
            sock.sendall(wire.encode_request(wire.Cmd.WRITE, 1, 0, length))
            assert _answers(sock, {1: 0}, False) == {1: (wire.EINVAL, b"")}
            sock.sendall(fake * (length // len(fake)))  # the payload, after the refusal
            sock.sendall(wire.encode_request(wire.Cmd.READ, 2, 4096, 4096))
            # The next answer is the real READ's, with its bytes.
            assert _answers(sock, {2: 4096}, False) == {2: (0, model[4096:8192])}
            sock.close()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "no-sendfile"])
def test_large_reads_sent_by_the_kernel_arrive_whole_and_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, structured: bool, sendfile: bool) -> None:
    """READs of at least ``SENDFILE_MIN`` bytes of present, cached data go out by
    sendfile as far as the socket takes them, the rest copied behind them
    (``_Connection._send_range``). A client that reads slowly (a small receive
    buffer), pipelining large and small READs and WRITEs, gets every answer
    whole and exactly the model's bytes; partly absent ranges take the copy."""
    if not sendfile:
        monkeypatch.setattr(lane, "_sendfile_ok", False)
    src = tmp_path / "source.img"
    model = bytearray(make_image(src, SIZE, seed=17))
    rng = random.Random(23)
    with open_clone(str(tmp_path / "clone.img"), LocalFileSource(str(src)), region_size=RS,
                    create=True, exclusive=True) as clone:
        # All present but a few regions of the upper half: some large reads
        # cannot be sent from the clone file.
        absent = set(rng.sample(range(clone.regions_total // 2, clone.regions_total), 6))
        for region in range(clone.regions_total):
            if region not in absent:
                clone.fill(region, region + 1, wait=True)
        _cache(tmp_path / "clone.img")
        sock_path = str(tmp_path / "nbd.sock")
        with ServerThread(clone, export_name="") as server:
            server.start(unix_path=sock_path)
            sock = _connect(sock_path, structured)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            cookie = 0
            for _ in range(4):
                wire_bytes = bytearray()
                lengths: dict[int, int] = {}
                reads: dict[int, int] = {}
                writes: list[tuple[int, bytes]] = []
                for _ in range(40):
                    cookie += 1
                    if rng.random() < 0.2:  # a small write, in the lower half
                        data = rng.randbytes(rng.choice([512, 4096]))
                        offset = rng.randrange(HALF - len(data))
                        if any(o < offset + len(data) and offset < o + len(d)
                               for o, d in writes):
                            continue  # writes of a batch never overlap
                        wire_bytes += wire.encode_request(wire.Cmd.WRITE, cookie, offset,
                                                          len(data)) + data
                        lengths[cookie] = 0
                        writes.append((offset, data))
                        continue
                    length = rng.choice([4096, 131072, 300000, 1 << 20, 2 << 20])
                    offset = HALF + rng.randrange(HALF - length + 1)  # reads apart
                    wire_bytes += wire.encode_request(wire.Cmd.READ, cookie, offset, length)
                    lengths[cookie] = length
                    reads[cookie] = offset
                answers = _exchange(sock, wire_bytes, lengths, structured)
                for c, offset in reads.items():
                    error, data = answers[c]
                    assert error == 0 and data == model[offset:offset + lengths[c]], c
                for offset, data in writes:
                    model[offset:offset + len(data)] = data
            # One at a time, on an empty socket, in the lower half (all present):
            # the header and the first bytes go by sendfile, the rest of the
            # larger ones (over the send buffer) after them.
            for length in (131072, 1 << 20, 3 << 20, HALF):
                cookie += 1
                offset = rng.randrange(HALF - length + 1)
                request = wire.encode_request(wire.Cmd.READ, cookie, offset, length)
                answers = _exchange(sock, request, {cookie: length}, structured)
                assert answers[cookie] == (0, bytes(model[offset:offset + length])), length
            sock.close()
            sent = server.server.stats.sendfile
        if sendfile and not lane.sendfile_ok():  # the answers were checked all the same
            print("this kernel cannot tell what its page cache holds (no cachestat): "
                  "no READ went by sendfile")
            sendfile = False
        assert (sent > 0) if sendfile else sent == 0, sent
    with open(tmp_path / "clone.img", "rb") as f:
        got = f.read()
    for region in range(SIZE // RS):
        if region not in absent:
            assert got[region * RS:(region + 1) * RS] == model[region * RS:(region + 1) * RS]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("poll_max_ns", [0, 50_000_000], ids=["no-poll", "poll"])
def test_requests_one_at_a_time_are_answered_from_the_poll(
        tmp_path: Path, structured: bool, poll_max_ns: int) -> None:
    """A client that waits for each answer (queue depth 1), with the server polling
    for up to 50 ms before it sleeps, so that its poll answers what the lane can
    (``Lane.serve``), and with no polling. Single requests and pairs, of every
    kind: what the lane answers (READs of present data, WRITEs of marked
    regions), what it must leave whole to the protocol (absent regions, FUA, a
    FLUSH, requests to reject, a pair whose second is one of those). Every answer
    is checked against a model of the clone."""
    rng = random.Random(19)
    with _mostly_present(tmp_path, 17, rng) as (clone, model):
        for region in range(0, clone.regions_total, 3):  # marked: lane writes go there
            if clone.is_present(region):
                clone.write(region * RS, bytes(model[region * RS:region * RS + 512]))
        _cache(tmp_path / "clone.img")
        sock_path = str(tmp_path / "nbd.sock")
        with ServerThread(clone, export_name="", poll_max_ns=poll_max_ns) as server:
            server.start(unix_path=sock_path)
            sock = _connect(sock_path, structured)
            cookie = 0
            for _ in range(600):
                pair = []
                for _ in range(1 if rng.random() < 0.8 else 2):
                    cookie += 1
                    kind = rng.random()
                    length = rng.choice([512, 4096, 4096, 65536])
                    offset = rng.randrange(SIZE - length + 1)
                    if kind < 0.55:
                        pair.append((cookie, wire.Cmd.READ, 0, offset, length, b""))
                    elif kind < 0.85:
                        flags = wire.CMD_FLAG_FUA if kind < 0.6 else 0
                        pair.append((cookie, wire.Cmd.WRITE, flags, offset, length,
                                     rng.randbytes(length)))
                    elif kind < 0.9:
                        pair.append((cookie, wire.Cmd.FLUSH, 0, 0, 0, b""))
                    else:  # rejected: past the end
                        pair.append((cookie, wire.Cmd.READ, 0, SIZE - 100, 4096, b""))
                if len(pair) == 2 and pair[0][3] < pair[1][3] + pair[1][4] \
                        and pair[1][3] < pair[0][3] + pair[0][4]:
                    pair.pop()  # NBD runs a pair in any order: no overlaps in one
                wire_bytes = bytearray()
                lengths = {}
                for c, cmd, flags, offset, length, data in pair:
                    wire_bytes += wire.encode_request(cmd, c, offset, length, flags) + data
                    lengths[c] = length if cmd == wire.Cmd.READ else 0
                answers = _exchange(sock, wire_bytes, lengths, structured)
                for c, cmd, _flags, offset, length, data in pair:
                    if cmd == wire.Cmd.READ and offset + length > SIZE:
                        assert answers[c][0] == wire.EINVAL, c
                    elif cmd == wire.Cmd.READ:
                        assert answers[c] == (0, bytes(model[offset:offset + length])), c
                    else:
                        assert answers[c] == (0, b""), c
                        if cmd == wire.Cmd.WRITE:
                            model[offset:offset + length] = data
            for offset in range(0, SIZE, 65536):  # the whole export, as the model
                cookie += 1
                answer = _exchange(sock, wire.encode_request(wire.Cmd.READ, cookie, offset,
                                                             65536), {cookie: 65536},
                                   structured)
                assert answer[cookie] == (0, bytes(model[offset:offset + 65536])), offset
            sock.close()
            stats = server.server.stats
    assert stats.lane > 100
    assert (stats.polled > 100) if poll_max_ns else stats.polled == 0, stats.polled


def _polling_server(tmp_path: Path, clone: Clone) -> tuple[ServerThread, socket.socket]:
    """A server of ``clone`` that polls for up to 50 ms from its first request on
    (its poll grown already), and a client connected to it (simple replies)."""
    _cache(tmp_path / "clone.img")
    server = ServerThread(clone, export_name="", poll_max_ns=50_000_000)
    sock_path = str(tmp_path / "nbd.sock")
    server.start(unix_path=sock_path)
    sock = _connect(sock_path, structured=False)
    server.server.poller.ns = server.server.poller.max_ns
    return server, sock


def _no_more_replies(sock: socket.socket) -> None:
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(16)


def test_the_poll_never_reads_the_middle_of_a_message(tmp_path: Path) -> None:
    """A READ split across two pieces of input, then a WRITE whose payload comes in
    pieces and holds bytes that look like a READ: answering the READ from the
    protocol's path polls while the WRITE's header and the start of its payload
    are still being handled. The poll must not take the rest of the payload for
    requests: the client gets the READ's and the WRITE's answers, nothing else,
    and the WRITE's bytes land whole."""
    rng = random.Random(23)
    with _mostly_present(tmp_path, 29, rng) as (clone, model):
        clone.fill(0, clone.regions_total, wait=True)
        server, sock = _polling_server(tmp_path, clone)
        with server, sock:
            read = wire.encode_request(wire.Cmd.READ, 1, 0, 4096)
            fake = wire.encode_request(wire.Cmd.READ, 3, 0, 4096)
            payload = bytes(100) + fake + bytes(8192 - 100 - len(fake))
            sock.sendall(read[:13])
            time.sleep(0.1)  # the first piece is with the protocol: a partial header
            sock.sendall(read[13:] + wire.encode_request(wire.Cmd.WRITE, 2, 65536, 8192)
                         + payload[:100])
            assert _answers(sock, {1: 4096}, False) == {1: (0, bytes(model[:4096]))}
            sock.sendall(payload[100:128])
            time.sleep(0.05)
            sock.sendall(payload[128:])
            assert _answers(sock, {2: 0}, False) == {2: (0, b"")}
            _no_more_replies(sock)
            assert server.server.running == 0
    with open(tmp_path / "clone.img", "rb") as f:
        f.seek(65536)
        assert f.read(8192) == payload


def test_the_poll_never_reads_a_skipped_payload(tmp_path: Path) -> None:
    """A WRITE over the largest block is rejected and its payload skipped as it
    comes; a FLUSH before it makes the server answer from its pool and poll. The
    payload holds bytes that look like a READ: nobody answers them."""
    rng = random.Random(31)
    with _mostly_present(tmp_path, 37, rng) as (clone, _model):
        clone.fill(0, clone.regions_total, wait=True)
        server, sock = _polling_server(tmp_path, clone)
        with server, sock:
            big = server.server.export.max_block + 1
            sock.sendall(wire.encode_request(wire.Cmd.FLUSH, 1, 0, 0)
                         + wire.encode_request(wire.Cmd.WRITE, 2, 0, big) + bytes(100))
            assert _answers(sock, {1: 0, 2: 0}, False) == {1: (0, b""),
                                                           2: (wire.EINVAL, b"")}
            sock.sendall(wire.encode_request(wire.Cmd.READ, 3, 0, 4096))  # still payload
            _no_more_replies(sock)
            assert server.server.stats.polled == 0


def test_a_failing_request_is_answered_and_polling_goes_on(tmp_path: Path) -> None:
    """A WRITE to a clone read-only after a failure fails where it is dispatched
    (``write_nowait``): the client gets EIO and keeps its connection, and the
    server counts nothing as still running, so its polls go on."""
    rng = random.Random(41)
    with _mostly_present(tmp_path, 43, rng) as (clone, model):
        clone.fill(0, clone.regions_total, wait=True)
        server, sock = _polling_server(tmp_path, clone)
        with server, sock:
            clone.lifecycle.fail("a test's failure")
            sock.sendall(wire.encode_request(wire.Cmd.WRITE, 7, 0, 512) + bytes(512))
            assert _answers(sock, {7: 0}, False) == {7: (wire.EIO, b"")}
            assert server.server.running == 0
            for cookie in range(8, 40):  # answered from the poll, one at a time
                sock.sendall(wire.encode_request(wire.Cmd.READ, cookie, 4096, 4096))
                assert _answers(sock, {cookie: 4096}, False) == {
                    cookie: (0, bytes(model[4096:8192]))}
        # Read once the server stopped: a poll answering counts its answers when
        # it returns, up to the poll's length after the last one.
        assert server.server.stats.polled > 0
