"""Log lines of `ortserve serve`: text for people, or one JSON object per line for collectors.

Model loads and unloads come from "ortserve.engine", requests from "ortserve.access";
ORTSERVE_LOG_FORMAT=json turns each record into {"time", "level", "logger", "message", ...}.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_HANDLER_MARK = "_ortserve_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; an access record carries its fields under "http"."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if hasattr(record, "http"):
            entry["http"] = record.http
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send ortserve's records to stderr in `log_format` ("text" or "json"); idempotent."""
    logger = logging.getLogger("ortserve")
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per record, not a second copy through the root
