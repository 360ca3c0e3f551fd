"""Hypothesis over the NBD server state machine.

* Every (state, input) pair: drive a connection into each state, apply one input
  of each kind, and check the outcome against ``TRANSITIONS``: the new state the
  table names, or RemoteProtocolError (peer input) / LocalProtocolError (our
  reply) when the table has no entry.
* Fuzz (h11's afl harness, in Hypothesis): arbitrary bytes, split anywhere, in any
  state, give events or RemoteProtocolError, never another exception; and once
  closed, the connection stays closed.
* Round trips of the codec, and validate_request's promise to storage code.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from liveclone.nbd import protocol as p
from liveclone.nbdwire import wire
from liveclone.nbdwire.wire import Cmd, Opt
from tests.unit.nbd.drive import BUILDERS, EXPORT, SIZE, out

State, Input = p.State, p.Input

# Each input kind, as what a client sends (bytes) or what we do (a reply).
# The bytes are parsed as whatever the state expects, so a kind "means" its name
# only in the states where the parser would read it so; elsewhere it is garbage.
PEER_BYTES: dict[Input, bytes] = {
    Input.CLIENT_FLAGS: wire.encode_client_flags(wire.FLAG_C_FIXED_NEWSTYLE),
    Input.OPTION: wire.encode_option(Opt.LIST),
    Input.EXPORT_CHOSEN: wire.encode_option(Opt.GO, wire.encode_info_request("", [])),
    Input.ABORT: wire.encode_option(Opt.ABORT),
    Input.REQUEST: wire.encode_request(Cmd.READ, 100, 0, 512),
    Input.DISC: wire.encode_request(Cmd.DISC, 101),
    Input.STARTTLS: wire.encode_option(Opt.STARTTLS),
}


def _reply(conn: p.ServerConnection) -> None:
    conn.send(p.ReadDone(1, bytes(512)))  # the READ that draining() left in flight


def _bytes_input(data: bytes) -> Callable[[p.ServerConnection], None]:
    def feed(conn: p.ServerConnection) -> None:
        conn.receive_data(data)
    return feed


ACTIONS: dict[Input, Callable[[p.ServerConnection], None]] = {
    **{k: _bytes_input(v) for k, v in PEER_BYTES.items()},
    Input.REPLY: _reply,
    Input.TLS_STARTED: lambda conn: conn.tls_started(),
}

# What each input does in each state where the parser reads it as that input.
# Anything in a state that cannot read it is either misparsed (and must then be a
# RemoteProtocolError or a harmless valid message) or, for REPLY, a LocalProtocolError.
PARSED_AS = {
    State.HANDSHAKE: {Input.CLIENT_FLAGS},
    # (STARTTLS is an option here: the builder's server offers no TLS; tests of the
    # TLS_HANDSHAKE state use a server that does.)
    State.NEGOTIATING: {Input.OPTION, Input.EXPORT_CHOSEN, Input.ABORT},
    State.TLS_HANDSHAKE: set(),  # bytes are held, unparsed, until tls_started()
    State.TRANSMISSION: {Input.REQUEST, Input.DISC},
    State.DRAINING: {Input.REQUEST, Input.DISC},
    State.CLOSED: set(),
}


@given(st.sampled_from(list(State)), st.sampled_from(list(ACTIONS)))
def test_every_state_input_pair(state: p.State, inp: p.Input) -> None:
    conn = BUILDERS[state]()
    if state is State.TRANSMISSION and inp is Input.REPLY:
        conn.receive_data(wire.encode_request(Cmd.READ, 1, 0, 512))
    expected = p.TRANSITIONS.get((state, inp))
    if inp is Input.DISC and state is State.TRANSMISSION:
        expected = State.CLOSED  # nothing in flight: DRAINING then DRAINED at once
    if inp is Input.REPLY and state is State.DRAINING:
        expected = State.CLOSED  # the only request in flight: DRAINED
    try:
        ACTIONS[inp](conn)
    except p.LocalProtocolError:
        assert inp in p.LOCAL_INPUTS and expected is None, (state, inp)
        assert conn.state is state  # our misuse changes nothing
        return
    except p.RemoteProtocolError:
        assert inp not in p.LOCAL_INPUTS, (state, inp)
        assert expected is None or inp not in PARSED_AS[state], (state, inp)
        assert conn.state is State.CLOSED
        return
    if state is State.CLOSED:
        assert conn.state is State.CLOSED  # data after close is ignored
        return
    if state is State.TLS_HANDSHAKE and inp not in p.LOCAL_INPUTS:
        assert conn.state is state  # held for the TLS layer, not parsed
        return
    if inp in PARSED_AS[state] or inp in p.LOCAL_INPUTS:
        assert expected is not None and conn.state is expected, (state, inp, conn.state)
    else:
        # Misparsed as something else but valid there (e.g. 4 bytes of an option
        # header read as client flags): the state is still one the table allows.
        assert any(conn.state is dst for (src, _), dst in p.TRANSITIONS.items()
                   if src is state), (state, inp, conn.state)


@settings(max_examples=400)
@given(st.sampled_from(list(State)), st.lists(st.binary(max_size=80), max_size=8))
def test_fuzz_garbage_gives_events_or_remote_error(state: p.State, chunks: list[bytes]) -> None:
    conn = BUILDERS[state]()
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except p.RemoteProtocolError:
            assert conn.state is State.CLOSED
            assert conn.receive_data(b"anything") == []
            return
        for ev in events:
            assert isinstance(ev, p.ExportChosen | p.Command | p.Rejected | p.Disconnect
                              | p.Aborted | p.StartTLS)
            if isinstance(ev, p.Command):
                _assert_valid(conn, ev)
        out(conn)


_structured_requests = st.builds(
    wire.encode_request,
    cmd=st.sampled_from([*Cmd, 9, 200]),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.one_of(st.integers(0, SIZE + 10), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 70000), st.integers(0, 2**32 - 1)),
    flags=st.integers(0, 2**16 - 1),
)


@settings(max_examples=400)
@given(st.lists(_structured_requests, max_size=6), st.booleans(), st.integers(1, 50))
def test_fuzz_requests_in_transmission(reqs: list[bytes], structured: bool,
                                       cut: int) -> None:
    """Well-formed headers with random fields (and no payloads): the parser either
    emits valid Commands, rejects with an NBD error, or drops the connection."""
    conn = BUILDERS[State.TRANSMISSION]() if structured else _simple_transmission()
    data = b"".join(reqs)
    try:
        for i in range(0, len(data), cut):
            for ev in conn.receive_data(data[i:i + cut]):
                if isinstance(ev, p.Command):
                    _assert_valid(conn, ev)
                elif isinstance(ev, p.Rejected):
                    assert ev.error in wire.NBD_ERRORS
    except p.RemoteProtocolError:
        assert conn.state is State.CLOSED


def _simple_transmission() -> p.ServerConnection:
    from tests.unit.nbd.drive import transmitting
    return transmitting(structured=False)


def _assert_valid(conn: p.ServerConnection, c: p.Command) -> None:
    """What validate_request promises storage code."""
    export = conn.export
    assert export is not None
    assert c.flags & ~p.ALLOWED_FLAGS[c.cmd] == 0
    if c.cmd == Cmd.FLUSH:
        assert c.offset == c.length == 0
    else:
        assert 0 < c.length and c.offset + c.length <= export.size
    if c.cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert not export.read_only
    if c.cmd == Cmd.WRITE:
        assert c.data is not None and len(c.data) == c.length
    if c.cmd == Cmd.BLOCK_STATUS:
        assert conn.structured and conn.base_allocation
    if c.flags & wire.CMD_FLAG_DF:
        assert conn.structured


@given(st.sampled_from([*Cmd, 77]), st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.booleans())
def test_validate_request_never_lets_bad_ranges_through(
        cmd: int, flags: int, offset: int, length: int, structured: bool, meta: bool,
        ro: bool) -> None:
    export = p.Export("x", SIZE, read_only=ro) if ro else EXPORT
    if p.validate_request(export, structured, meta, cmd, flags, offset, length) is None:
        assert cmd in p.ALLOWED_FLAGS
        assert cmd == Cmd.FLUSH or offset + length <= SIZE
        assert not (ro and cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))


@given(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_request_round_trip(flags: int, cmd: int, cookie: int, offset: int,
                            length: int) -> None:
    data = wire.encode_request(cmd, cookie, offset, length, flags)
    assert wire.decode_request(data) == (wire.REQUEST_MAGIC, flags, cmd, cookie, offset,
                                         length)


names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=40)


@given(names, st.lists(st.integers(0, 2**16 - 1), max_size=5), st.lists(names, max_size=4))
def test_option_payload_round_trips(name: str, infos: list[int], queries: list[str]) -> None:
    assert wire.decode_info_request(wire.encode_info_request(name, infos)) == (name, infos)
    assert wire.decode_meta_context_request(
        wire.encode_meta_context_request(name, queries)) == (name, queries)


@given(st.binary(max_size=64))
def test_option_payload_decoders_raise_only_wire_error(data: bytes) -> None:
    for decode in (wire.decode_info_request, wire.decode_meta_context_request,
                   wire.decode_rep_server, wire.decode_rep_meta_context, wire.decode_info,
                   wire.decode_block_status, wire.decode_error_chunk):
        try:
            decode(data)
        except wire.WireError:
            pass


_exports = st.builds(
    lambda size, ro, min_block, max_block: p.Export("x", size, read_only=ro,
                                                     min_block=min_block, max_block=max_block),
    st.integers(0, 1 << 40), st.booleans(), st.sampled_from([1, 512, 4096]),
    st.sampled_from([4096, 1 << 20, p.DEFAULT_MAX_BLOCK]))


@settings(max_examples=1000)
@given(_exports, st.sampled_from([*Cmd, 77]),
       st.one_of(st.just(0), st.integers(0, 2**16 - 1)),
       st.one_of(st.integers(0, 1 << 41), st.integers(0, 2**64 - 1)),
       st.one_of(st.integers(0, 1 << 21), st.integers(0, 2**32 - 1)),
       st.booleans(), st.booleans())
def test_validate_request_fast_path_gives_the_full_answer(
        export: p.Export, cmd: int, flags: int, offset: int, length: int, structured: bool,
        meta: bool) -> None:
    """The fast path of the choke point lets through exactly what every check does."""
    fast = p.validate_request(export, structured, meta, cmd, flags, offset, length)
    full = p._validate_request(export, structured, meta, cmd, flags, offset, length)
    assert fast == full


def _pipelined_request(draw: st.DrawFn, cookie: int) -> bytes:
    cmd = draw(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE]))
    if cmd == Cmd.FLUSH:
        return wire.encode_request(cmd, cookie, 0, 0)
    offset = draw(st.integers(0, SIZE - 1))
    length = draw(st.integers(1, min(SIZE - offset, 9000)))
    flags = draw(st.sampled_from([0, 0, wire.CMD_FLAG_FUA]))
    data = wire.encode_request(cmd, cookie, offset, length, flags)
    if cmd == Cmd.WRITE:
        data += bytes([cookie & 0xFF]) * length
    return data


@st.composite
def _pipelines(draw: st.DrawFn) -> list[bytes]:
    n = draw(st.integers(1, 40))
    return [_pipelined_request(draw, cookie) for cookie in range(1, n + 1)]


@settings(max_examples=300)
@given(_pipelines(), st.lists(st.integers(1, 70000), max_size=8))
def test_pipelined_requests_parse_in_one_pass(reqs: list[bytes], cuts: list[int]) -> None:
    """A buffer holding many requests gives all their Commands from one
    receive_data, the same as feeding them one by one or split anywhere; nothing
    is left buffered; WRITE payloads are whole."""
    one_by_one = BUILDERS[State.TRANSMISSION]()
    expected = [ev for r in reqs for ev in one_by_one.receive_data(r)]
    whole = BUILDERS[State.TRANSMISSION]()
    events = whole.receive_data(b"".join(reqs))
    assert events == expected and len(events) == len(reqs)
    assert (whole.buffered, whole.received, whole.inflight) == (0, len(reqs), len(reqs))
    assert out(whole) == out(one_by_one)
    split = BUILDERS[State.TRANSMISSION]()
    data = b"".join(reqs)
    got: list[p.Event] = []
    pos = 0
    for n in sorted(set(cuts)) + [len(data)]:
        got += split.receive_data(data[pos:n])
        pos = max(pos, n)
    assert got == expected
    for ev in events:
        assert isinstance(ev, p.Command)
        if ev.cmd == Cmd.WRITE:
            assert ev.data == bytes([ev.cookie & 0xFF]) * ev.length
