"""A jinja2 sandbox whose renders are bounded in output size, loop iterations and time.

Chat templates come from bundles and from Modelfiles (any client of /api/create), and jinja2's
own sandbox only guards attribute access: `{{ "x" * 10**9 }}` allocates a gigabyte and two
nested loops over range(100000) run for hours. Here every operation that can amplify (string
and list repetition, concatenation, joins, padding filters, buffered blocks) is sized before
it runs, loops count their steps, and the clock is read at every step, call and output chunk.
Nothing else changes: a template that stays within its limits renders exactly as in
transformers' environment.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ortserve.errors import InvalidRequest

# The limits' names, as errors say them.
OUTPUT_SIZE = "output size"
LOOP_ITERATIONS = "loop iterations"
TIME = "time"
TEMPLATE_SIZE = "template size"

# The longest template compiled: compiling is unbounded in time and memory, and real chat
# templates are under 50 KB.
MAX_SOURCE_CHARS = 256 * 1024

# Filter names a template cannot write (the lexer has no spaces in names): the loop and `~`
# hooks the compiled template calls.
_LOOP = "ortserve loop"
_CONCAT = "ortserve concat"
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may take.

    chars bounds the output and every string or list the template builds on the way;
    iterations bounds the steps of all its loops together (and any one range());
    seconds bounds its wall time.
    """

    chars: int = 1_000_000
    iterations: int = 100_000
    seconds: float = 2.0


class TemplateLimitExceeded(InvalidRequest):
    """A render (or a template) broke one of its TemplateLimits; `limit` names which."""

    def __init__(self, limit: str, detail: str):
        super().__init__(
            f"chat template exceeded its {limit} limit ({detail})", code="template_limit"
        )
        self.limit = limit


class _Budget:
    """One render's limits as they are spent."""

    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.steps = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(TIME, f"{self.limits.seconds:g} s")

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.iterations:
            raise TemplateLimitExceeded(LOOP_ITERATIONS, f"{self.limits.iterations:,}")
        self.tick()

    def check(self, size: int) -> None:
        """Refuse to make (or keep) a value of `size` characters."""
        if size > self.limits.chars:
            raise TemplateLimitExceeded(OUTPUT_SIZE, f"{self.limits.chars:,} characters")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _current() -> _Budget:
    """The render in progress; outside one (jinja2 folding constants at compile time) the
    lookup fails, so the operation is left to run, and be sized, at render time."""
    try:
        return _budget.get()
    except LookupError:
        raise nodes.Impossible() from None


def render(template: jinja2.Template, limits: TemplateLimits, **variables: Any) -> str:
    """The template's text, rendered within `limits` (TemplateLimitExceeded otherwise)."""
    budget = _Budget(limits)
    token = _budget.set(budget)
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            size += len(part)
            budget.check(size)
            budget.tick()
            parts.append(part)
        return "".join(parts)
    finally:
        _budget.reset(token)


def compile_template(
    source: str, configure: Callable[[jinja2.Environment], None]
) -> jinja2.Template:
    """`source` compiled in a BoundedEnvironment that `configure` has set up (filters, globals)."""
    if len(source) > MAX_SOURCE_CHARS:
        raise TemplateLimitExceeded(TEMPLATE_SIZE, f"{MAX_SOURCE_CHARS:,} characters")
    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    configure(env)
    env.bound_filters()
    tree = _Hooks().visit(env.parse(source))
    tree.set_environment(env)
    return env.from_string(tree)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox (immutable, loopcontrols), with every amplifier sized first."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals["range"] = _range
        self.globals.pop("lipsum", None)  # lipsum(n=10**6): no chat template writes Latin
        # Macros, {% set %} blocks, {% filter %} and {% call %} blocks write to buffers, not
        # to render()'s output: the buffers count their text as it comes.
        self.code_generator_class = _Generator
        self.new_buffer = _Buffer

    def bound_filters(self) -> None:
        """Wrap every filter (the template's configure step has added its own) in a guard."""
        for name, func in list(self.filters.items()):
            self.filters[name] = _guarded_filter(name, func)
        self.filters[_LOOP] = _loop
        self.filters[_CONCAT] = _concat_values

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _current()
        budget.tick()
        budget.check(_binop_size(operator, left, right, budget.limits.chars))
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Every call a template makes (methods, macros, globals): sized before and after."""
        budget = _current()
        budget.tick()
        args = _materialised(obj, args)
        budget.check(_call_size(obj, args, kwargs, budget.limits.chars))
        result = super().call(context, obj, *args, **kwargs)
        budget.check(_size(result, budget.limits.chars))
        return result


class _Generator(CodeGenerator):
    """jinja2's code generator, with bounded buffers for output that is not yielded."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")


class _Hooks(NodeTransformer):
    """Route every for-loop's items and every `~` through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        items = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(items, _CONCAT, [], [], None, None, lineno=node.lineno)


# ---- the hooks ---------------------------------------------------------------------------


def _loop(items: Iterable[Any]) -> Iterator[Any]:
    """A for-loop's items, each one a step of the budget."""
    return _steps(items, _current())


def _steps(items: Iterable[Any], budget: _Budget) -> Iterator[Any]:
    for item in items:
        budget.step()
        yield item


def _range(*args: int) -> range:
    """range(), no longer than the render's whole loop budget (jinja2's cap is 100,000)."""
    budget = _current()
    items = range(*args)
    if len(items) > budget.limits.iterations:
        raise TemplateLimitExceeded(LOOP_ITERATIONS, f"range of {len(items):,} items")
    return items


class _Buffer(list):
    """A block's output (a list of strings, as jinja2 keeps it), sized as it grows."""

    def __init__(self) -> None:
        super().__init__()
        self._budget = _current()
        self._size = 0

    def append(self, text: str) -> None:
        self._size += len(text)
        self._budget.check(self._size)
        self._budget.tick()
        super().append(text)

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.append(text)


def _concat_values(values: list[Any]) -> str:
    """`a ~ b`: jinja2's str_join, sized first."""
    budget = _current()
    budget.check(sum(_size(v, budget.limits.chars) for v in values))
    return "".join(map(str, values))


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` sized before it runs (from its arguments) and after (its result)."""
    estimate = _FILTER_SIZES.get(name)
    signature = inspect.signature(func) if estimate is not None else None
    # jinja2 passes the environment, eval context or context first to some filters.
    skip = 1 + (getattr(func, "jinja_pass_arg", None) is not None)

    @functools.wraps(func)  # keeps jinja_pass_arg
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.tick()
        limit = budget.limits.chars
        if any(_big_int(a, limit) for a in (*args[skip:], *kwargs.values())):
            budget.check(limit + 1)
        if estimate is not None:
            bound = signature.bind(*args, **kwargs)  # type: ignore[union-attr]
            bound.apply_defaults()
            budget.check(estimate(bound.arguments, limit))
            args, kwargs = bound.args, bound.kwargs  # an estimate may have listed an iterator
        result = func(*args, **kwargs)
        budget.check(_size(result, limit))
        return result

    return guarded


# ---- sizes -------------------------------------------------------------------------------


def _size(value: Any, limit: int) -> int:
    """About how many characters `value` stands for as text, counted to just past `limit`.

    Strings count their length, containers their items (and one per item, as a repr
    separates them), numbers their bits; anything else counts one.
    """
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, int):
            total += item.bit_length() // 3
        else:
            total += 1
    return total


def _big_int(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > limit


def _binop_size(operator: str, left: Any, right: Any, limit: int) -> int:
    """The size of `left <operator> right`, before it is computed."""
    if operator == "*":
        if isinstance(right, int) and not isinstance(left, int):
            left, right = right, left
        if isinstance(left, int) and isinstance(right, (str, list, tuple)):
            return max(left, 0) * _size(right, limit)
        if isinstance(left, int) and isinstance(right, int):
            return (left.bit_length() + right.bit_length()) // 3
        return 0
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            return left.bit_length() * right // 3
        return 0
    if operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            return _size(left, limit) + _size(right, limit)
        return 0
    if operator == "%" and isinstance(left, str):
        return _format_size(left, right if isinstance(right, tuple) else (right,), limit)
    return 0


def _format_size(pattern: str, values: Iterable[Any], limit: int) -> int:
    """An upper bound of `pattern` formatted with `values` (% or str.format style): each
    field takes at most the largest value and the widest width the pattern names."""
    fields = pattern.count("%") + pattern.count("{")
    widest = max((int(n) for n in _NUMBER.findall(pattern)), default=0)
    largest = max((_size(v, limit) for v in values), default=0)
    return len(pattern) + fields * (largest + widest)


def _str_method(obj: Any) -> tuple[str, str] | None:
    """(the string, the method's name) when `obj` is a bound str method (or the sandbox's
    wrapper of str.format)."""
    method = getattr(obj, "__wrapped__", obj)
    owner = getattr(method, "__self__", None)
    if isinstance(owner, str):
        return owner, getattr(method, "__name__", "")
    return None


def _materialised(obj: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """str.join's items as a list, so they can be sized before the join consumes them."""
    method = _str_method(obj)
    if method and method[1] == "join" and args and not isinstance(args[0], (list, tuple, str)):
        return (list(args[0]), *args[1:])
    return args


def _call_size(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> int:
    """The size a call may produce, where its arguments say (str methods, any large count)."""
    if obj is _range:  # sized by the loop budget instead
        return 0
    if any(_big_int(a, limit) for a in (*args, *kwargs.values())):
        return limit + 1
    method = _str_method(obj)
    if method is None:
        return 0
    text, name = method
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        return max(len(text), first)
    if name == "expandtabs":
        tabsize = first if isinstance(first, int) else kwargs.get("tabsize", 8)
        return len(text) + text.count("\t") * max(tabsize, 0)
    if name == "replace" and len(args) >= 2 and isinstance(first, str):
        return _replace_size(text, first, args[1])
    if name == "join" and isinstance(first, (list, tuple)):
        return _size(first, limit) + len(text) * len(first)
    if name in ("format", "format_map"):
        values = [*args, *kwargs.values()]
        if name == "format_map" and args and isinstance(args[0], dict):
            values = list(args[0].values())
        return _format_size(text, values, limit)
    return 0


def _replace_size(text: str, old: str, new: Any) -> int:
    return len(text) + text.count(old) * len(str(new))


# Filters that make more text than they are given, and how much (from their bound arguments).
Arguments = dict[str, Any]


def _listed(arguments: Arguments, name: str) -> list[Any]:
    """An iterator argument as a list (kept in `arguments`, so the filter gets the list)."""
    value = arguments[name]
    if not isinstance(value, (list, tuple, str, dict)):
        arguments[name] = value = list(value)
    return value


def _join_size(a: Arguments, limit: int) -> int:
    items = _listed(a, "value")
    return _size(items, limit) + len(str(a["d"])) * len(items)


def _indent_size(a: Arguments, limit: int) -> int:
    text, width = str(a["s"]), a["width"]
    pad = width if isinstance(width, int) else len(str(width))
    return len(text) + (text.count("\n") + 1) * max(pad, 0)


def _wordwrap_size(a: Arguments, limit: int) -> int:
    text, wrap = str(a["s"]), a["wrapstring"]
    breaks = min(len(text), len(text) // max(a["width"], 1) + text.count(" ") + 1)
    return len(text) + breaks * len(wrap if wrap is not None else "\n")


def _sum_size(a: Arguments, limit: int) -> int:
    # sum() of lists copies the running total at every item: quadratic in one C call.
    items = _listed(a, "iterable")
    if isinstance(a["start"], (list, tuple)):
        return _size(items, limit) * len(items)
    return 0


_FILTER_SIZES: dict[str, Callable[[Arguments, int], int]] = {
    "center": lambda a, limit: max(len(str(a["value"])), int(a["width"])),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": lambda a, limit: _replace_size(str(a["s"]), str(a["old"]), a["new"]),
    "join": _join_size,
    "format": lambda a, limit: _format_size(
        str(a["value"]), [*a["args"], *a["kwargs"].values()], limit
    ),
    "string": lambda a, limit: _size(a["s"], limit),
    "pprint": lambda a, limit: 2 * _size(a["value"], limit),
    "tojson": lambda a, limit: (2 + (a.get("indent") or 0)) * _size(a["value"], limit),
    "sum": _sum_size,
}
