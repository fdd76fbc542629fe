"""ortserve on Ray Serve: replicas of the same Flask app, model-aware routing, autoscaling.

Two deployments (docs/cluster.md draws them):

- `Router` is the HTTP ingress. It reads a request's body once (bounded as the app bounds
  it), takes the model's name from it (routing.py) and hands the request to a `Replica`
  through a DeploymentHandle with that name as the multiplexed model id. Ray Serve's own
  request router then picks a replica that holds the model, one with the fewest models when
  none does, and another only when those are full (max_ongoing_requests). It streams the
  replica's answer back as it comes.
- `Replica` runs `create_app(Settings.from_env())`, the app `ortserve serve` runs: keys,
  guards, limits, metrics and every protocol's error shapes are that app's. Its loaded models
  are what Ray's multiplexing records for routing, with ORTSERVE_MAX_LOADED_MODELS as the
  LRU bound on both. It starts (Ray counts it ready) once ORTSERVE_PRELOAD's models are in.

Autoscaling is Ray Serve's, on ongoing requests per replica: the turns a replica runs plus
those queued for it (in the replica and in Ray's router).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from ortserve.cluster.errors import error_response, stream_error
from ortserve.cluster.gather import GATHERED, Answer
from ortserve.cluster.routing import Prompt, Route, model_key, model_name, route
from ortserve.config import Settings
from ortserve.errors import OrtServeError, ServerBusy

log = logging.getLogger("ortserve.cluster")

APP_NAME = "ortserve"
# Every response says which replica answered it (for operators and the tests' load counts).
REPLICA_HEADER = b"x-ortserve-replica"
# The settings replicas read: the driver's are given to them, wherever Ray places them.
_ENV_PREFIXES = ("ORTSERVE_", "OLLAMA_")
# Hop-by-hop headers are the proxy's own, never forwarded.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
_LOST = "the replica serving this request stopped; try again"
# How long the Router waits for every replica's part of /api/ps or /metrics (a replica at
# max_ongoing_requests takes the request when one of its own ends).
GATHER_TIMEOUT_S = 10.0
# Ray Serve's own switches for a request path with fewer hops (its "throughput optimized"
# mode, without the direct ingress that would bypass our router): user code and the router
# on the replica's event loop instead of a loop thread each, request logs buffered. A
# stream's every token crosses Ray twice, and each hop cost CPU the forward pass needed:
# single-stream decode went from 0.90-0.94x `ortserve serve` to 1.0x (docs/cluster.md).
# Read when Ray's processes start: given to our actors here, and to the nodes Ray starts
# for `serve --ray` (nodes started otherwise take them from their own environment).
SERVE_TUNING = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


class Replica:
    """One ortserve app; requests come from the Router as ASGI scopes with their bodies."""

    async def __init__(self):
        from ortserve.api import create_app

        settings = Settings.from_env()
        settings.models.mkdir(parents=True, exist_ok=True)  # an empty library is a ready one
        self.flask = create_app(settings)
        self.state = self.flask.extensions["ortserve"]
        self.name = serve.get_replica_context().replica_id.unique_id.encode()

        async def hold(model: str) -> Held:  # a function: Ray keeps its LRU on the function
            return await self._hold(model)

        self.hold = serve.multiplexed(max_num_models_per_replica=settings.max_loaded_models)(hold)
        self.pinned: set[str] = set()
        await self._preloaded()

    async def _preloaded(self) -> None:
        """Ray sends a replica traffic once its constructor returns: wait for ORTSERVE_PRELOAD,
        then tell Ray's router the models are here (every replica preloads them: requests
        for them spread over all, and conversations stay where their prefix is)."""
        preload = self.state.preload
        if preload is None:
            return
        await asyncio.to_thread(preload.join)
        report = preload.report()
        log.info("replica %s: preload %s %s", self.name.decode(), report.status, report.models)
        for name, state in report.models.items():
            if state == "loaded":
                self.pinned.add(model_key(name))
                await self.hold(model_key(name))

    async def _hold(self, model: str) -> Held:
        """Ray's multiplexing loads `model` here: the library must have it (else the app
        answers the 404); the app loads it on first use, as `ortserve serve` does, so that
        answer carries the load's duration."""
        name = model_name(model)
        await asyncio.to_thread(self.state.library.get, name)  # ModelNotFound: not recorded
        return Held(self, name, pinned=model in self.pinned)

    def evict(self, name: str) -> None:
        """Ray's LRU dropped `name`: unload it now unless a turn is using it."""
        runtime = self.state.started_runtime
        with contextlib.suppress(OrtServeError):
            loaded = runtime.loaded(name) if runtime is not None else None
            if loaded is not None and not loaded.active:
                runtime.unload(name)

    async def handle(
        self, scope: dict[str, Any], body: bytes, prompt: Prompt
    ) -> AsyncIterator[dict]:
        """Run the request through the app; yield its ASGI messages as they are written.
        (`prompt` is for Ray's prefix-aware router, which reads it from the call.)"""
        model = serve.get_multiplexed_model_id()
        if model:
            with contextlib.suppress(OrtServeError):  # unknown model: the app answers 404
                await self.hold(model)
        messages: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        worker = threading.Thread(target=self._run, args=(scope, body, messages, loop, stop),
                                  daemon=True)  # fmt: skip
        worker.start()
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    message["headers"].append((REPLICA_HEADER, self.name))
                elif messages.qsize():
                    message = coalesce(message, messages)
                yield message
                if message.get("more_body") is False:
                    break
        finally:
            stop.set()  # the client went away (or we are done): the app's stream is closed

    def _run(self, scope, body, messages: asyncio.Queue, loop, stop: threading.Event) -> None:
        """The WSGI app in a thread of its own; `stop` ends it between two chunks."""
        from a2wsgi.wsgi import build_environ

        def put(message: dict | None) -> None:
            loop.call_soon_threadsafe(messages.put_nowait, message)

        def start_response(status: str, headers, exc_info=None):
            head = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            put({"type": "http.response.start", "status": int(status[:3]), "headers": head})
            return lambda chunk: put({"type": "http.response.body", "body": chunk,
                                      "more_body": True})  # fmt: skip

        iterable = self.flask(build_environ(scope, io.BytesIO(body)), start_response)
        try:
            for chunk in iterable:
                if stop.is_set():
                    break
                if chunk:
                    put({"type": "http.response.body", "body": chunk, "more_body": True})
            put({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            getattr(iterable, "close", lambda: None)()  # cancels the turn if it still runs
            put(None)

    async def ping(self) -> bytes:
        """Which replica this is (tests and operators)."""
        return self.name

    async def answer(self, scope: dict[str, Any], body: bytes) -> Answer:
        """The app's whole answer to one request: what the Router gathers from every replica
        for /api/ps and /metrics (DeploymentHandle.broadcast calls this)."""
        status, headers, chunks = 500, [], []
        async for message in self.handle(scope, body, None):
            if message["type"] == "http.response.start":
                status, headers = message["status"], message["headers"]
            else:
                chunks.append(message.get("body", b""))
        return Answer(self.name.decode(), status, headers, b"".join(chunks))

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.shutdown(0)


def coalesce(message: dict, messages: asyncio.Queue) -> dict:
    """`message` and the body chunks queued behind it, as one: each message crosses Ray's
    object store twice (replica -> router -> proxy), which costs more than a tiny model's
    token; a stream whose client keeps up still goes out token by token."""
    body = [message["body"]]
    while messages.qsize():
        following = messages.get_nowait()
        if following is None:
            messages.put_nowait(None)  # the end, for the caller's loop
            break
        body.append(following["body"])
        if following.get("more_body") is False:
            return {**following, "body": b"".join(body)}
    return {**message, "body": b"".join(body)}


class Held:
    """A model Ray's multiplexing counts as loaded on a replica; dropped from its LRU, the
    model is unloaded (Ray calls __del__, and so may the garbage collector: once is enough),
    unless ORTSERVE_PRELOAD keeps it."""

    def __init__(self, replica: Replica, name: str, *, pinned: bool = False):
        self.replica, self.name, self.done = replica, name, pinned

    def __del__(self):
        if not self.done:
            self.done = True
            self.replica.evict(self.name)


class Router:
    """The HTTP ingress: body in, model id out, the replica's stream back."""

    def __init__(self, replica: DeploymentHandle):
        from ortserve.api.validation import MAX_BODY_BYTES

        self.replica = replica
        self.max_body = MAX_BODY_BYTES

    async def __call__(self, request):
        from starlette.responses import StreamingResponse

        path = request.url.path
        body, scope = await self._read(request)
        if request.method == "GET" and path in GATHERED:
            return await self._gather(scope, body, path)
        try:
            stream, start = await self._start(scope, body, route(request.method, path, body))
        except OrtServeError as exc:
            return error_response(path, exc)
        response = StreamingResponse(self._body(stream, path, start), status_code=start["status"])
        response.raw_headers = [(k, v) for k, v in start["headers"] if k not in _HOP_BY_HOP]
        return response

    async def _read(self, request) -> tuple[bytes, dict[str, Any]]:
        """The body, bounded: past the app's limit only enough is read for its 413."""
        headers = list(request.scope["headers"])
        declared = request.headers.get("content-length", "")
        body = bytearray()
        if not (declared.isdigit() and int(declared) > self.max_body):
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    break
            headers = [(k, v) for k, v in headers if k not in (b"content-length",
                                                                b"transfer-encoding")]  # fmt: skip
            headers.append((b"content-length", str(len(body)).encode()))
        scope = {key: request.scope.get(key) for key in _SCOPE_KEYS}
        scope["headers"] = headers
        return bytes(body), scope

    async def _start(self, scope: dict, body: bytes, where: Route):
        """Send the request to a replica and wait for its answer's start. A replica that
        died before answering is tried once more: Ray then routes around it."""
        options: dict[str, Any] = {"stream": True}
        if where.model:
            options["multiplexed_model_id"] = where.model
        for attempt in range(2):
            stream = self.replica.options(**options).handle.remote(scope, body, where.prompt)
            try:
                return stream, await stream.__anext__()
            except StopAsyncIteration:
                break
            except Exception:  # Ray's errors for a replica that is gone, or none ready
                log.warning("no answer from a replica (attempt %d)", attempt + 1, exc_info=True)
        raise ServerBusy("no replica could take the request; try again")

    async def _gather(self, scope: dict, body: bytes, path: str):
        """/api/ps and /metrics for the whole cluster: every running replica's app answers
        the request (its keys and guards too) and the answers are merged (cluster/gather.py).
        An answer that is not a 200 (a missing key) is sent as it is; a replica that died
        meanwhile is left out."""
        from starlette.responses import Response

        try:
            results = await self.replica.broadcast("answer", scope, body).results_async(
                timeout_s=GATHER_TIMEOUT_S, return_exceptions=True)  # fmt: skip
        except Exception:  # no replica running, or one did not answer in time
            log.warning("no answer from every replica for %s", path, exc_info=True)
            results = []
        answers = sorted((r for r in results if isinstance(r, Answer)), key=lambda a: a.replica)
        if not answers:
            return error_response(path, ServerBusy("no replica could take the request; "
                                                   "try again"))  # fmt: skip
        refused = next((a for a in answers if a.status != 200), None)
        merged = refused.body if refused else GATHERED[path](answers)
        first = refused or answers[0]
        skip = {*_HOP_BY_HOP, b"content-length", REPLICA_HEADER}
        headers = [(k, v) for k, v in first.headers if k not in skip]
        names = [first.replica] if refused else [a.replica for a in answers]
        headers.append((REPLICA_HEADER, ",".join(names).encode()))
        response = Response(merged, status_code=first.status)
        response.raw_headers = [*headers, (b"content-length", str(len(merged)).encode())]
        return response

    async def _body(self, stream, path: str, start: dict) -> AsyncIterator[bytes]:
        """The replica's body as it comes; a replica lost mid-stream ends it with the
        protocol's error event (the status was sent already)."""
        content_type = dict(start["headers"]).get(b"content-type", b"").decode("latin-1")
        finished = False
        try:
            async for message in stream:
                if message.get("body"):
                    yield message["body"]
            finished = True
        except Exception:
            finished = True
            log.warning("a replica stopped mid-stream (%s)", path, exc_info=True)
            yield stream_error(path, content_type, ServerBusy(_LOST)).encode()
        finally:
            if not finished:  # the client went away: the replica stops the turn
                stream.cancel()


_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path",
               "query_string", "client", "server")  # fmt: skip


# ---- building and running the application ------------------------------------------------------


def replica_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ORTSERVE_* (and OLLAMA_*) variables replicas get: the driver's, wherever they run."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith(_ENV_PREFIXES)}


def build(args: Mapping[str, Any] | None = None):
    """The Ray Serve application (`serve run ortserve.cluster:build ORTSERVE_X=...`).

    `args`: ORTSERVE_* values on top of the environment's, and `autoscaling`, a dict merged
    into the autoscaling config (e.g. shorter delays in tests)."""
    args = dict(args or {})
    extra = args.pop("autoscaling", None) or {}
    env = {**replica_env(), **{k: str(v) for k, v in args.items() if k.startswith(_ENV_PREFIXES)}}
    # stored Responses answers in the shared library: a next turn may reach another replica
    env.setdefault("ORTSERVE_RESPONSES_STORE", "library")
    settings = Settings.from_env(env)
    tuning = serve_tuning()
    replica = serve.deployment(
        Replica,
        name="Replica",
        ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": {**tuning, **env}}},
        # each replica uses every core of its node for its forward passes (ORTSERVE_COMPUTE_
        # THREADS): two on one node would only contend; more replicas need more nodes
        max_replicas_per_node=1,
        # a replica this busy is saturated: the next request waits in Ray's router, or goes
        # to another replica (which loads the model) when it holds none
        max_ongoing_requests=2 * settings.num_parallel,
        autoscaling_config=autoscaling_config(settings, extra),
        request_router_config=request_router_config(settings),
        graceful_shutdown_timeout_s=settings.grace_period,
    )
    router = serve.deployment(Router, name="Router", max_ongoing_requests=settings.threads * 4,
                              ray_actor_options={"num_cpus": 0,
                                                 "runtime_env": {"env_vars": tuning}})  # fmt: skip
    return router.bind(replica.bind())


def serve_tuning(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """SERVE_TUNING, each switch as the environment sets it if it does (an operator's word)."""
    env = os.environ if env is None else env
    return {name: env.get(name, value) for name, value in SERVE_TUNING.items()}


# Ray Serve LLM's prefix-aware router, kept to the model's replicas (prefix.py says why).
PREFIX_ROUTER = "ortserve.cluster.prefix:ModelPrefixRouter"


def request_router_config(settings: Settings) -> RequestRouterConfig:
    """Model first (multiplexing), then the replica holding the conversation's prefix, unless
    its queue is ORTSERVE_NUM_PARALLEL longer than another's (then the shorter queue)."""
    return RequestRouterConfig(
        request_router_class=PREFIX_ROUTER,
        request_router_kwargs={
            "imbalanced_threshold": settings.num_parallel,
            "do_eviction": True,
        },  # fmt: skip
    )


def autoscaling_config(settings: Settings, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Between ORTSERVE_MIN_REPLICAS and ORTSERVE_MAX_REPLICAS, aiming at ORTSERVE_NUM_PARALLEL
    ongoing requests a replica: its turns generating at once, no more waiting."""
    return {
        "min_replicas": settings.min_replicas,
        "initial_replicas": settings.min_replicas,
        "max_replicas": max(settings.min_replicas, settings.max_replicas),
        "target_ongoing_requests": settings.num_parallel,
        **extra,
    }


def run(address: str | None, settings: Settings) -> None:
    """`ortserve serve --ray [ADDRESS]`: connect to (or start) Ray, serve until Ctrl-C."""
    import time

    import ray
    from ray.serve.config import HTTPOptions

    from ortserve.api.security import is_loopback

    if address is None:  # Ray starts here: its processes (the proxy's too) inherit these
        os.environ.update(serve_tuning())
    ray.init(address=address, namespace="ortserve", log_to_driver=False)
    # A loopback listener is reachable only on its own node: one proxy, on the head. A wider
    # one gets a proxy on every node, for a load balancer to spread clients over.
    location = "HeadOnly" if is_loopback(settings.host) else "EveryNode"
    serve.start(proxy_location=location,
                http_options=HTTPOptions(host=settings.host, port=settings.port))  # fmt: skip
    serve.run(build(), name=APP_NAME, route_prefix="/")
    print(f"ortserve listening on http://{settings.address} through Ray Serve "
          f"(models: {settings.models})", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, _interrupt)  # stop as Ctrl-C does: the app is deleted
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)  # replicas get ORTSERVE_GRACE_PERIOD for their turns


def _interrupt(signum, frame):
    raise KeyboardInterrupt
