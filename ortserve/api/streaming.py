"""Writers: one JSON body, NDJSON streams (Ollama) and SSE streams (OpenAI, Anthropic)."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, stream_with_context

from ortserve.errors import OrtServeError

log = logging.getLogger("ortserve.api")

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def dumps(obj: Any) -> str:
    """Compact JSON in the order the fields were built (as Go writes them), UTF-8 kept."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> Response:
    """One application/json body."""
    return Response(dumps(obj) + "\n", status=status, mimetype="application/json")


def answer_response(obj: Any, exchange) -> Response:
    """A whole (stream: false) answer; with the attempts its structured output took, if any
    (X-Ortserve-Attempts, on every protocol)."""
    response = json_response(obj)
    if exchange.attempts is not None:
        response.headers["X-Ortserve-Attempts"] = str(exchange.attempts)
    return response


def ndjson_line(obj: Any) -> str:
    return dumps(obj) + "\n"


def sse_event(obj: Any, event: str | None = None) -> str:
    """One server-sent event; `event` names it (Anthropic's and the Responses API's)."""
    named = f"event: {event}\n" if event else ""
    return f"{named}data: {dumps(obj)}\n\n"


def sse_events(events: Iterable[Any]) -> Iterator[str]:
    """`data: {...}` per event, then `data: [DONE]`, as OpenAI streams end."""
    for event in events:
        yield sse_event(event)
    yield "data: [DONE]\n\n"


def stream_response(
    chunks: Iterable[str], mimetype: str = NDJSON, on_close: Callable[[], None] | None = None
) -> Response:
    """A streamed response, sent chunk by chunk; `on_close` runs however the stream ends.

    The WSGI server closes the response when the client goes away or the stream ends, and a
    generator that never started would skip its own `finally`: `on_close` always runs.
    """
    response = Response(stream_with_context(chunks), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each chunk on as it comes
    if on_close is not None:
        response.call_on_close(on_close)
    return response


def rfc3339(ns: int | None = None) -> str:
    """Nanoseconds since the epoch (default now) as Go's RFC3339Nano in UTC."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")  # Go trims trailing zeros, and the dot with them
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def exchange_stream(exchange, render: Callable[[Iterator], Iterable[str]],
                    on_error: Callable[[OrtServeError], str], mimetype: str) -> Response:  # fmt: skip
    """Stream an exchange's events through a protocol's `render` (events -> encoded strings).

    The first event is read before the response starts, so an error before any output keeps
    its HTTP status; after that, an error is the stream's last item (`on_error`), and the
    exchange is closed however the stream ends (the client leaving included).
    """
    events = exchange.events()
    try:
        first = next(events)
    except BaseException:
        exchange.close()
        raise

    def body() -> Iterator[str]:
        try:
            yield from render(itertools.chain([first], events))
        except OrtServeError as exc:  # the status is sent already: the error is an event
            yield on_error(exc)
        except Exception:
            log.exception("unexpected error while streaming")
            yield on_error(OrtServeError("internal error"))
        finally:
            exchange.close()  # also runs on GeneratorExit: the client went away

    return stream_response(body(), mimetype, on_close=exchange.close)
