"""The API's OpenAPI 3.1 document, served at ``GET /openapi.json``. Written by hand:
the routes are few and fixed (scripts rely on them), and the test checks that every
route the app serves is described here and nothing else."""

from __future__ import annotations

from typing import Any

from liveclone import __version__


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _clone_answer(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Clone"}}}}


NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
        "description": "The clone's name (its NBD export name)."}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "liveclone daemon",
        "version": __version__,
        "description": "Clones of disk images, usable at once over NBD (and FUSE) while "
                       "a background copier fills them. Served on a unix socket.",
    },
    "paths": {
        "/v1/clones": {
            "post": {
                "summary": "Create a clone (or resume one) and serve it",
                "description": "Answers once the clone is readable over NBD.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/NewClone"}}}},
                "responses": {
                    "201": _clone_answer("The clone, served"),
                    "400": _error("Bad body: not JSON, a field missing or wrong, a "
                                  "relative or '..' clone path, a bad name"),
                    "409": _error("The name or the clone path is in use"),
                    "422": _error("The source cannot be opened or read"),
                    "507": _error("No space for the clone on its filesystem"),
                },
            },
            "get": {
                "summary": "List the clones",
                "responses": {"200": {"description": "Every clone", "content": {
                    "application/json": {"schema": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Clone"}}}}}},
            },
        },
        "/v1/clones/{name}": {
            "parameters": [NAME],
            "get": {
                "summary": "One clone",
                "responses": {"200": _clone_answer("The clone"),
                              "404": _error("No clone of that name")},
            },
            "delete": {
                "summary": "Stop serving a clone",
                "description": "Its map is committed and its files kept, unless "
                               "remove=true, which deletes the clone file and its map.",
                "parameters": [{"name": "remove", "in": "query", "required": False,
                                "schema": {"type": "boolean", "default": False}}],
                "responses": {"200": {"description": "The clone's last status",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/Removed"}}}},
                              "400": _error("remove is not true or false"),
                              "404": _error("No clone of that name"),
                              "409": _error("The clone is busy with another request")},
            },
        },
        "/v1/clones/{name}/pause": {
            "parameters": [NAME],
            "post": {
                "summary": "Pause the background copy (guests keep running)",
                "description": "Kept across restarts, as `liveclone pause` is.",
                "responses": {"200": _clone_answer("The clone"),
                              "404": _error("No clone of that name"),
                              "409": _error("The clone is busy with another request")},
            },
        },
        "/v1/clones/{name}/resume": {
            "parameters": [NAME],
            "post": {
                "summary": "Resume the background copy",
                "responses": {"200": _clone_answer("The clone"),
                              "404": _error("No clone of that name"),
                              "409": _error("The clone is busy with another request")},
            },
        },
        "/v1/events": {
            "get": {
                "summary": "Server-sent events: created, completed, failed, removed",
                "description": "Each event's data is {\"event\", \"name\", \"status\"}.",
                "responses": {"200": {"description": "An event stream",
                                      "content": {"text/event-stream": {}}}},
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {}}}},
            },
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {}}}},
            },
        },
    },
    "components": {
        "schemas": {
            "NewClone": {
                "type": "object",
                "required": ["source", "clone"],
                "additionalProperties": False,
                "properties": {
                    "source": {"type": "string", "description":
                               "An absolute image path, or an http(s)://, s3:// or nbd:// URL"},
                    "clone": {"type": "string", "description":
                              "Absolute path of the clone file (no '..')"},
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                             "description": "Default: the clone file's name"},
                    "region_size": {"type": ["string", "integer"], "examples": ["64K"]},
                    "rate": {"type": ["string", "integer"], "examples": ["100M"],
                             "description": "This clone's copy, bytes per second"},
                    "copy_on_read": {"type": "boolean"},
                    "read_only": {"type": "boolean", "default": False},
                    "profile": {"type": "string", "description":
                                "Absolute path of a boot profile (.lcprofile) to replay "
                                "first, as `serve --profile`; recorded for this source"},
                },
            },
            "Clone": {
                "type": "object",
                "required": ["name", "source", "clone", "nbd_uri", "file", "status"],
                "properties": {
                    "name": {"type": "string"},
                    "source": {"type": "string"},
                    "clone": {"type": "string"},
                    "nbd_uri": {"type": ["string", "null"]},
                    "file": {"type": ["string", "null"],
                             "description": "The clone's file in the FUSE directory"},
                    "status": {"$ref": "#/components/schemas/Status"},
                },
            },
            "Removed": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "removed": {"type": "boolean"},
                               "files_deleted": {"type": "boolean"},
                               "status": {"$ref": "#/components/schemas/Status"}},
            },
            "Status": {
                "type": "object",
                "description": "The object `liveclone status --json` prints",
                "properties": {
                    "phase": {"enum": ["copying", "paused", "complete", "failed"]},
                    "running": {"type": "boolean"},
                    "regions_total": {"type": "integer"},
                    "regions_present": {"type": "integer"},
                    "regions_partial": {"type": "integer"},
                    "bytes_total": {"type": "integer"},
                    "bytes_copied": {"type": "integer"},
                    "rate": {"type": "number"},
                    "eta": {"type": ["number", "null"]},
                    "last_error": {"type": ["string", "null"]},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error", "fix"],
                "properties": {"error": {"type": "string"}, "fix": {"type": "string"}},
            },
        },
    },
}
