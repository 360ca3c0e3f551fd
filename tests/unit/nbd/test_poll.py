"""Adaptive polling before the server's loop sleeps (nbd/poll.py).

What it changes is only when the loop thread sleeps, so these tests check its
rules: a poll ends as soon as a client's socket has data, the time polled grows
after short waits and shrinks after long ones, and 0 turns it off. That answers
stay right with polling on is shown by every NBD test (it is on by default);
``tests/integration/test_nbd_clients.py::test_one_request_at_a_time_with_and_without_polling``
checks it both ways with fio.
"""

from __future__ import annotations

import socket
import time

import pytest

from liveclone.nbd import lane
from liveclone.nbd.poll import GROW_FROM, Poller

pytestmark = pytest.mark.skipif(not lane.poll_available(),
                                reason="liveclone.nbd._lane is not built (no C compiler at "
                                       "install): there is no polling")


def _waits(poller: Poller, n: int, pause: float = 0.0) -> list[int]:
    """``n`` times: the server goes idle, nothing comes during its poll, and a
    request wakes it ``pause`` seconds later. The poll's length after each."""
    seen = []
    for _ in range(n):
        poller.idle()
        if pause:
            time.sleep(pause)
        poller.woke()
        seen.append(poller.ns)
    return seen


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_poll_ends_when_a_client_sends(pair):
    a, b = pair
    poller = Poller(max_ns=60 * 10**9)  # a minute: ending at once can only be the data
    poller.watch(a.fileno())
    poller.ns = poller.max_ns
    b.send(b"x")
    start = time.monotonic()
    poller.idle()
    assert time.monotonic() - start < 30  # a hang guard, not a speed check
    assert poller.ns == poller.max_ns  # the wait ended in the poll: nothing to adapt
    poller.woke()
    assert poller.ns == poller.max_ns


def test_short_waits_grow_the_poll_up_to_the_most(pair):
    a, _ = pair
    # About 65 ms: half of it is far above this loop's own time between polls.
    poller = Poller(max_ns=GROW_FROM << 14)
    poller.watch(a.fileno())
    seen = _waits(poller, 16)  # each wait is the poll alone
    assert seen[:15] == [GROW_FROM << k for k in range(15)]
    # A poll of the whole most that caught nothing: the wait was longer than the
    # most, so the next poll is shorter (as in QEMU).
    assert seen[15] == poller.max_ns // 2


def test_long_waits_shrink_the_poll_to_none(pair):
    a, _ = pair
    poller = Poller(max_ns=100_000)
    poller.watch(a.fileno())
    poller.ns = poller.max_ns
    seen = _waits(poller, 8, pause=0.002)  # a client slower than max_ns
    assert seen[:2] == [50_000, 25_000]
    assert seen[-1] == 0


def test_no_polling_with_max_0_or_no_client(pair):
    a, _ = pair
    off = Poller(max_ns=0)
    off.watch(a.fileno())
    assert _waits(off, 5) == [0] * 5
    assert _waits(Poller(max_ns=10**9), 5) == [0] * 5  # no client to poll


def test_forgotten_sockets_are_not_polled(pair):
    a, b = pair
    poller = Poller(max_ns=60 * 10**9)
    poller.watch(a.fileno())
    poller.watch(a.fileno())  # a reused number: two owners
    poller.forget(a.fileno())  # one of them went: a is still polled
    poller.watch(b.fileno())
    poller.forget(b.fileno())
    poller.forget(b.fileno())  # twice: nothing more happens
    b.send(b"x")  # a has data, and a is still polled
    poller.ns = poller.max_ns
    start = time.monotonic()
    poller.idle()
    assert poller._since == 0  # the poll ended with an event, not at its time
    a.recv(1)
    poller.forget(a.fileno())
    poller.idle()  # nothing left to poll: returns at once instead of a minute
    assert time.monotonic() - start < 30  # a hang guard, not a speed check


def test_a_negative_most_is_refused():
    with pytest.raises(ValueError, match="negative"):
        Poller(max_ns=-1)
