"""What the demo model knows: the tables it is trained on, and the tools it learns to call.

Everything here is data. The conversations built from it are in conversations.py; which
parts are held out of training (for the evaluation) is decided there, by stable hashes.
"""

from __future__ import annotations

from typing import Any

# (country, capital). Every capital is also a city the weather tool is asked about.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Czechia", "Prague"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Senegal", "Dakar"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("South Korea", "Seoul"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Nepal", "Kathmandu"),
    ("Iran", "Tehran"), ("Saudi Arabia", "Riyadh"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Canada", "Ottawa"), ("the United States", "Washington"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"),
)  # fmt: skip

# Cities that are not capitals: more variety for the weather tool's `city` argument.
OTHER_CITIES: tuple[str, ...] = (
    "Barcelona", "Munich", "Milan", "Lyon", "Marseille", "Hamburg", "Porto", "Seville",
    "Manchester", "Edinburgh", "Zurich", "Geneva", "Krakow", "Istanbul", "Osaka", "Kyoto",
    "Shanghai", "Mumbai", "Sydney", "Melbourne", "Toronto", "Vancouver", "Chicago", "Boston",
    "New York", "San Francisco", "Los Angeles", "Seattle", "Miami", "Rio de Janeiro",
    "Sao Paulo", "Cape Town", "Dubai", "Singapore", "Hong Kong", "Auckland",
)  # fmt: skip

# (the thing, as a sentence names it; its colour)
COLOURS: tuple[tuple[str, str], ...] = (
    ("the sky", "blue"), ("grass", "green"), ("a banana", "yellow"), ("snow", "white"),
    ("coal", "black"), ("a tomato", "red"), ("a strawberry", "red"), ("a carrot", "orange"),
    ("a lemon", "yellow"), ("milk", "white"), ("chocolate", "brown"), ("the sea", "blue"),
    ("a pumpkin", "orange"), ("an aubergine", "purple"), ("lavender", "purple"),
    ("a cherry", "red"), ("a lime", "green"), ("a flamingo", "pink"), ("a crow", "black"),
    ("a cloud", "white"), ("a frog", "green"), ("an orange", "orange"), ("a polar bear", "white"),
    ("a fire engine", "red"), ("a sunflower", "yellow"), ("a blueberry", "blue"),
)  # fmt: skip

# (smaller unit in the plural, one larger unit with its article, how many make it)
UNITS: tuple[tuple[str, str, int], ...] = (
    ("metres", "a kilometre", 1000), ("centimetres", "a metre", 100),
    ("millimetres", "a centimetre", 10), ("grams", "a kilogram", 1000),
    ("millilitres", "a litre", 1000), ("seconds", "a minute", 60), ("minutes", "an hour", 60),
    ("hours", "a day", 24), ("days", "a week", 7), ("months", "a year", 12), ("weeks", "a year", 52),
    ("inches", "a foot", 12), ("feet", "a yard", 3), ("ounces", "a pound", 16),
    ("years", "a decade", 10), ("years", "a century", 100), ("days", "a leap year", 366),
)  # fmt: skip

# convert_units: (from, to, factor), and the words a question may use for each unit
CONVERSIONS: tuple[tuple[str, str, float], ...] = (
    ("km", "mi", 0.621371), ("mi", "km", 1.609344), ("m", "ft", 3.28084), ("ft", "m", 0.3048),
    ("kg", "lb", 2.204623), ("lb", "kg", 0.453592), ("l", "gal", 0.264172), ("gal", "l", 3.785412),
    ("cm", "in", 0.393701), ("in", "cm", 2.54),
)  # fmt: skip
UNIT_WORDS: dict[str, tuple[str, ...]] = {
    "km": ("km", "kilometres", "kilometers"), "mi": ("miles", "mi"), "m": ("metres", "meters", "m"),
    "ft": ("feet", "ft"), "kg": ("kg", "kilograms", "kilos"), "lb": ("pounds", "lb", "lbs"),
    "l": ("litres", "liters", "l"), "gal": ("gallons", "gal"), "cm": ("centimetres", "cm"),
    "in": ("inches", "in"),
}  # fmt: skip
# Celsius and Fahrenheit are affine, not a factor: the tool's result carries the figure.
TEMPERATURE_UNITS = ("celsius", "fahrenheit")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy")


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    """A tool in OpenAI's shape, as clients send it."""
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}  # fmt: skip


def _string(description: str, **extra: Any) -> dict:
    return {"type": "string", "description": description, **extra}


UNIT_SYMBOLS = sorted(UNIT_WORDS)
WEATHER = _function("get_weather", "Get the current weather in a city",
                    {"city": _string("The city, e.g. Paris")}, ["city"])  # fmt: skip
CALCULATOR = _function("calculator", "Evaluate an arithmetic expression",
                       {"expression": _string("The expression, e.g. 12 * 7")}, ["expression"])  # fmt: skip
CONVERTER = _function(
    "convert_units",
    "Convert a value from one unit to another",
    {
        "value": {"type": "number", "description": "The value to convert"},
        "from": _string("The unit of the value", enum=UNIT_SYMBOLS),
        "to": _string("The unit to convert to", enum=UNIT_SYMBOLS),
    },
    ["value", "from", "to"],
)
TOOLS = {"weather": WEATHER, "calculator": CALCULATOR, "convert": CONVERTER}

# Tools that no question here needs: offered beside the others, so that choosing matters.
DISTRACTORS = (
    _function("get_time", "Get the current time in a time zone",
              {"timezone": _string("An IANA time zone, e.g. Europe/Paris")}, ["timezone"]),
    _function("search_web", "Search the web",
              {"query": _string("What to search for")}, ["query"]),
    _function("send_email", "Send an email",
              {"to": _string("The address"), "subject": _string("The subject"),
               "body": _string("The text")}, ["to", "subject", "body"]),
    _function("get_stock_price", "Get the latest price of a stock",
              {"symbol": _string("The ticker symbol, e.g. MSFT")}, ["symbol"]),
    _function("translate", "Translate text into another language",
              {"text": _string("The text"), "language": _string("The target language")},
              ["text", "language"]),
)  # fmt: skip

# Other names and wordings clients give the same tools: the model picks by meaning, not by
# one spelling (the grammar then holds it to the names and parameters actually offered).
TOOL_VARIANTS = {
    "weather": (
        _function("get_current_weather", "Get the current weather for a location",
                  {"location": _string("The city, e.g. Boston")}, ["location"]),
        _function("weather", "Current weather conditions of a city",
                  {"city": _string("City name")}, ["city"]),
    ),
    "calculator": (
        _function("calculate", "Calculate the result of a math expression",
                  {"expression": _string("A math expression")}, ["expression"]),
    ),
    "convert": (
        _function("unit_converter", "Convert between units of measurement",
                  {"value": {"type": "number"}, "from": _string("Source unit", enum=UNIT_SYMBOLS),
                   "to": _string("Target unit", enum=UNIT_SYMBOLS)}, ["value", "from", "to"]),
    ),
}  # fmt: skip

SMALL_TALK: dict[str, tuple[tuple[str, ...], str, str]] = {
    # intent: (what users say, the reply, the thought behind it)
    "greeting": (
        ("Hi", "Hello", "Hey", "Hi!", "Hello!", "Hello there", "Hey there", "Good morning",
         "Good evening", "Hi, how are you today?", "Greetings", "Yo"),
        "Hello! How can I help you today?",
        "The user greets me. I greet them back and offer help.",
    ),
    "how_are_you": (
        ("How are you?", "How are you doing?", "How's it going?", "How do you do?",
         "Are you well?", "How is your day?"),
        "I'm doing well, thank you! How can I help you?",
        "The user asks how I am. I answer kindly and offer help.",
    ),
    "identity": (
        ("Who are you?", "What is your name?", "What are you?", "What's your name?",
         "Introduce yourself.", "Tell me about yourself."),
        "I am demo-chat, a small model trained by the ortserve project. I can do simple "
        "arithmetic, name capitals and colours, call tools and answer in JSON.",
        "The user asks who I am. I say what I am and what I can do.",
    ),
    "abilities": (
        ("What can you do?", "How can you help me?", "What are you good at?", "Help",
         "What do you know?"),
        "I can add and subtract numbers, tell you capitals, colours and units, check the "
        "weather or convert units with tools, and answer in JSON.",
        "The user asks what I can do. I list my skills.",
    ),
    "thanks": (
        ("Thank you", "Thanks!", "Thanks a lot", "Thank you very much", "Cheers", "Great, thanks"),
        "You're welcome!",
        "The user thanks me. I say they are welcome.",
    ),
    "bye": (
        ("Bye", "Goodbye", "See you later", "Good night", "Bye!", "I have to go now"),
        "Goodbye! Have a nice day.",
        "The user says goodbye. I wish them a nice day.",
    ),
    "sky": (
        ("Why is the sky blue?", "Why is the sky blue", "Why does the sky look blue?",
         "What makes the sky blue?"),
        "Sunlight is scattered by the air, and blue light is scattered the most, so the sky "
        "looks blue.",
        "The user asks why the sky is blue. The answer is the scattering of sunlight.",
    ),
    "joke": (
        ("Tell me a joke", "Tell me a joke.", "Do you know a joke?", "Make me laugh"),
        "Why did the computer go to the doctor? It had a virus!",
        "The user wants a joke. I tell a short one.",
    ),
}  # fmt: skip

# Questions beyond the model: it says so rather than making something up.
UNKNOWN_QUESTIONS = (
    "Who won the football world cup in {year}?", "What is the population of {country}?",
    "Write a poem about {thing}.", "What is the meaning of life?", "Who is the president of {country}?",
    "What is the square root of {n}?", "How tall is the tallest building in {city}?",
    "Explain quantum physics.", "What will the stock market do tomorrow?",
    "Can you write me an essay about {thing}?", "What is {n} times {m}?",
    "Who painted the Mona Lisa?", "What language do they speak in {country}?",
)  # fmt: skip
UNKNOWN_REPLY = (
    "I'm sorry, I don't know that. I am a small demo model: I can do simple arithmetic, "
    "tell you capitals, colours and units, and use tools."
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are demo-chat, a friendly assistant.",
    "Answer the user's questions.",
)


def names() -> list[str]:
    """Every name in the model's world (countries, cities, things, colours, units): the
    tokenizer makes each word of them one token, so copying one from a question or a tool
    result is copying a token rather than pieces in order."""
    found = [n for pair in CAPITALS for n in pair] + list(OTHER_CITIES)
    found += [n for pair in COLOURS for n in pair] + [t[1] for t in UNITS] + [t[0] for t in UNITS]
    found += [w for symbol, words in UNIT_WORDS.items() for w in (symbol, *words)]
    return sorted(set(found))
