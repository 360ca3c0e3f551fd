"""Events for ``GET /v1/events``: ``created``, ``completed``, ``failed``, ``removed``.

Each subscriber has its own bounded queue. A subscriber that does not keep up
(its queue full) is dropped rather than letting the daemon's memory grow: its
stream ends and it may connect again. Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("created", "completed", "failed", "removed")
QUEUE = 1000  # events a subscriber may fall behind by before it is dropped


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[tuple[str, str] | None]] = set()

    def subscribe(self) -> asyncio.Queue[tuple[str, str] | None]:
        """A queue of ``(kind, JSON text)``; None means the stream must end."""
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(QUEUE + 1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        self._subscribers.discard(queue)

    def publish(self, kind: str, name: str, status: dict[str, Any]) -> None:
        assert kind in KINDS
        text = json.dumps({"event": kind, "name": name, "status": status})
        log.info("event %s: %s (phase %s)", kind, name, status.get("phase"))
        for queue in list(self._subscribers):
            if queue.qsize() >= QUEUE:
                self._subscribers.discard(queue)
                queue.put_nowait(None)  # the one slot kept for this
                log.warning("dropping an event subscriber that fell %d events behind",
                            QUEUE)
                continue
            queue.put_nowait((kind, text))

    def close(self) -> None:
        for queue in list(self._subscribers):
            if not queue.full():
                queue.put_nowait(None)
        self._subscribers.clear()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
