'''Modelfiles: parse one into a ModelSpec (`ortserve create`), render one for a library model.

The syntax is Ollama's (parser/parser.go): one instruction per line, instruction names in
any case, `#` comment lines, and a value that is the rest of the line, or `"..."` /
`"""..."""` quoted, possibly over several lines. A quoted value ends at the first line end
where the text so far (trimmed) ends with its closing quote; there are no escapes.
'''

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortserve.errors import InvalidRequest
from ortserve.library.store import Library, ModelInfo

INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "license", "message",
                "draft")  # fmt: skip
# Ollama instructions that ortserve has no counterpart for: refused, never ignored.
_NOT_SUPPORTED = ("renderer", "parser", "requires")
MESSAGE_ROLES = ("system", "user", "assistant")
_WORD = re.compile(r"^([A-Za-z]+)(?:[ \t]+(.*))?$", re.DOTALL)
_PARAMETER = re.compile(r"^([A-Za-z0-9_]+)(?:[ \t]+(.*))?$", re.DOTALL)
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool, as Ollama reads them
_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_TRIPLE = '"""'


class ModelfileError(InvalidRequest):
    """A Modelfile that cannot be read; the message names the line."""

    def __init__(self, line: int, message: str, param: str = "modelfile"):
        super().__init__(f"Modelfile line {line}: {message}", param=param)
        self.line = line


@dataclass
class ModelSpec:
    """What a Modelfile (or an /api/create body) asks for; None means "keep the base's"."""

    from_: str | None = None
    from_path: Path | None = None  # FROM named an existing file or directory
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapters: list[tuple[str, Path]] = field(default_factory=list)  # (filename, path)
    messages: list[dict[str, str]] | None = None
    license: list[str] = field(default_factory=list)
    draft: str | None = None  # a library model's name: speculative decoding's draft model
    files: dict[str, str] = field(default_factory=dict)  # /api/create: filename -> blob digest
    lines: dict[str, int] = field(default_factory=dict)  # "from", "template", ... -> line

    def where(self, key: str) -> str:
        """`Modelfile line N: ` for a value read from a Modelfile line, else ''."""
        line = self.lines.get(key)
        return f"Modelfile line {line}: " if line else ""


def read_modelfile(path: str | Path) -> ModelSpec:
    """Parse the Modelfile at `path`; relative paths in it are relative to its directory."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidRequest(f"no Modelfile at {path}", param="modelfile") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read the Modelfile {path}: {exc}", param="modelfile") from exc
    return parse_modelfile(text, path.resolve().parent)


def parse_modelfile(text: str, base_dir: str | Path) -> ModelSpec:
    """A ModelSpec from Modelfile text; errors are ModelfileErrors naming the line."""
    spec = ModelSpec()
    for line, word, value in _instructions(text):
        _apply(spec, line, word.lower(), value, Path(base_dir))
    if spec.from_ is None:
        raise InvalidRequest("Modelfile has no FROM line", param="modelfile")
    return spec


# ---- reading -----------------------------------------------------------------------------------


def _instructions(text: str):
    """(line number, instruction word, raw value after it) for every instruction."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    while i < len(lines):
        number, stripped = i + 1, lines[i].strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        match = _WORD.match(lines[i - 1].lstrip())  # a value keeps its trailing spaces
        if match is None:
            raise ModelfileError(number, f'unknown instruction "{stripped.split()[0]}"')
        word, rest = match.group(1), match.group(2) or ""
        # PARAMETER and MESSAGE take a name before their value; the value may span lines.
        head = ""
        if word.lower() in ("parameter", "message"):
            head, rest = _split_head(number, word, rest)
        value_lines = [rest]
        while not _complete("\n".join(value_lines).strip()):
            if i >= len(lines):
                raise ModelfileError(number, f"the quoted {word.upper()} value is never closed")
            value_lines.append(lines[i])
            i += 1
        value = "\n".join(value_lines).strip()
        yield number, word, (head, value) if head else value


def _split_head(line: int, word: str, rest: str) -> tuple[str, str]:
    match = _PARAMETER.match(rest.lstrip())
    if match is None or not match.group(2):
        what = "a name and a value" if word.lower() == "parameter" else "a role and a text"
        raise ModelfileError(line, f"{word.upper()} needs {what}")
    return match.group(1), match.group(2)


def _complete(value: str) -> bool:
    """Whether a value read so far is whole: bare, or quoted and closed."""
    if value.startswith('"""'):
        return len(value) >= 6 and value.endswith('"""')
    if value.startswith('"'):
        return len(value) >= 2 and value.endswith('"')
    return True


def _unquote(value: str) -> str:
    if value.startswith('"""'):
        return value[3:-3]
    if value.startswith('"'):
        return value[1:-1]
    return value


def _apply(spec: ModelSpec, line: int, word: str, value: Any, base_dir: Path) -> None:
    """One instruction into the spec."""
    if word in _NOT_SUPPORTED:
        raise ModelfileError(line, f"{word.upper()} is not supported by ortserve")
    if word not in INSTRUCTIONS:
        raise ModelfileError(line, f'unknown instruction "{word.upper()}"')
    if word == "parameter":
        name, text = value
        if name.lower() == "draft":  # llama.cpp's --model-draft: a model field, not an option
            _apply(spec, line, "draft", text, base_dir)
        else:
            _set_parameter(spec, line, name.lower(), _unquote(text))
        return
    if word == "message":
        role, text = value
        _add_message(spec, line, role, _unquote(text))
        return
    if not value:
        raise ModelfileError(line, f"{word.upper()} needs a value")
    text = _unquote(value)
    if word == "from":
        if spec.from_ is not None:
            raise ModelfileError(line, f"a second FROM (the first is on line {spec.lines['from']})")
        spec.from_, spec.lines["from"] = text, line
        spec.from_path = _existing(base_dir, text)
    elif word == "adapter":
        spec.adapters.extend(_adapter_files(line, base_dir, text))
        spec.lines.setdefault("adapters", line)
    elif word == "license":
        spec.license.append(text)
        spec.lines.setdefault("license", line)
    elif word == "draft":  # a name, checked against the library by create (never a path)
        spec.draft, spec.lines["draft"] = text, line
    else:  # template, system: a later line replaces an earlier one, as in Ollama
        setattr(spec, word, text)
        spec.lines[word] = line


def _set_parameter(spec: ModelSpec, line: int, name: str, text: str) -> None:
    try:
        value = parameter_value(name, text)
        check_parameters({name: value})
    except InvalidRequest as exc:
        raise ModelfileError(line, exc.message, param=f"parameters.{name}") from None
    if name == "stop":  # repeated stop lines collect a list
        spec.parameters.setdefault("stop", []).append(value)
    else:
        spec.parameters[name] = value
    spec.lines.setdefault(f"parameters.{name}", line)


def _add_message(spec: ModelSpec, line: int, role: str, text: str) -> None:
    if role.lower() not in MESSAGE_ROLES:
        roles = ", ".join(f'"{r}"' for r in MESSAGE_ROLES)
        raise ModelfileError(line, f'MESSAGE role must be one of {roles}, got "{role}"')
    if spec.messages is None:
        spec.messages = []
    spec.lines.setdefault("messages", line)
    spec.messages.append({"role": role.lower(), "content": text})


def _existing(base_dir: Path, text: str) -> Path | None:
    """FROM's path, if it names one that exists (else FROM names a library model)."""
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base_dir / path
    return path.resolve() if path.exists() else None


def _adapter_files(line: int, base_dir: Path, text: str) -> list[tuple[str, Path]]:
    """An adapter file, or every file of an adapter directory, as (filename, path)."""
    path = _existing(base_dir, text)
    if path is None:
        raise ModelfileError(line, f"ADAPTER {text}: no such file or directory", "adapters")
    if path.is_file():
        return [(path.name, path)]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise ModelfileError(line, f"ADAPTER {text}: the directory is empty", "adapters")
    return [(p.relative_to(path).as_posix(), p) for p in files]


# ---- parameters --------------------------------------------------------------------------------


def parameter_value(name: str, text: str) -> Any:
    """A PARAMETER's text as the type its option takes (ortserve/options.py's table)."""
    from ortserve.options import option_type

    kind = option_type(name)
    if kind is None:
        raise InvalidRequest(f'unknown parameter "{name}"', param=f"parameters.{name}")
    try:
        if kind == "stop":
            return text
        if kind == "boolean":
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError
        number = float(text)  # ValueError for text that is not a number
        if kind == "integer" or re.fullmatch(r"[+-]?\d+", text):
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (ValueError, OverflowError):
        expected = {"boolean": "true or false", "integer": "an integer"}.get(kind, "a number")
        raise InvalidRequest(
            f'invalid value for parameter "{name}": "{text}" is not {expected}',
            param=f"parameters.{name}",
        ) from None


def check_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters checked as request options are (types, ranges); stop always a list."""
    from ortserve.options import parse_options

    parse_options(parameters, "parameters", strict=True)
    out = {k: v for k, v in parameters.items() if v is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


# ---- writing -----------------------------------------------------------------------------------


def render_modelfile(model: ModelInfo) -> str:
    """A Modelfile that `ortserve create` turns back into this model; FROM is its bundle."""
    m = model.manifest
    lines = [
        f'# Modelfile generated by "ortserve show" for {model.name}',
        "# To build a new Modelfile based on this one, replace FROM with:",
        f"# FROM {model.name}",
        "",
        f"FROM {quote(str(model.path))}",
    ]
    if m.get("template"):
        lines += _value_lines("TEMPLATE", m["template"])
    if m.get("system"):
        lines += _value_lines("SYSTEM", m["system"])
    for key, value in (m.get("parameters") or {}).items():
        for item in value if isinstance(value, list) else [value]:
            lines += _value_lines(f"PARAMETER {key}", _parameter_text(item))
    for adapter in m.get("adapters") or []:
        lines.append(f"ADAPTER {quote(str(_adapter_path(model, adapter)))}")
    if m.get("draft"):
        lines.append(f"DRAFT {quote(str(m['draft']))}")
    for message in m.get("messages") or []:
        lines += _value_lines(f"MESSAGE {message['role']}", message["content"])
    license_ = m.get("license")
    for text in license_ if isinstance(license_, list) else [license_] if license_ else []:
        lines += _value_lines("LICENSE", text)
    return "\n".join(lines) + "\n"


def quote(text: str) -> str:
    """`text` as a Modelfile value that reads back exactly (see representable)."""
    if text and "\n" not in text and text == text.strip() and not text.startswith('"'):
        return text
    if _reads_back('"""', text):
        return f'"""{text}"""'
    if _reads_back('"', text):
        return f'"{text}"'
    return f'"""{text}"""'  # not representable: the caller adds a warning comment


def representable(text: str) -> bool:
    """False for the rare text no Modelfile quoting can carry (a line ending in `\"\"\"`)."""
    return _unquote_value(quote(text)) == text


def _reads_back(mark: str, text: str) -> bool:
    quoted = mark + text + mark
    return _unquote_value(quoted) == text and not (mark == '"' and text.startswith('"'))


def _unquote_value(quoted: str) -> str | None:
    """What the parser reads from `quoted` when it is a whole value."""
    lines = quoted.split("\n")
    for end in range(1, len(lines) + 1):
        value = "\n".join(lines[:end]).strip()
        if _complete(value):
            return _unquote(value) if end == len(lines) else None
    return None


def _value_lines(prefix: str, text: str) -> list[str]:
    lines = [f"{prefix} {quote(text)}"]
    if not representable(text):
        lines.insert(0, f"# warning: the next value has a line ending in {_TRIPLE}, which no "
                        "Modelfile can quote; it will not read back exactly")  # fmt: skip
    return lines


def _parameter_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def _adapter_path(model: ModelInfo, adapter: Any) -> Path | str:
    """Where an adapter's file is: its blob in this model's library, or its recorded path."""
    if isinstance(adapter, dict) and adapter.get("digest"):
        return Library(model.path.parent.parent).blob_path(adapter["digest"])
    return adapter.get("path", "") if isinstance(adapter, dict) else adapter
