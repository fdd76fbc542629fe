"""Held-out evaluation of a served demo model, over HTTP as any client would ask.

The questions come from conversations.py's held-out split: arithmetic pairs, weather cities,
wordings and JSON key sets that training never saw. Each family is scored on what a user
would check: the exact number or name, the tool and its arguments (tool_choice "auto": the
grammar allows text or a call, the model chooses), JSON that validates against the schema and
carries the asked-for values, and a tool's result quoted in the answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.demo_model import conversations as cv
from converters.demo_model.conversations import HELDOUT, Sample


def _single(part: Sample, tools: cv.Offer | None = None) -> Sample:
    return cv.join([part], tools, think=False)


def _tool_question(rng: random.Random, answered: bool) -> Sample:
    """A question for one of the three tools, offered among others (never forced)."""
    kind = rng.choice(cv.KINDS)
    tools = cv.offer(rng, HELDOUT, need=kind)
    sample = _single(cv.tool_exchange(rng, HELDOUT, kind, tools.by_kind[kind], answered), tools)
    if answered and rng.random() < 0.3:
        sample.tools = None  # a client that does not send its tools with the results
    return sample


def _needs_no_tool(rng: random.Random) -> Sample:
    """Tools on offer, none of them of use: text is the answer."""
    # (not small talk: its few phrases are all trained, and a held-out question must be new)
    question = rng.choice((cv.capital, cv.colour, cv.arithmetic, None))
    if question is None:
        return _single(cv.weather_without_tool(rng, HELDOUT),
                       cv.offer(rng, HELDOUT, avoid=("weather",)))  # fmt: skip
    part = question(rng, HELDOUT)
    avoid = ("calculator",) if part.family == "arithmetic" else ()
    tools = cv.offer(rng, HELDOUT, need=None, avoid=avoid)
    return _single(part, tools)


# family -> a generator of its held-out questions
FAMILIES: dict[str, Callable[[random.Random], Sample]] = {
    "arithmetic": lambda rng: cv.arithmetic(rng, HELDOUT),
    "arithmetic_direct": lambda rng: cv.arithmetic(rng, HELDOUT),
    "facts": lambda rng: rng.choice((cv.capital, cv.colour, cv.unit))(rng, HELDOUT),
    "thinking": lambda rng: rng.choice((cv.arithmetic, cv.capital, cv.colour))(rng, HELDOUT),
    "tools": lambda rng: _tool_question(rng, answered=False),
    "tool_result": lambda rng: _tool_question(rng, answered=True),
    "json": lambda rng: cv.json_answer(rng, HELDOUT),
    "no_tool": _needs_no_tool,
}
GOAL = 0.9  # the accuracy each family should reach (docs/demo.md)
# What the shipped checkpoint (converters/data/demo-chat) scores, right answers out of 30 per
# family (docs/demo.md); tests/integration/test_demo_model.py holds it to these.
SHIPPED = {"arithmetic": 23 / 30, "arithmetic_direct": 0 / 30, "facts": 24 / 30,
           "thinking": 23 / 30, "tools": 18 / 30, "tool_result": 24 / 30, "json": 26 / 30,
           "no_tool": 22 / 30}  # fmt: skip
# Reported, not held to GOAL: two-digit sums with thinking off, in one step (docs/demo.md).
INFORMATIONAL = ("arithmetic_direct",)


@dataclass
class Result:
    family: str
    question: str
    ok: bool
    got: Any


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        """family -> the share of its questions answered right."""
        families = dict.fromkeys(r.family for r in self.results)
        return {f: sum(r.ok for r in self.results if r.family == f)
                / sum(1 for r in self.results if r.family == f) for f in families}  # fmt: skip

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def table(self) -> str:
        lines = [f"{'family':<12} {'right':>7}  accuracy"]
        for family, share in self.accuracy().items():
            total = sum(1 for r in self.results if r.family == family)
            right = sum(r.ok for r in self.results if r.family == family)
            lines.append(f"{family:<12} {right:>3}/{total:<3}  {share:.0%}")
        return "\n".join(lines)


def heldout(seed: int = 2024, per_family: int = 30) -> list[tuple[str, Sample]]:
    """(family, conversation) pairs none of which training contains."""
    rng = random.Random(seed)
    return [(family, make(rng)) for family, make in FAMILIES.items() for _ in range(per_family)]


def evaluate(url: str, model: str = "demo-chat", seed: int = 2024,
             per_family: int = 30) -> Report:  # fmt: skip
    """Ask the server at `url` every held-out question; score the answers."""
    report = Report()
    for family, sample in heldout(seed, per_family):
        try:
            ok, got = SCORERS[family](url, model, sample)
        except urllib.error.HTTPError as error:
            if error.code != 422:  # 422: the output did not validate; anything else is a bug
                raise
            ok, got = False, json.loads(error.read() or b"{}")
        question = next(m["content"] for m in sample.messages if m["role"] == "user")
        report.results.append(Result(family, question, ok, got))
    return report


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _chat(url: str, model: str, sample: Sample, **extra: Any) -> dict:
    """Ollama's /api/chat, greedy."""
    body = {"model": model, "messages": sample.request, "stream": False,
            "options": {"temperature": 0, "num_predict": 128}, **extra}  # fmt: skip
    return post(f"{url}/api/chat", body)["message"]


def _openai(url: str, model: str, messages: list[dict], tools: list[dict] | None) -> dict:
    """OpenAI's /v1/chat/completions, greedy, tool_choice auto."""
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0,
                            "max_tokens": 128}  # fmt: skip
    if tools:
        body.update(tools=tools, tool_choice="auto")
    return post(f"{url}/v1/chat/completions", body)["choices"][0]["message"]


def says(content: str, expected: str) -> bool:
    """Whether the answer states `expected`: as the last number, or as a whole word."""
    if re.fullmatch(r"-?\d+", expected):
        numbers = re.findall(r"-?\d+", content.replace(",", ""))
        return bool(numbers) and numbers[-1] == expected
    return re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", content) is not None


def _plain(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    """think: false: the answer straight away."""
    message = _chat(url, model, sample, think=False)
    return says(message["content"], sample.expect["answer"]), message["content"]


def _default(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    """No think field: the template's default, which thinks (as Qwen3's), then answers."""
    message = _chat(url, model, sample)
    return says(message["content"], sample.expect["answer"]), message["content"]


def _thinking(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    """think: true: the reasoning arrives apart, and the content is the right answer alone."""
    message = _chat(url, model, sample, think=True)
    thought, content = message.get("thinking") or "", message["content"]
    ok = bool(thought.strip()) and "<think>" not in content and "</think>" not in content
    return ok and says(content, sample.expect["answer"]), {"thinking": thought, "content": content}


def _same(value: Any, expected: Any) -> bool:
    """JSON equality where 5 and 5.0 are the same number."""
    if isinstance(expected, dict):
        return isinstance(value, dict) and value.keys() == expected.keys() and all(
            _same(value[k], expected[k]) for k in expected)  # fmt: skip
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        return isinstance(value, int | float) and float(value) == float(expected)
    return value == expected


def _tools(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    message = _openai(url, model, sample.request, sample.tools)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in message.get("tool_calls") or []]  # fmt: skip
    expected = [(sample.expect["name"], a) for a in sample.expect["arguments"]]
    ok = len(calls) == len(expected) and all(
        name == want_name and _same(args, want) for (name, args), (want_name, want) in
        zip(calls, expected))  # fmt: skip
    return ok, calls or message.get("content")


def _openai_messages(messages: list[dict]) -> list[dict]:
    """Calls with their arguments as a JSON string, as OpenAI clients send them."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            calls = [{**c, "function": {**c["function"],
                                        "arguments": json.dumps(c["function"]["arguments"])}}
                     for c in calls]  # fmt: skip
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def _tool_result(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    message = _openai(url, model, _openai_messages(sample.request), sample.tools)
    content = message.get("content") or ""
    ok = not message.get("tool_calls") and all(says_anywhere(content, q)
                                               for q in sample.expect["quotes"])  # fmt: skip
    return ok, content or message.get("tool_calls")


def says_anywhere(content: str, expected: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(expected)}(?![\w]|\.\d)", content) is not None


def _json(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    from jsonschema import Draft202012Validator

    schema = sample.expect["schema"]
    message = _chat(url, model, sample, format=schema or "json")
    try:
        value = json.loads(message["content"])
    except json.JSONDecodeError:
        return False, message["content"]
    valid = schema is None or Draft202012Validator(schema).is_valid(value)
    return valid and _same(value, sample.expect["value"]), value


def _no_tool(url: str, model: str, sample: Sample) -> tuple[bool, Any]:
    """Tools offered, none of them fits: a text answer, and the right one."""
    message = _openai(url, model, sample.request, sample.tools)
    content = message.get("content") or ""
    expected = sample.expect["answer"]
    ok = not message.get("tool_calls") and says(content, expected)
    return ok, content or message.get("tool_calls")


SCORERS = {"arithmetic": _default, "arithmetic_direct": _plain, "facts": _plain, "thinking": _thinking, "tools": _tools,
           "tool_result": _tool_result, "json": _json, "no_tool": _no_tool}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(models: Path, timeout: float = 120) -> Iterator[str]:
    """`ortserve serve` on `models` in a subprocess (a real server, as clients meet it); its URL."""
    port = free_port()
    env = {**os.environ, "ORTSERVE_MODELS": str(models), "ORTSERVE_HOST": f"127.0.0.1:{port}"}
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url, timeout)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_ready(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ortserve serve exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("ortserve serve did not start in time")


def evaluate_checkpoint(checkpoint: Path, precision: str | None = None) -> Report:
    """Convert the checkpoint into a scratch library, serve it, and evaluate it."""
    from converters.convert import convert
    from converters.demo_model import NAME, PRECISION
    from ortserve.library import Library

    with tempfile.TemporaryDirectory() as scratch:
        library = Library(Path(scratch) / "models")
        convert(checkpoint, NAME, precision=precision or PRECISION, library=library,
                progress=False)  # fmt: skip
        with serving(library.root) as url:
            return evaluate(url)
