"""Who may call, and how many at once: API keys, the Host guard, Origin checks, CORS, admission.

One `before_request` hook runs the checks in order on ortserve's routes: a preflight for an
allowed origin is answered at once; a disallowed Origin is 403; while bound to loopback, a
Host that is not a local name or address is 403 (as Ollama's allowedHostsMiddleware);
with keys configured, a request without a valid key is 401 (health checks stay open); a
generation request beyond Settings.generation_slots is 503 with Retry-After. An
`after_request` hook adds the CORS headers for allowed origins.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import socket
import threading
from collections.abc import Callable

from flask import Flask, Response, g, request

from ortserve.api.protocol import cors_headers, generates, is_open, key_headers, owner
from ortserve.api.state import current_state
from ortserve.config import Settings
from ortserve.errors import OrtServeError, ServerBusy

# Ollama's built-in origins: a page served by this machine, and desktop/editor app schemes.
DEFAULT_ORIGINS = tuple(
    f"{scheme}://{host}{port}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
    for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
# Paths that answer without a key: load balancers and orchestrators probe them.
OPEN_PATHS = ("/", "/healthz", "/readyz")
# Requests that generate or embed hold a thread for as long as their turn runs: each protocol
# names its own (Protocol.generation_paths), and admission counts them.
# Names no public DNS answers for (Ollama's list): a DNS-rebinding page cannot use them.
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193 (Python's is_private is wider).
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
# Request headers every client may send; each protocol adds its own (Protocol.cors_headers).
_CORS_HEADERS = ("Authorization", "Content-Type", "X-Api-Key", "X-Request-Id")


class Unauthorized(OrtServeError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


class Forbidden(OrtServeError):
    status = 403
    type = "permission_error"


# The WSGI environ key a batch job's in-process line call carries: the name of the key that
# made the batch. HTTP can set no such key (headers arrive as HTTP_*), so it cannot be forged.
BATCH_OWNER = "ortserve.batch_owner"


def install(app: Flask, is_ours: Callable[[], bool]) -> None:
    """Guard ortserve's routes on `app` (a host app's own routes are left alone); once per app."""
    if app.extensions.get("ortserve.security"):
        return  # init_app called again: the hooks read the current settings already
    app.extensions["ortserve.security"] = True

    admission = Admission()

    @app.before_request
    def _guard():
        if not is_ours():
            return None
        if BATCH_OWNER in request.environ:  # a batch job's line, called in-process
            g.ortserve_key_name = request.environ[BATCH_OWNER] or None
            return None  # checked when the batch was made; runs on the batch's own threads
        answer = check_request(current_state().settings)
        if answer is None:
            admission.admit()
        return answer

    @app.after_request
    def _release_when_sent(response: Response) -> Response:
        # A stream holds its slot until it is sent: released when the server closes it. A
        # whole body is done now (a WSGI caller that never closes it must not leak a slot).
        release = g.pop("ortserve_admitted", None)
        if release is not None and response.is_streamed:
            response.call_on_close(release)
        elif release is not None:
            release()
        return response

    @app.teardown_request
    def _release_if_unsent(exc: BaseException | None) -> None:
        release = g.pop("ortserve_admitted", None)  # no response was made (an error above us)
        if release is not None:
            release()

    @app.after_request
    def _cors(response: Response) -> Response:
        if response.status_code == 401 and is_ours():
            response.headers["WWW-Authenticate"] = 'Bearer realm="ortserve"'
        origin = request.headers.get("Origin")
        if origin and is_ours() and origin_allowed(origin, current_state().settings.origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, X-Ortserve-Attempts"
        return response


def check_request(settings: Settings) -> Response | None:
    """None to go on; a preflight's answer; or raise Forbidden / Unauthorized."""
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, settings.origins):
        raise Forbidden(f"origin {origin!r} is not allowed (add it to ORTSERVE_ORIGINS)")
    if not host_allowed(request.host, settings):
        raise Forbidden(
            "this server is bound to a loopback address and does not answer for host "
            f"{request.host!r} (add it to ORTSERVE_ALLOWED_HOSTS)"
        )
    if request.method == "OPTIONS" and origin is not None:
        return _preflight()
    g.ortserve_key_name = authenticate(settings)
    return None


class Admission:
    """Counts generation requests in flight; one beyond Settings.generation_slots is 503.

    Without it, requests past the thread count wait unseen in the socket backlog; with it,
    the caller hears at once that the server is busy and when to try again, and the
    threads left over keep answering health checks and library calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0

    def admit(self) -> None:
        """Take a slot for a generation request (nothing for others); raise ServerBusy."""
        state = current_state()
        if request.method != "POST" or not generates(_route_path(state.url_prefix)):
            return
        limit = state.settings.generation_slots
        with self._lock:
            if self.in_flight >= limit:
                raise ServerBusy(
                    f"server busy: {limit} generation requests are in progress; try again "
                    "shortly (raise ORTSERVE_THREADS, or add replicas)"
                )
            self.in_flight += 1
        g.ortserve_admitted = _once(self._release)

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """`action`, run on the first call only (a response may be closed more than once)."""
    first = threading.Lock()

    def run() -> None:
        if first.acquire(blocking=False):  # never released: later calls do nothing
            action()

    return run


def _route_path(url_prefix: str) -> str:
    path = request.path
    return path[len(url_prefix) :] if url_prefix and path.startswith(url_prefix) else path


def _preflight() -> Response:
    response = Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, HEAD, OPTIONS"
    asked = request.headers.get("Access-Control-Request-Headers")
    response.headers["Access-Control-Allow-Headers"] = asked or ", ".join(
        (*_CORS_HEADERS, *cors_headers(), *key_headers())
    )
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def authenticate(settings: Settings) -> str | None:
    """The name of the key the request carries (None when no keys are configured)."""
    if not settings.api_keys or request.path in OPEN_PATHS or request.method == "OPTIONS":
        return None
    if is_open(_route_path(current_state().url_prefix)):  # a page (Protocol.open_paths)
        return None
    given = _given_key()
    if not given:
        raise Unauthorized(
            "an API key is required: send Authorization: Bearer <key> or x-api-key: <key>"
        )
    found = None
    for name, key in settings.api_keys:  # every key compared, in constant time each
        if hmac.compare_digest(given.encode(), key.encode()):
            found = name
    if found is None:
        raise Unauthorized("invalid API key")
    return found


def _given_key() -> str | None:
    """The key in x-api-key, a protocol's key header, Bearer, or the owning protocol's query
    parameter (Google's ?key=: only on its own paths, keys in URLs end up in logs)."""
    for header in ("X-Api-Key", *key_headers()):
        if request.headers.get(header):
            return request.headers[header]
    given = _bearer(request.headers.get("Authorization"))
    protocol = owner(_route_path(current_state().url_prefix))
    for param in protocol.key_params if protocol is not None and not given else ():
        given = request.args.get(param) or None
    return given


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def origin_allowed(origin: str, extra: tuple[str, ...]) -> bool:
    """Ollama's defaults and ORTSERVE_ORIGINS (patterns with `*`), case-insensitively."""
    origin = origin.strip().lower()
    return any(fnmatch.fnmatchcase(origin, p.lower()) for p in (*DEFAULT_ORIGINS, *extra))


def host_allowed(host: str, settings: Settings) -> bool:
    """Any Host when bound to a non-loopback address; else what Ollama's allowedHost takes.

    That is: loopback, private, unspecified and this machine's own addresses; `localhost`,
    this machine's hostname and names under .localhost, .local and .internal; and
    ORTSERVE_ALLOWED_HOSTS. A public name is refused: the DNS-rebinding case, a page whose
    own name was pointed at 127.0.0.1.
    """
    if not is_loopback(settings.host) or "*" in settings.allowed_hosts:
        return True
    name = _strip_port(host).lower()
    if name in (h.lower() for h in settings.allowed_hosts):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return local_name(name)
    return local_address(address)


def local_name(name: str) -> bool:
    """A name only this machine or its local network answers for (Ollama's list)."""
    if not name or name == "localhost" or name.endswith(LOCAL_SUFFIXES):
        return True
    return name == socket.gethostname().lower()


def local_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private (Go's sense), unspecified, or an address of this machine."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified:
        return True
    if any(address in network for network in PRIVATE_NETWORKS):
        return True
    return str(address) in _own_addresses()


def _own_addresses() -> set[str]:
    """The addresses of this machine's interfaces, read each time (they change)."""
    import psutil

    own = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                own.add(entry.address.split("%")[0].lower())  # fe80::1%eth0 -> fe80::1
    return own


def is_loopback(bind_host: str) -> bool:
    """Whether the server's bind address is loopback-only (localhost, 127.x, ::1)."""
    if bind_host == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:11434
        return host[1 : host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host
