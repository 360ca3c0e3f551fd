"""A small client of the daemon's API, for the CLI: ``http.client`` over a unix
socket and ``json``, nothing else, so ``liveclone ls`` starts in milliseconds (no
aiohttp, no asyncio)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote

from liveclone.daemon import paths
from liveclone.errors import LivecloneError

# The API's statuses as the CLI's exit codes (liveclone.errors' numbering).
EXIT_CODES = {400: 2, 404: 5, 409: 7, 422: 3, 507: 8}


class DaemonError(LivecloneError):
    """The daemon refused a request, or no daemon answers."""

    def __init__(self, message: str, exit_code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Requests to the daemon whose API socket is ``api`` (default: ``paths``)."""

    def __init__(self, api: str | None = None, timeout: float = 120.0) -> None:
        self.api = api or paths.api_socket()
        self.timeout = timeout

    def reachable(self) -> bool:
        try:
            self.request("GET", "/openapi.json")
        except DaemonError:
            return False
        return True

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = _UnixConnection(self.api, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            data = json.dumps(body).encode() if body is not None else None
            try:
                conn.request(method, path, data, headers)
                response = conn.getresponse()
                text = response.read()
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise DaemonError(
                    f"no liveclone daemon answers on {self.api} ({e.strerror}): start one "
                    "(liveclone daemon, or systemctl start liveclone), or give --api") from None
            except OSError as e:
                raise DaemonError(f"talking to the daemon on {self.api}: {e.strerror or e}"
                                  ) from None
        finally:
            conn.close()
        try:
            return response.status, json.loads(text) if text else None
        except ValueError:
            return response.status, {"error": text.decode(errors="replace"), "fix": ""}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The answer's JSON; a DaemonError (error, fix, exit code) for a 4xx/5xx."""
        status, data = self.request(method, path, body)
        if status >= 400:
            error = data.get("error") if isinstance(data, dict) else str(data)
            fix = data.get("fix") if isinstance(data, dict) else ""
            raise DaemonError(f"{error}" + (f"; {fix}" if fix else ""),
                              EXIT_CODES.get(status, 1), status)
        return data

    # -- the routes ------------------------------------------------------------------

    def add(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "/v1/clones", body)
        return result

    def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "/v1/clones")
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/v1/clones/{quote(name, safe='')}")
        return result

    def pause(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", f"/v1/clones/{quote(name, safe='')}/pause")
        return result

    def resume(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST",
                                           f"/v1/clones/{quote(name, safe='')}/resume")
        return result

    def remove(self, name: str, delete_files: bool = False) -> dict[str, Any]:
        query = "?remove=true" if delete_files else ""
        result: dict[str, Any] = self.call("DELETE",
                                           f"/v1/clones/{quote(name, safe='')}{query}")
        return result
