"""Tool definitions and scripted tool calls that several test modules use."""

from __future__ import annotations


def weather_tool(city_max_length: int = 16) -> dict:
    """get_weather in the Chat Completions (and Ollama) shape: a city and a day count."""
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": city_max_length},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
            },
        },
    }


WEATHER = weather_tool()
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["tz"],
        },
    },
}


def responses_tool(tool: dict) -> dict:
    """A Chat Completions tool in the Responses API's flat shape."""
    return {"type": "function", **tool["function"]}


def parameters_by_name(tools: list[dict]) -> dict:
    """Each tool's parameters schema by its name, to validate the arguments of a call."""
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


# For the fake engine (tests/support/fakes.py): a Qwen-style call of get_time(tz="UTC"), and a
# script of FakeTurn arguments: an attempt truncated by the cap, then a valid one.
CALL = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
SCRIPT = [(["<tool_call>\n", '{"name": "get_'], "length"), ([CALL[:30], CALL[30:]], "stop")]
