"""Sizes and times the way Ollama's CLI prints them."""

from __future__ import annotations

from datetime import UTC, datetime


def size(n: int) -> str:
    """Decimal units: 1.2 GB, 45 MB, 812 KB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def ago(when: datetime, now: datetime | None = None) -> str:
    """'Less than a second ago', '5 minutes ago', '3 days ago'."""
    now = now or datetime.now(UTC)
    seconds = max(0.0, (now - when).total_seconds())
    if seconds < 1:
        return "Less than a second ago"
    for unit, length in (("year", 31536000), ("month", 2592000), ("week", 604800),
                         ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):  # fmt: skip
        if seconds >= length:
            count = int(seconds // length)
            if count == 1:
                return f"{'An' if unit == 'hour' else 'A'} {unit} ago"
            return f"{count} {unit}s ago"
    return "Less than a second ago"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = [
        "    ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]
    ]
    return "\n".join(lines)
