"""The web console at /ui and the interactive API reference at /docs (docs/console.md).

Static pages and ES modules shipped in the package (api/console_assets/, the vendored
libraries with their licences under vendor/): no build step, nothing fetched from elsewhere.
The pages call the same API as any client, so the Host and Origin guards, API keys and
admission apply to them unchanged; only the pages and their assets answer without a key
(Protocol.open_paths), since a browser loads them with no headers of its own. Every answer
here carries a strict Content-Security-Policy: scripts and styles from this origin only.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from ortserve.api.protocol import GUARDED, Protocol, Route, path_parameter, text

ASSETS = Path(__file__).with_name("console_assets")

# No inline script or style, nothing from another host, no framing, no form posts: the pages
# are their own files. img-src data: is for the SVG icons Swagger UI's stylesheet embeds.
CSP = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "font-src 'self'", "connect-src 'self'", "manifest-src 'self'", "base-uri 'none'",
    "form-action 'none'", "frame-ancestors 'none'",
))  # fmt: skip
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

console_bp = Blueprint("console", __name__)


@console_bp.get("/ui")
def console_page():
    """The console: chat, library, running models, metrics."""
    return _send("index.html")


@console_bp.get("/docs")
def docs_page():
    """The API reference: Swagger UI over /openapi.json."""
    return _send("docs.html")


@console_bp.get("/ui/<path:filename>")
def console_asset(filename: str):
    """A file of the console (send_from_directory refuses paths outside ASSETS: 404)."""
    return _send(filename)


def _send(filename: str) -> Response:
    # no-cache: revalidated each load, so an upgraded package never runs a stale module
    return send_from_directory(ASSETS, filename, max_age=0)


@console_bp.after_request
def _harden(response: Response) -> Response:
    """The security headers on every answer of this blueprint, its 404s included."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


_ASSET = path_parameter("filename", "a file of the console, e.g. app.js")

PROTOCOL = Protocol(
    "console", console_bp, rank=90, open_paths=("/ui", "/docs"),
    routes=(
        Route("GET", "/ui", "The web console (HTML)", None, text("text/html", "The page")),
        Route("GET", "/ui/{filename}", "A file of the web console", None,
              text("application/octet-stream", "The file"), (*GUARDED, 404), (_ASSET,)),
        Route("GET", "/docs", "This document, rendered by Swagger UI (HTML)", None,
              text("text/html", "The page")),
    ),
)  # fmt: skip
