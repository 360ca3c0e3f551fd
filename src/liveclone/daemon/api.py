"""The REST API on the daemon's unix socket, built on aiohttp.

Routes (the OpenAPI document, ``openapi.DOCUMENT``, describes each)::

    POST   /v1/clones                  create (or resume) a clone; 201 once it is on NBD
    GET    /v1/clones                  every clone
    GET    /v1/clones/{name}           one clone
    POST   /v1/clones/{name}/pause     pause its background copy
    POST   /v1/clones/{name}/resume    resume it
    DELETE /v1/clones/{name}           stop serving it (?remove=true: delete its files)
    GET    /v1/events                  server-sent events
    GET    /metrics                    Prometheus text
    GET    /openapi.json               the OpenAPI document

Every error is JSON ``{"error": ..., "fix": ...}`` with its status: 400 bad body,
404 unknown name (or route), 409 name or clone path in use, 422 bad source, 507 no
space. A handler only checks the request and awaits the manager, which runs the
blocking work in the executor: a bad or slow request never holds up the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from liveclone.daemon.events import EventBus
from liveclone.daemon.manager import ApiError, Manager, parse_body
from liveclone.daemon.metrics import Metrics
from liveclone.daemon.openapi import DOCUMENT

log = logging.getLogger("liveclone.daemon.api")

MAX_BODY = 64 << 10  # a POST body is a few hundred bytes
SSE_KEEPALIVE = 15.0  # seconds between comments on a quiet event stream

MANAGER = web.AppKey("manager", Manager)
METRICS = web.AppKey("metrics", Metrics)
EVENTS = web.AppKey("events", EventBus)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status,
                        content_type="application/json")


def error_response(status: int, error: str, fix: str) -> web.Response:
    return _json({"error": error, "fix": fix}, status)


@web.middleware
async def errors_and_latency(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON; every request's time in the latency histogram."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        return error_response(e.status, e.error, e.fix)
    except web.HTTPException as e:
        status = e.status
        if e.status == 404:
            return error_response(404, f"no route {request.method} {request.path}",
                                  "GET /openapi.json lists the routes")
        if e.status == 405:
            return error_response(405, f"{request.method} is not allowed on {request.path}",
                                  "GET /openapi.json lists the routes")
        if e.status == 413:
            return error_response(413, "the body is too large",
                                  f"send at most {MAX_BODY} bytes")
        return error_response(e.status, e.reason, "see GET /openapi.json")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error", "see the daemon's log")
    finally:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "other"
        request.app[METRICS].api_latency.labels(request.method, path, str(status)).observe(
            time.perf_counter() - started)


async def create(request: web.Request) -> web.Response:
    try:
        body = await request.json(loads=json.loads)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}",
                       'send a JSON object such as {"source": "/images/golden.img", '
                       '"clone": "/var/lib/clones/vm1.img"}') from None
    record = parse_body(body)
    manager = request.app[MANAGER]
    m = await manager.create(record)
    return _json(manager.describe(m), 201)


async def listing(request: web.Request) -> web.Response:
    return _json(request.app[MANAGER].listing())


async def one(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return _json(manager.describe(manager.get(request.match_info["name"])))


async def pause(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return _json(manager.describe(await manager.pause(request.match_info["name"])))


async def resume(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return _json(manager.describe(await manager.resume(request.match_info["name"])))


async def remove(request: web.Request) -> web.Response:
    value = request.query.get("remove", "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ApiError(400, f"remove={value!r} is not true or false",
                       "give ?remove=true to delete the files, or leave it out")
    delete = value in ("true", "1", "yes")
    name = request.match_info["name"]
    status = await request.app[MANAGER].remove(name, delete)
    return _json({"name": name, "removed": True, "files_deleted": delete, "status": status})


async def events(request: web.Request) -> web.StreamResponse:
    bus = request.app[EVENTS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    queue = bus.subscribe()
    try:
        await response.write(b": liveclone events\n\n")
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if item is None:
                break
            kind, text = item
            await response.write(f"event: {kind}\ndata: {text}\n\n".encode())
    except ConnectionResetError:
        pass  # the client went away
    finally:
        bus.unsubscribe(queue)
    return response


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    text = request.app[METRICS].text()
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return _json(DOCUMENT)


def make_app(manager: Manager, metrics_: Metrics, bus: EventBus) -> web.Application:
    app = web.Application(middlewares=[errors_and_latency], client_max_size=MAX_BODY)
    app[MANAGER] = manager
    app[METRICS] = metrics_
    app[EVENTS] = bus
    app.router.add_post("/v1/clones", create)
    app.router.add_get("/v1/clones", listing, allow_head=False)
    app.router.add_get("/v1/clones/{name}", one, allow_head=False)
    app.router.add_delete("/v1/clones/{name}", remove)
    app.router.add_post("/v1/clones/{name}/pause", pause)
    app.router.add_post("/v1/clones/{name}/resume", resume)
    app.router.add_get("/v1/events", events, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    return app
