"""Synthetic conversations: what the demo model is trained on and evaluated with.

Each generator draws one exchange from a seeded `random.Random`: a question and what the
assistant writes (a reply, a tool call, the answer after the tool's result), as a Sample.
Training joins a few exchanges into one conversation under one set of offered tools, so a
long tool section in the prompt serves several answers; the loss sees only what the assistant
writes. `split="train"` draws training data; `split="heldout"` draws what training never
contains: arithmetic pairs, calculator and conversion values, and weather cities picked out by
a stable hash, wordings kept apart, JSON key sets never used in training.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from converters.demo_model import facts

TRAIN, HELDOUT = "train", "heldout"


@dataclass
class Sample:
    """A conversation with its assistant turns, and what the model writes in each of them.

    The request a client would send is everything before the last assistant message, with
    `tools` and `think` (enable_thinking: False puts an empty thinking section in the prompt).
    """

    family: str
    messages: list[dict]  # user, assistant and tool messages, as clients send them
    answers: list[str]  # per assistant message: the text the model writes (calls as markup)
    tools: list[dict] | None = None
    think: bool = False
    reasoning: str | None = None  # the last answer's thought, written when think is True
    expect: dict[str, Any] = field(default_factory=dict)  # what the evaluation checks

    @property
    def request(self) -> list[dict]:
        """The messages a client sends to get the last answer."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def answer(self) -> str:
        """The last answer as the model writes it: after its thinking when it thinks."""
        if self.think and self.reasoning:
            return f"<think>\n{self.reasoning}\n</think>\n\n{self.answers[-1]}"
        return self.answers[-1]


def _reply(family: str, question: str, reply: str, reasoning: str | None = None,
           **expect: Any) -> Sample:  # fmt: skip
    """A question answered in text."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return Sample(family, messages, [reply], reasoning=reasoning, expect=expect)


def _held(key: str, every: int) -> bool:
    """Whether `key` is held out of training: a stable 1-in-`every` pick (crc32, not hash())."""
    return zlib.crc32(key.encode()) % every == 0


def _pick(rng: random.Random, wordings: tuple[tuple[str, ...], tuple[str, ...]], split: str) -> str:
    train, heldout = wordings
    return rng.choice(train if split == TRAIN else heldout)


# What people put around a question; the held-out ones never occur in training.
# Many of them, so that the model keys on what is asked and not on the words around it.
PREFIXES = (("Hi! ", "Hey, ", "Please tell me: ", "Quick question: ", "I have a question. ",
             "Hello. ", "OK, ", "Hi, ", "Hey! ", "Good morning! ", "So, ", "Well, ", "Question: ",
             "One more thing: ", "Sorry, ", "Hi there. ", "Okay. ", "Yo, ", "Hello! ",
             "I wonder: ", "Help me out: "),
            ("Hello there! ", "Excuse me, "))  # fmt: skip
SUFFIXES = ((" Thanks!", " Thank you.", " Please.", " Thanks", " Thank you!", " Please!",
             " Thanks in advance.", " ty", " :)", " Much appreciated."),
            (" Thanks a lot!", " Cheers."))  # fmt: skip


def _ask(rng: random.Random, wordings: tuple[tuple[str, ...], tuple[str, ...]], split: str,
         **slots: Any) -> str:  # fmt: skip
    """A question in one of the split's wordings, sometimes with a greeting or thanks around."""
    text = _pick(rng, wordings, split).format(**slots)
    if rng.random() < 0.35:
        text = _pick(rng, PREFIXES, split) + text[0].lower() + text[1:]
    if rng.random() < 0.3:
        text += _pick(rng, SUFFIXES, split)
    if split == TRAIN and rng.random() < 0.15:
        text = text.lower().rstrip("?.!")  # as people type
    return text


def _compact(value: Any) -> str:
    """JSON as the server's grammar writes it: no whitespace (whitespace_flexible false)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _casual(rng: random.Random, text: str) -> str:
    """Sometimes lower case without the final mark, as people type."""
    if rng.random() < 0.15:
        text = text.lower().rstrip("?.!")
    return text


# --- arithmetic ------------------------------------------------------------------------------

ADD_WORDINGS = (
    ("What is {a} + {b}?", "What is {a} plus {b}?", "What's {a} + {b}?", "{a} + {b} = ?",
     "{a} + {b}", "Add {a} and {b}.", "How much is {a} plus {b}?", "Calculate {a} + {b}.",
     "What is the sum of {a} and {b}?", "what is {a}+{b}", "{a} plus {b}?",
     "Work out {a} + {b}.", "Could you add {a} and {b}?", "Tell me {a} + {b}.",
     "Find {a} plus {b}.", "Sum {a} and {b}.", "Give me {a} + {b}.", "Can you do {a} + {b}?",
     "Help me with {a} + {b}.", "Add up {a} and {b}, please.", "I want to know {a} plus {b}.",
     "Compute the sum of {a} and {b}.", "{a} + {b}?", "Solve {a} + {b}."),
    ("Please work out {a} + {b}.", "Can you add {a} and {b} for me?", "Compute {a} plus {b}.",
     "I need {a} + {b}."),
)  # fmt: skip
SUB_WORDINGS = (
    ("What is {a} - {b}?", "What is {a} minus {b}?", "What's {a} - {b}?", "{a} - {b} = ?",
     "{a} - {b}", "Subtract {b} from {a}.", "How much is {a} minus {b}?", "Calculate {a} - {b}.",
     "what is {a}-{b}", "Take {b} away from {a}.", "{a} minus {b}?",
     "Work out {a} - {b}.", "Could you subtract {b} from {a}?", "Tell me {a} - {b}.",
     "Find {a} minus {b}.", "Give me {a} - {b}.", "Can you do {a} - {b}?",
     "Help me with {a} - {b}.", "I want to know {a} minus {b}.", "{a} - {b}?",
     "Solve {a} - {b}.", "What is the difference between {a} and {b}?"),
    ("Please work out {a} - {b}.", "Can you subtract {b} from {a} for me?",
     "Compute {a} minus {b}.", "I need {a} - {b}."),
)  # fmt: skip


def arithmetic_problem(rng: random.Random, split: str) -> tuple[int, str, int, int]:
    """(a, op, b, result): sums and differences of numbers under 100; one pair in ten held out."""
    while True:
        op = rng.choice("+-")
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
        if _held(f"{a}{op}{b}", 10) == (split == HELDOUT):
            return a, op, b, a + b if op == "+" else a - b


def _digit_steps(a: int, op: str, b: int) -> str:
    """Column arithmetic, units first, as a child writes it down: each step a one-digit fact."""
    units_a, units_b, tens_a, tens_b = a % 10, b % 10, a // 10, b // 10
    if op == "+":
        units = units_a + units_b
        carry = units // 10
        steps = f"Units: {units_a} + {units_b} = {units}" + (", carry 1." if carry else ".")
        if a >= 10 or b >= 10:
            steps += f" Tens: {tens_a} + {tens_b}" + (" + 1" if carry else "")
            steps += f" = {tens_a + tens_b + carry}."
        return steps
    borrow = units_a < units_b
    steps = f"Units: {units_a + 10 * borrow} - {units_b} = {units_a + 10 * borrow - units_b}"
    steps += ", borrow 1." if borrow else "."
    if a >= 10:
        steps += f" Tens: {tens_a} - {tens_b}" + (" - 1" if borrow else "")
        steps += f" = {tens_a - tens_b - borrow}."
    return steps


def arithmetic(rng: random.Random, split: str) -> Sample:
    a, op, b, result = arithmetic_problem(rng, split)
    wordings = ADD_WORDINGS if op == "+" else SUB_WORDINGS
    question = _ask(rng, wordings, split, a=a, b=b)
    reasoning = f"{_digit_steps(a, op, b)} So {a} {op} {b} = {result}."
    return _reply("arithmetic", question, f"{a} {op} {b} = {result}.", reasoning,
                  answer=str(result))  # fmt: skip


# --- facts -----------------------------------------------------------------------------------

CAPITAL_WORDINGS = (
    ("What is the capital of {c}?", "What's the capital of {c}?", "Tell me the capital of {c}.",
     "Which city is the capital of {c}?", "capital of {c}?", "Do you know the capital of {c}?",
     "Name the capital of {c}.", "What is the capital city of {c}?"),
    ("What city is the capital of {c}?", "Could you tell me the capital of {c}?",
     "I'd like to know the capital of {c}.", "And the capital of {c}?"),
)  # fmt: skip
COUNTRY_WORDINGS = (
    ("{k} is the capital of which country?", "Which country has {k} as its capital?",
     "Of which country is {k} the capital?", "{k} is the capital of what country?"),
    ("Which country's capital is {k}?", "Tell me which country has the capital {k}."),
)  # fmt: skip
COLOUR_WORDINGS = (
    ("What colour is {t}?", "What color is {t}?", "What is the colour of {t}?",
     "What's the color of {t}?", "Which colour is {t}?", "Tell me the colour of {t}."),
    ("Do you know what colour {t} is?", "Can you tell me the color of {t}?",
     "Name the colour of {t}."),
)  # fmt: skip
UNIT_WORDINGS = (
    ("How many {s} are in {b}?", "How many {s} are there in {b}?", "How many {s} in {b}?",
     "How many {s} make {b}?", "How many {s} does {b} have?"),
    ("Tell me how many {s} there are in {b}.", "What is the number of {s} in {b}?",
     "Do you know how many {s} are in {b}?"),
)  # fmt: skip


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def capital(rng: random.Random, split: str) -> Sample:
    country, city = rng.choice(facts.CAPITALS)
    if rng.random() < 0.7:
        question = _ask(rng, CAPITAL_WORDINGS, split, c=country)
        answer, expected = f"The capital of {country} is {city}.", city
        reasoning = f"The user asks for the capital of {country}. It is {city}."
    else:
        question = _ask(rng, COUNTRY_WORDINGS, split, k=city)
        answer, expected = f"{city} is the capital of {country}.", country.removeprefix("the ")
        reasoning = f"The user asks which country has {city} as its capital. It is {country}."
    return _fact(rng, _sentence(question), answer, reasoning, expected)


def colour(rng: random.Random, split: str) -> Sample:
    thing, name = rng.choice(facts.COLOURS)
    question = _ask(rng, COLOUR_WORDINGS, split, t=thing)
    reasoning = f"The user asks for the colour of {thing}. It is {name}."
    return _fact(rng, question, f"{_sentence(thing)} is {name}.", reasoning, name)


def unit(rng: random.Random, split: str) -> Sample:
    small, big, count = rng.choice(facts.UNITS)
    question = _ask(rng, UNIT_WORDINGS, split, s=small, b=big)
    reasoning = f"The user asks how many {small} are in {big}. There are {count}."
    return _fact(rng, question, f"There are {count} {small} in {big}.", reasoning, str(count))


def _fact(rng: random.Random, question: str, answer: str, reasoning: str, expected: str) -> Sample:
    return _reply("facts", _casual(rng, question), answer, reasoning, answer=expected)


# --- small talk and what the model does not know ---------------------------------------------


def small_talk(rng: random.Random, split: str) -> Sample:
    intent = rng.choice(sorted(facts.SMALL_TALK))
    said, reply, reasoning = facts.SMALL_TALK[intent]
    return _reply("small_talk", _casual(rng, rng.choice(said)), reply, reasoning, answer=reply)


def unknown(rng: random.Random, split: str) -> Sample:
    question = rng.choice(facts.UNKNOWN_QUESTIONS).format(
        year=rng.randint(1950, 2022), country=rng.choice(facts.CAPITALS)[0],
        thing=rng.choice(("the sea", "cats", "autumn", "love", "trains")),
        n=rng.randint(2, 999), m=rng.randint(2, 99), city=rng.choice(facts.OTHER_CITIES),
    )  # fmt: skip
    reasoning = "I do not know the answer to this. I say so and tell the user what I can do."
    return _reply("unknown", _sentence(question), facts.UNKNOWN_REPLY, reasoning)


ECHO_WORDINGS = (
    (
        "Repeat after me: {x}",
        "Say {x}.",
        "Please repeat: {x}",
        "Echo {x}",
        "Can you say {x}?",
        "Write {x}.",
    ),
    ("Repeat this: {x}",),
)


def _echoed(rng: random.Random) -> str:
    """Digits, names or both: copying them exactly is what tool arguments and answers need."""
    number = lambda: str(rng.randint(0, 10 ** rng.randint(1, 6)))  # noqa: E731
    city = lambda: rng.choice(facts.CAPITALS)[rng.randint(0, 1)].removeprefix("the ")  # noqa: E731
    shapes = (number, city, lambda: f"{number()} {rng.choice('+-*/')} {number()}",
              lambda: f"{city()} and {number()}", lambda: f"{number()} {city()}")  # fmt: skip
    return rng.choice(shapes)()


def echo(rng: random.Random, split: str) -> Sample:
    """The user asks the model to repeat something: it copies it exactly."""
    text = _echoed(rng)
    return _reply("echo", _pick(rng, ECHO_WORDINGS, split).format(x=text), text,
                  f"The user wants me to repeat {text}.", answer=text)  # fmt: skip


# --- JSON ------------------------------------------------------------------------------------

# Per kind of question: each key a JSON answer may use, with its type and how to fill it.
JSON_FIELDS: dict[str, dict[str, tuple[str, Callable[[dict], Any]]]] = {
    "capital": {
        "country": ("string", lambda f: f["country"]), "capital": ("string", lambda f: f["city"]),
        "city": ("string", lambda f: f["city"]), "answer": ("string", lambda f: f["city"]),
        "capital_city": ("string", lambda f: f["city"]),
    },
    "colour": {
        "thing": ("string", lambda f: f["thing"]), "object": ("string", lambda f: f["thing"]),
        "colour": ("string", lambda f: f["colour"]), "color": ("string", lambda f: f["colour"]),
        "answer": ("string", lambda f: f["colour"]),
    },
    "unit": {
        "unit": ("string", lambda f: f["unit"]), "count": ("integer", lambda f: f["count"]),
        "answer": ("integer", lambda f: f["count"]), "value": ("integer", lambda f: f["count"]),
    },
}  # fmt: skip
DEFAULT_KEYS = {"capital": ("country", "capital"), "colour": ("thing", "colour"),
                "unit": ("unit", "count")}  # fmt: skip
# Key lists training never uses: the evaluation's schemas are new to the model.
HELDOUT_KEYS = {
    "capital": (("city", "country"), ("capital_city",), ("answer", "country")),
    "colour": (("color", "object"), ("answer", "thing")),
    "unit": (("count", "unit"), ("value",)),
}  # fmt: skip
JSON_ASKS = (
    ("Answer in JSON.", "Reply with JSON.", "Respond in JSON format.", "Give the answer as JSON.",
     "Use JSON.", "JSON please."),
    ("Return JSON.", "Please answer with a JSON object."),
)  # fmt: skip


def _json_question(rng: random.Random, kind: str, split: str) -> tuple[str, dict]:
    """A question of `kind` and the values its JSON answer draws on."""
    if kind == "capital":
        country, city = rng.choice(facts.CAPITALS)
        question = _ask(rng, CAPITAL_WORDINGS, split, c=country)
        return _sentence(question), {"country": country.removeprefix("the "), "city": city}
    if kind == "colour":
        thing, name = rng.choice(facts.COLOURS)
        bare = thing.split(" ", 1)[1] if thing.startswith(("a ", "an ", "the ")) else thing
        return _ask(rng, COLOUR_WORDINGS, split, t=thing), {"thing": bare, "colour": name}
    small, big, count = rng.choice(facts.UNITS)
    return _ask(rng, UNIT_WORDINGS, split, s=small, b=big), {"unit": small, "count": count}


def _json_keys(rng: random.Random, kind: str, split: str) -> tuple[str, ...]:
    if split == HELDOUT:
        return rng.choice(HELDOUT_KEYS[kind])
    names = sorted(JSON_FIELDS[kind])
    while True:
        keys = tuple(rng.sample(names, rng.randint(1, 3)))
        if keys not in HELDOUT_KEYS[kind]:
            return keys


def json_schema(kind: str, keys: tuple[str, ...]) -> dict:
    """The JSON Schema a client would send for an answer with these keys."""
    fields = JSON_FIELDS[kind]
    properties = {key: {"type": fields[key][0]} for key in keys}
    return {"type": "object", "properties": properties, "required": list(keys)}


def json_answer(rng: random.Random, split: str) -> Sample:
    """A question answered with a JSON object: its keys asked by a schema, or the usual ones."""
    kind = rng.choice(sorted(JSON_FIELDS))
    question, values = _json_question(rng, kind, split)
    by_schema = split == HELDOUT or rng.random() < 0.7
    keys = _json_keys(rng, kind, split) if by_schema else DEFAULT_KEYS[kind]
    value = {key: JSON_FIELDS[kind][key][1](values) for key in keys}
    schema = json_schema(kind, keys)
    ask = _pick(rng, JSON_ASKS, split)
    if by_schema and rng.random() < 0.15:  # some clients put the schema in the prompt as well
        ask = f"Answer in JSON with this schema: {json.dumps(schema)}"
    elif by_schema and rng.random() < 0.5:
        ask = ""  # the schema only reaches the server, as Ollama's `format`
    content = f"{question} {ask}".strip()
    # A schema is enforced by the server's grammar, which never leaves room to think.
    reasoning = None if by_schema else "The user wants JSON. I put the values in an object."
    return _reply("json", content, _compact(value), reasoning,
                  schema=schema if by_schema else None, value=value)  # fmt: skip


# --- tools -----------------------------------------------------------------------------------

WEATHER_WORDINGS = (
    ("What's the weather in {x}?", "What is the weather like in {x}?", "How is the weather in {x}?",
     "Weather in {x}?", "Is it raining in {x}?", "What's the temperature in {x}?",
     "Tell me the weather in {x}.", "Check the weather in {x}, please.",
     "How's the weather in {x} today?", "Is it sunny in {x}?", "Weather for {x}, please.",
     "Could you look up the weather in {x}?", "Do I need an umbrella in {x}?",
     "How hot is it in {x}?", "What's it like outside in {x}?", "Get me the weather in {x}.",
     "Is it cold in {x}?", "Tell me about the weather in {x} now.", "{x} weather?"),
    ("What are the weather conditions in {x}?", "Can you check the weather for {x}?",
     "I'm going to {x}. What's the weather there?", "Is it warm in {x} right now?"),
)  # fmt: skip
CALC_WORDINGS = {
    "*": (("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
           "Calculate {a} * {b}.", "{a} * {b} = ?", "What's {a} x {b}?", "Work out {a} * {b}.",
          "Could you multiply {a} and {b}?", "Give me {a} times {b}.", "{a} times {b}?"),
          ("Please work out {a} times {b}.", "Can you multiply {a} by {b} for me?")),
    "/": (("What is {a} / {b}?", "What is {a} divided by {b}?", "Divide {a} by {b}.",
           "Calculate {a} / {b}.", "Work out {a} / {b}.", "Could you divide {a} by {b}?",
          "{a} divided by {b}?"),
          ("Please work out {a} divided by {b}.", "Can you divide {a} by {b} for me?")),
    "+": ADD_WORDINGS,
    "-": SUB_WORDINGS,
}  # fmt: skip
CONVERT_WORDINGS = (
    ("Convert {v} {u} to {w}.", "How many {w} is {v} {u}?", "What is {v} {u} in {w}?",
     "{v} {u} in {w}?", "Change {v} {u} into {w}.", "How much is {v} {u} in {w}?",
     "Could you convert {v} {u} to {w}?", "Turn {v} {u} into {w}.", "{v} {u} to {w}, please.",
     "What's {v} {u} in {w}?", "I need {v} {u} in {w}.", "Give me {v} {u} in {w}."),
    ("Can you convert {v} {u} into {w} for me?", "I have {v} {u}. How much is that in {w}?",
     "Please express {v} {u} in {w}."),
)  # fmt: skip
NO_WEATHER_REPLY = "I can't check the weather: I have no weather tool right now."
KINDS = ("calculator", "convert", "weather")


@dataclass
class Offer:
    """The tools a request offers, and which of them (if any) serves each kind of question."""

    tools: list[dict]
    by_kind: dict[str, dict]


def offer(rng: random.Random, split: str, need: str | None = None,
          avoid: tuple[str, ...] = ()) -> Offer:  # fmt: skip
    """One to four tools, shuffled: `need`'s tool, maybe others, never those in `avoid`.

    Training sometimes offers a tool under another name (get_current_weather(location), ...):
    the model picks by meaning, and the grammar holds it to the names actually offered.
    """
    kinds = [k for k in KINDS if k != need and k not in avoid]
    chosen = rng.sample(kinds, rng.randint(0, len(kinds)))
    if need is not None:
        chosen.append(need)
    by_kind = {}
    for kind in chosen:
        variants = facts.TOOL_VARIANTS[kind]
        use_variant = split == TRAIN and rng.random() < 0.25
        by_kind[kind] = rng.choice(variants) if use_variant else facts.TOOLS[kind]
    extra = rng.sample(facts.DISTRACTORS, rng.randint(0 if by_kind else 1, 1))
    tools = [*by_kind.values(), *extra]
    rng.shuffle(tools)
    if len(tools) > 3:  # a long tool section costs every answer after it: keep it short
        tools = [t for t in tools if t not in extra]
    return Offer(tools, by_kind)


@dataclass
class _Call:
    """A question a tool answers: the arguments of each call and what each result says."""

    kind: str
    question: str
    arguments: list[dict]  # one per call (two cities: two calls)
    found: list[dict]


def _weather_call(rng: random.Random, split: str) -> _Call:
    cities = [k for _, k in facts.CAPITALS] + list(facts.OTHER_CITIES)
    pool = [c for c in cities if _held(c, 5) == (split == HELDOUT)]
    city = rng.choice(pool)
    if split == TRAIN and rng.random() < 0.1:  # two cities: two calls in one answer
        other = rng.choice([c for c in pool if c != city])
        question, chosen = f"What's the weather in {city} and {other}?", [city, other]
    else:
        question, chosen = _ask(rng, WEATHER_WORDINGS, split, x=city), [city]
    found = [{"city": c, "temperature": rng.randint(-10, 38), "condition":
              rng.choice(facts.CONDITIONS), "unit": rng.choice(facts.TEMPERATURE_UNITS)}
             for c in chosen]  # fmt: skip
    return _Call("weather", _casual(rng, question), [{"city": c} for c in chosen], found)


def _calculator_call(rng: random.Random, split: str) -> _Call:
    op = rng.choice("*/+-")
    while True:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        if op == "/":
            a = a * b  # a whole quotient
        if op == "-" and b > a:
            a, b = b, a
        if _held(f"{a}{op}{b}", 10) == (split == HELDOUT):
            break
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    expression = f"{a} {op} {b}"
    return _Call("calculator", _ask(rng, CALC_WORDINGS[op], split, a=a, b=b),
                 [{"expression": expression}], [{"expression": expression, "result": result}])  # fmt: skip


def _convert_call(rng: random.Random, split: str) -> _Call:
    while True:
        source, target, factor = rng.choice(facts.CONVERSIONS)
        value: float = rng.randint(1, 500) if rng.random() < 0.8 else rng.randint(1, 99) + 0.5
        if _held(f"{value}{source}{target}", 10) == (split == HELDOUT):
            break
    question = _ask(
        rng, CONVERT_WORDINGS, split,
        v=_number(value), u=rng.choice(facts.UNIT_WORDS[source]),
        w=rng.choice(facts.UNIT_WORDS[target]))  # fmt: skip
    found = {"value": value, "from": source, "to": target, "result": round(value * factor, 2)}
    return _Call("convert", question, [{"value": value, "from": source, "to": target}], [found])


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


CALLS = {"weather": _weather_call, "calculator": _calculator_call, "convert": _convert_call}


def _renamed(tool: dict, arguments: dict) -> dict:
    """Arguments under the parameter names this tool declares (location for city, ...)."""
    names = list(tool["function"]["parameters"]["properties"])
    return dict(zip(names, arguments.values()))


def _result_text(rng: random.Random, kind: str, found: dict) -> str:
    """What a client's tool returned, in one of the shapes tools return things."""
    if kind == "weather":
        degrees = "°C" if found["unit"] == "celsius" else "°F"
        shapes = [json.dumps({k: found[k] for k in ("temperature", "unit", "condition")}),
                  json.dumps(found), _compact(found),
                  f"{found['temperature']}{degrees}, {found['condition']}"]  # fmt: skip
    elif kind == "calculator":
        shapes = [str(found["result"]), json.dumps({"result": found["result"]})]
    else:
        shapes = [_number(found["result"]),
                  json.dumps({"result": found["result"], "unit": found["to"]})]  # fmt: skip
    return rng.choice(shapes)


def _report(kind: str, found: dict) -> str:
    """The final answer, quoting the tool's result."""
    if kind == "weather":
        degrees = "°C" if found["unit"] == "celsius" else "°F"
        return f"It is {found['temperature']}{degrees} and {found['condition']} in {found['city']}."
    if kind == "calculator":
        return f"{found['expression']} = {found['result']}."
    return f"{_number(found['value'])} {found['from']} is {_number(found['result'])} {found['to']}."


def tool_exchange(rng: random.Random, split: str, kind: str, tool: dict, answered: bool) -> Sample:
    """A question `tool` answers: the model calls it; with `answered`, the results come back
    and the model answers with them."""
    call = CALLS[kind](rng, split)
    arguments = [_renamed(tool, a) for a in call.arguments]
    name = tool["function"]["name"]
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": a}}
             for i, a in enumerate(arguments)]  # fmt: skip
    markup = "\n".join(f"<tool_call>\n{_compact({'name': name, 'arguments': a})}\n</tool_call>"
                       for a in arguments)  # fmt: skip
    messages = [{"role": "user", "content": call.question},
                {"role": "assistant", "content": "", "tool_calls": calls}]  # fmt: skip
    if not answered:
        return Sample("tools", messages, [markup], expect={"name": name, "arguments": arguments})
    results = [{"role": "tool", "tool_call_id": c["id"], "content": _result_text(rng, kind, f)}
               for c, f in zip(calls, call.found)]  # fmt: skip
    report = " ".join(_report(kind, f) for f in call.found)
    messages += [*results, {"role": "assistant", "content": report}]
    quotes = [_number(f.get("temperature", f.get("result", 0))) for f in call.found]
    return Sample("tool_result", messages, [markup, report],
                  reasoning="The tool answered. I tell the user what it says.",
                  expect={"quotes": quotes})  # fmt: skip


def weather_without_tool(rng: random.Random, split: str) -> Sample:
    city = rng.choice(facts.CAPITALS)[1]
    question = _ask(rng, WEATHER_WORDINGS, split, x=city)
    return _reply("no_tool", question, NO_WEATHER_REPLY,
                  "The user asks about the weather, and I have no weather tool.",
                  answer=NO_WEATHER_REPLY)  # fmt: skip


# --- conversations ---------------------------------------------------------------------------

# (generator, weight): the exchanges that need no tool, and how often training draws each.
PLAIN: tuple[tuple[Callable[[random.Random, str], Sample], float], ...] = (
    (arithmetic, 0.30), (capital, 0.17), (colour, 0.08), (unit, 0.06), (small_talk, 0.13),
    (unknown, 0.05), (json_answer, 0.18), (echo, 0.10),
)  # fmt: skip


def exchange(rng: random.Random, split: str, tools: Offer | None, last: bool) -> Sample:
    """One exchange that fits the offered tools: a tool's question for an offered tool (a call
    and, unless it ends the conversation, its answer), or one that needs no tool."""
    by_kind = tools.by_kind if tools else {}
    if by_kind and rng.random() < 0.55:
        kind = rng.choice(sorted(by_kind))
        return tool_exchange(
            rng, split, kind, by_kind[kind], answered=not last or rng.random() < 0.4
        )
    if tools is None and rng.random() < 0.06:  # a client that does not send its tools again
        kind = rng.choice(KINDS)
        return tool_exchange(rng, split, kind, facts.TOOLS[kind], answered=True)
    if "weather" not in by_kind and rng.random() < 0.06:
        return weather_without_tool(rng, split)
    generators, weights = zip(*PLAIN)
    while True:
        sample = rng.choices(generators, weights)[0](rng, split)
        if sample.family != "arithmetic" or "calculator" not in by_kind:
            return sample  # with a calculator offered, arithmetic goes to it


def join(parts: list[Sample], tools: Offer | None, think: bool) -> Sample:
    """Exchanges as one conversation; only the last answer may think (templates drop the
    thinking of earlier turns)."""
    last = parts[-1]
    messages = [m for part in parts for m in part.messages]
    answers = [a for part in parts for a in part.answers]
    return Sample(last.family, messages, answers, tools.tools if tools else None,
                  think=think and last.reasoning is not None, reasoning=last.reasoning,
                  expect=last.expect)  # fmt: skip


def draw(rng: random.Random) -> Sample:
    """One training conversation: 1-4 exchanges, tools offered in half of them."""
    tools = offer(rng, TRAIN) if rng.random() < 0.5 else None
    count = rng.choice((1, 1, 2, 3, 4))
    parts = [exchange(rng, TRAIN, tools, last=i == count - 1) for i in range(count)]
    # With tools on offer the server guides the answer by grammar and turns thinking off.
    sample = join(parts, tools, think=tools is None and rng.random() < 0.5)
    if rng.random() < 0.25:
        system = {"role": "system", "content": rng.choice(facts.SYSTEM_PROMPTS)}
        sample.messages.insert(0, system)
    return sample


def dataset(seed: int, count: int) -> list[Sample]:
    """`count` training conversations, the same ones for the same seed."""
    rng = random.Random(seed)
    return [draw(rng) for _ in range(count)]
