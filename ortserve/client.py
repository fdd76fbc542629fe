"""How the CLI talks to a server: over HTTP when one runs, else to an in-process app.

Both backends speak the same native API, so `ortserve run` behaves the same with or without
a server; the in-process one drives the real Flask app through its test client (no port).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from ortserve.config import Settings
from ortserve.errors import OrtServeError


class ServerError(OrtServeError):
    """An error the server answered with."""


def auth_headers() -> dict[str, str]:
    """The key the CLI sends to a server that wants one (ORTSERVE_API_KEY)."""
    key = os.environ.get("ORTSERVE_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


class HTTPBackend:
    """A running ortserve (or Ollama) server."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def is_running(self, timeout: float = 0.5) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/", timeout=timeout) as response:
                return response.status == 200
        except (OSError, ValueError):
            return False

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **auth_headers()},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request) as response:
                for line in response:
                    if line.strip():
                        yield _checked(json.loads(line))
        except urllib.error.HTTPError as exc:
            raise self._refused(exc, path) from None
        except urllib.error.URLError as exc:
            raise ServerError(f"cannot reach the server at {self.base_url}: {exc.reason}") from None

    def unload(self, name: str) -> None:
        """Unload `name` now (keep_alive 0), as `ortserve stop` and `rm` ask."""
        for _ in self.stream("/api/generate", {"model": name, "keep_alive": 0}):
            pass

    def get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url + path, headers=auth_headers())
        try:
            with urllib.request.urlopen(request) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise self._refused(exc, path) from None

    def _refused(self, exc: urllib.error.HTTPError, path: str) -> ServerError:
        """The server's own error message; a bare 404 means something else listens there."""
        raw = exc.read()
        if exc.code == 404 and _error_field(raw) is None:
            return ServerError(
                f"the server at {self.base_url} is not an ortserve or Ollama server "
                f"(or it lacks {path}): it answered 404"
            )
        return ServerError(_error_message(raw, exc.code))


class InProcessBackend:
    """The real app, in this process: models load here and are freed on exit."""

    def __init__(self, settings: Settings):
        from dataclasses import replace

        from ortserve.api import create_app

        # nothing outside this process can reach this app: it needs no key
        self.app = create_app(replace(settings, api_keys=()))
        self.client = self.app.test_client()

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        response = self.client.post(path, json=body, buffered=False, headers=auth_headers())
        try:
            if response.status_code >= 400:
                raise ServerError(_error_message(response.get_data(), response.status_code))
            for line in response.response:
                for part in (line.decode() if isinstance(line, bytes) else line).splitlines():
                    if part.strip():
                        yield _checked(json.loads(part))
        finally:
            response.close()

    def get(self, path: str) -> dict[str, Any]:
        response = self.client.get(path, headers=auth_headers())
        if response.status_code >= 400:
            raise ServerError(_error_message(response.get_data(), response.status_code))
        return response.get_json()

    def close(self) -> None:
        runtime = self.app.extensions.get("ortserve")
        if runtime is not None and hasattr(runtime, "shutdown"):
            runtime.shutdown(0)


def connect(settings: Settings, *, in_process: bool = True):
    """The running server at ORTSERVE_HOST if there is one, else the app in this process."""
    host = settings.reachable_host
    http = HTTPBackend(f"http://{host}:{settings.port}")
    if http.is_running() or not in_process:
        return http
    return InProcessBackend(settings)


def _checked(obj: dict[str, Any]) -> dict[str, Any]:
    if "error" in obj:
        raise ServerError(str(obj["error"]))
    return obj


def _error_message(raw: bytes, status: int) -> str:
    return _error_field(raw) or f"server answered {status}"


def _error_field(raw: bytes) -> str | None:
    """The message of an ortserve/Ollama/OpenAI error body, None for any other body."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else None
