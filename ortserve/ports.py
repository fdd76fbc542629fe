"""Who listens on a port: nobody, an ortserve, Ollama, or another server (doctor and serve)."""

from __future__ import annotations

import json
import socket
import urllib.request


def who_listens(host: str, port: int) -> str | None:
    """None when nothing listens; else who does (ortserve, Ollama, or what the server says)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            pass
    except OSError:
        return None
    url = f"http://{host}:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read(200).decode("utf-8", "replace")
            server = response.headers.get("Server", "")
    except Exception as exc:  # not HTTP, or an HTTP error: say what answered
        return f"a program that does not answer HTTP as ortserve does ({type(exc).__name__})"
    if body.startswith("ortserve is running"):
        return f"ortserve {_remote_version(url)}".strip()
    if body.startswith("Ollama is running"):
        return "Ollama"
    return f"another server ({server or body[:40].strip() or 'unknown'})"


def _remote_version(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "api/version", timeout=2) as response:
            return json.loads(response.read()).get("version", "")
    except Exception:
        return ""
