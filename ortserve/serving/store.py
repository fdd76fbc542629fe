"""The Responses API's stored responses, and its shapes that are not HTTP: input items as the
core's template-ready messages, its tools in chat's shape, and the output items and response
object built from the core's Choice.

ResponseStore keeps stored responses in memory: the most recent MAX_STORED, least recently
used dropped first, lost when the server stops (response_files.py keeps them under the
library instead, for processes that share it: ORTSERVE_RESPONSES_STORE=library). A stored response keeps its response object (for
GET) and its conversation (for previous_response_id): every message before it, its own
input, then its output, without its instructions (OpenAI does not carry them over).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ortserve.errors import InvalidRequest, OrtServeError
from ortserve.serving.images import ImageReader

# Responses kept for GET and previous_response_id: enough for many conversations, bounded so
# that a long-running server's memory stays flat.
MAX_STORED = 1000
# Content parts read as text: what clients send, and what our own output items hold.
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio", "image_url")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponseNotFound(OrtServeError):
    """An id this server does not hold: never stored, deleted, dropped, or from before a restart."""

    status = 404
    type = "invalid_request_error"


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as it was sent
    conversation: list[dict[str, Any]]  # template-ready messages, its output last


class ResponseStore:
    """The most recent responses by id; thread-safe (gunicorn's threads share it)."""

    def __init__(self, capacity: int = MAX_STORED):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, stored: StoredResponse) -> None:
        with self._lock:
            self._items[stored.response["id"]] = stored
            self._items.move_to_end(stored.response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response (now the most recently used); 404 naming `param` otherwise."""
        with self._lock:
            stored = self._items.get(response_id)
            if stored is not None:
                self._items.move_to_end(response_id)
                return stored
        what = "Previous response" if param == "previous_response_id" else "Response"
        raise ResponseNotFound(f"{what} with id '{response_id}' not found.", param=param)

    def delete(self, response_id: str) -> None:
        with self._lock:
            if self._items.pop(response_id, None) is not None:
                return
        raise ResponseNotFound(f"Response with id '{response_id}' not found.")


def new_id(prefix: str) -> str:
    """An unguessable id ("resp_...", "msg_..."): ids are the only key to a stored response."""
    return f"{prefix}_{secrets.token_hex(24)}"


# ---- input items -> template-ready messages ------------------------------------------------


def item_messages(items: str | list[dict[str, Any]], where: str = "input",
                  before: Iterable[dict[str, Any]] = (),
                  reader: ImageReader | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Responses input (a string, or items) as the messages templates take.

    Function calls join the assistant turn before them (or one of their own); a reasoning
    item's text becomes the thinking of the assistant turn after it; a tool result takes
    its function's name from the call it answers, here or in `before`. A message's
    input_image parts are read by `reader` (none: refused) into its `images`.
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    names = {c["id"]: c["function"]["name"] for m in before for c in m.get("tool_calls", ())}
    messages: list[dict[str, Any]] = []
    thinking = ""  # a reasoning item's text, for the next assistant turn
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        kind = item.get("type", "message")
        if kind == "reasoning":
            thinking += _reasoning_text(item, at)
            continue
        if kind == "function_call_output":
            messages.append(_tool_result(item, at, names))
            continue
        if kind == "message":
            message = _message(item, at, reader)
            messages.append(message)
        else:  # function_call
            message = _calling_turn(messages)
            call = _call(item, at)
            names[call["id"]] = call["function"]["name"]
            message.setdefault("tool_calls", []).append(call)
        if thinking and message["role"] == "assistant":
            message["thinking"], thinking = thinking, ""
    return messages


def _message(item: dict[str, Any], at: str, reader: ImageReader | None) -> dict[str, Any]:
    role, content, where = _ROLES[item["role"]], item["content"], f"{at}.content"
    if reader is None or isinstance(content, str):
        return {"role": role, "content": parts_text(content, where)}
    texts, images = [], []
    for j, part in enumerate(content):
        if part.get("type") == "input_image":
            images.append(_input_image(part, f"{where}[{j}]", reader))
        else:
            texts.append(parts_text([part], where, first=j))
    message = {"role": role, "content": "\n".join(texts)}
    return {**message, "images": images} if images else message


def _input_image(part: dict[str, Any], param: str, reader: ImageReader) -> bytes:
    """An input_image part's picture: its image_url (a data URL; http(s) where fetching is
    on). A file_id names an uploaded file, which this server does not keep for images."""
    if part.get("file_id") and not part.get("image_url"):
        raise InvalidRequest(f"{param}.file_id: images by file_id are not supported; send "
                             "image_url as a data URL (data:image/png;base64,...)",
                             param=f"{param}.file_id")  # fmt: skip
    return reader.url(part.get("image_url"), f"{param}.image_url")


def _calling_turn(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant turn a function call belongs to: the last one, or a new one."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[-1]
    messages.append({"role": "assistant", "content": ""})
    return messages[-1]


def _call(item: dict[str, Any], at: str) -> dict[str, Any]:
    """A function_call item as a template's tool call: arguments as an object."""
    try:
        arguments = json.loads(item["arguments"]) if item["arguments"].strip() else {}
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{at}.arguments must be a JSON object", param=f"{at}.arguments")
    function = {"name": item["name"], "arguments": arguments}
    return {"id": item["call_id"], "type": "function", "function": function}


def _tool_result(item: dict[str, Any], at: str, names: dict[str, str]) -> dict[str, Any]:
    """A function_call_output as a tool message; its call must be in the conversation."""
    call_id = item["call_id"]
    if call_id not in names:  # OpenAI refuses it too: the model could not tell what it answers
        raise InvalidRequest(f"No tool call found for function call output with call_id "
                             f"{call_id}.", param=f"{at}.call_id")  # fmt: skip
    content = parts_text(item["output"], f"{at}.output")
    return {"role": "tool", "content": content, "tool_call_id": call_id, "name": names[call_id]}


def _reasoning_text(item: dict[str, Any], at: str) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary."""
    parts = item.get("content") or item.get("summary") or []
    return parts_text(parts, f"{at}.content")


def parts_text(content: str | list[dict[str, Any]], where: str, first: int = 0) -> str:
    """Content as one string: text parts joined (images are read by item_messages' reader;
    files and audio by nothing here). `first`: the index of content[0] in the request."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content, start=first):
        kind, param = part.get("type"), f"{where}[{j}]"
        if kind in _TEXT_PARTS:
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(part["refusal"])
        elif kind in _MEDIA_PARTS:
            raise InvalidRequest(f"{param}: {kind} is not supported here: images only in "
                                 "a message's content, and no files or audio", param=param)  # fmt: skip
        else:
            raise InvalidRequest(f"{param}: unsupported content part {kind!r}", param=param)
    return "\n".join(texts)


def chat_tools(tools: list[dict] | None) -> list[dict]:
    """Function tools in chat's shape, as the core takes them; other tool types are refused."""
    converted = []
    for i, tool in enumerate(tools or []):
        if tool["type"] != "function":
            raise InvalidRequest(f"tools[{i}].type: {tool['type']!r} tools are not supported, "
                                 "only function tools", param=f"tools[{i}].type")  # fmt: skip
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(value: str | dict | None) -> str | dict | None:
    """Responses' {type: function, name} as chat's {type: function, function: {name}}."""
    if value is None or isinstance(value, str):
        return value
    if value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise InvalidRequest('tool_choice must be "auto", "none", "required" or '
                         '{"type": "function", "name": ...}', param="tool_choice")  # fmt: skip


# ---- the core's output -> output items -----------------------------------------------------


def output_items(choice: Any) -> list[dict[str, Any]]:
    """A finished Choice as output items: reasoning, the message, then each function call.

    The message is left out when the answer is only calls (what OpenAI sends), kept (empty
    if need be) otherwise, so that every answer has its text where clients look for it.
    """
    items = []
    if choice.thoughts:
        items.append(reasoning_item(new_id("rs"), choice.thoughts))
    if choice.content.strip() or not choice.calls:
        status = "incomplete" if incomplete(choice) else "completed"
        items.append(message_item(new_id("msg"), choice.content, status))
    items.extend(call_item(new_id("fc"), call) for call in choice.calls)
    return items


def incomplete(choice: Any) -> bool:
    """Cut by the token cap; calls that parsed and validated whole still count as complete."""
    return choice.finished.reason == "length" and not choice.calls


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """An assistant message; text None: the item as it opens, before its content part."""
    content = [] if text is None else [text_part("message", text)]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content}  # fmt: skip


def text_part(kind: str, text: str) -> dict[str, Any]:
    """The text of a "message" item (output_text) or a "reasoning" item (reasoning_text)."""
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "reasoning_text", "text": text}


def reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [text_part("reasoning", text)]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content}


def call_item(item_id: str, call: Any, status: str = "completed") -> dict[str, Any]:
    """A function_call item; its call_id is the core's call id, arguments a JSON string."""
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id,
            "name": call.name, "arguments": arguments}  # fmt: skip


def response_object(response_id: str, created_at: int, body: dict[str, Any],
                    output: list[dict], status: str, usage: dict | None) -> dict[str, Any]:  # fmt: skip
    """The response object: its output and status, and the request fields it echoes."""
    reason = {"reason": "max_output_tokens"} if status == "incomplete" else None
    effort = (body.get("reasoning") or {}).get("effort")
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {"id": response_id, "object": "response", "created_at": created_at,
            "status": status, "background": False, "error": None,
            "incomplete_details": reason, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": body["model"],
            "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": effort, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature"),
            "text": {"format": fmt}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []), "top_p": body.get("top_p"),
            "truncation": body.get("truncation", "disabled"), "usage": usage,
            "user": body.get("user"), "metadata": body.get("metadata", {})}  # fmt: skip


def usage_object(used: Any) -> dict[str, Any]:
    """The core's Usage in the Responses shape (thinking is not counted apart)."""
    cache = {"cached_tokens": getattr(used, "cached_tokens", 0), "cache_write_tokens": 0}
    return {"input_tokens": used.prompt_tokens, "input_tokens_details": cache,
            "output_tokens": used.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": used.total_tokens}  # fmt: skip
