"""`ortserve run`: one-shot or interactive chat, streamed, over a client backend."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ortserve.errors import OrtServeError
from ortserve.options import parameter_text

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, top_k, num_predict, stop, ...)
  /set system TEXT            Set the system message
  /set verbose | quiet        Show or hide timings after each answer
  /set think | nothink        Think before answering, or answer straight away
  /show info                  Show details of this model
  /show parameters | system   Show the parameters or system message in use
  /clear                      Clear the conversation
  /bye                        Exit
  /?, /help                   This help

Use \"\"\" to begin and end a multi-line message.
Ctrl + c stops an answer; Ctrl + d or /bye leaves."""
# What Ctrl-C at the prompt says, in Ollama's words
EXIT_HINT = "Use Ctrl + d or /bye to exit."
# Lines of run's history file (~/.ortserve/history, as Ollama's ~/.ollama/history) kept
HISTORY_LINES = 1000


class Session:
    """A conversation with one model: history, options, system prompt."""

    def __init__(self, backend, model: str, *, keep_alive: str | None, verbose: bool,
                 out: Callable[[str], None] | None = None, think: bool | None = None,
                 hide_thinking: bool = False):  # fmt: skip
        self.backend = backend
        self.model = model
        self.keep_alive = keep_alive
        self.verbose = verbose
        self.think = think  # None: the model's default (a thinking model thinks)
        self.hide_thinking = hide_thinking
        self.messages: list[dict[str, Any]] = []
        self.options: dict[str, Any] = {}
        self.system: str | None = None
        self.out = out or _write
        self.note: Callable[[str], Any] = sys.stderr.write  # "Added image ..." lines
        self._vision: bool | None = None  # the model reads images (None: not asked yet)

    def load(self) -> None:
        """Load the model up front (an empty chat), as Ollama does before the prompt."""
        for _ in self.backend.stream("/api/chat", self._body([])):
            pass

    def ask(self, prompt: str) -> str:
        """Send one user message, stream the answer, remember both (neither if it failed).

        Ctrl-C (KeyboardInterrupt) stops the answer: the stream is closed, so the server
        cancels the turn, and the conversation keeps the message with the part of the answer
        shown (nothing if none was); the interrupt goes on to the caller.
        """
        self.messages.append(self._message(prompt))
        answer, final, thinking = [], {}, False
        stream = self.backend.stream("/api/chat", self._body(self._history()))
        try:
            for chunk in stream:
                message = chunk.get("message", {})
                thought = message.get("thinking") or ""
                if thought and not self.hide_thinking:
                    if not thinking:
                        self.out("Thinking...\n")
                    thinking = True
                    self.out(thought)
                text = message.get("content", "")
                if text:
                    if thinking:  # as Ollama shows it: the thought, then the answer apart
                        self.out("\n...done thinking.\n\n")
                        thinking = False
                    answer.append(text)
                    self.out(text)
                if chunk.get("done"):
                    final = chunk
        except KeyboardInterrupt:
            stream.close()  # now, not when the traceback lets go of it: the turn stops
            self._keep_partial("".join(answer))
            raise
        except BaseException:
            self.messages.pop()  # the conversation stays as it was before this message
            raise
        self.out("\n")
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        if self.verbose:
            self.out(timings(final))
        return "".join(answer)

    def _message(self, prompt: str) -> dict[str, Any]:
        """The user message: image files the prompt names attached (a vision model only)."""
        found = image_files(prompt)
        if not found or not self._sees_images():
            return {"role": "user", "content": prompt}
        images = []
        for written, path in found:
            images.append(base64.b64encode(_read_image(path)).decode("ascii"))
            self.note(f"Added image '{path}'\n")
            for text in (f"'{path}'", f"'{written}'", written):  # as ollama removes them
                prompt = prompt.replace(text, "")
        return {"role": "user", "content": prompt.strip(), "images": images}

    def _sees_images(self) -> bool:
        """Whether the model has the vision capability (asked once)."""
        if self._vision is None:
            shown = next(iter(self.backend.stream("/api/show", {"model": self.model})), {})
            self._vision = "vision" in (shown.get("capabilities") or ())
        return self._vision

    def _keep_partial(self, answer: str) -> None:
        """After Ctrl-C: keep the question and the answer so far, as the user saw them."""
        if answer:
            self.messages.append({"role": "assistant", "content": answer})
        else:
            self.messages.pop()  # nothing came back: as if it had not been sent

    def _history(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if self.options:
            body["options"] = self.options
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        if self.think is not None:
            body["think"] = self.think
        return body

    # ---- slash commands --------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        words = line.split(maxsplit=3)
        head = words[0].lower()
        if head in ("/bye", "/exit"):
            return False
        if head in ("/?", "/help"):
            self.out(HELP + "\n")
        elif head == "/clear":
            self.messages.clear()
            self.out("Cleared session context\n")
        elif head == "/set":
            self._set(line)
        elif head == "/show":
            self._show(words[1] if len(words) > 1 else "")
        else:
            self.out(f"Unknown command '{words[0]}'. Type /? for help\n")
        return True

    def _set(self, line: str) -> None:
        words = line.split(maxsplit=2)
        what = words[1].lower() if len(words) > 1 else ""
        rest = words[2] if len(words) > 2 else ""
        if what == "parameter":
            name, _, value = rest.partition(" ")
            if not name or not value:
                self.out("Usage: /set parameter NAME VALUE\n")
                return
            try:  # checked now: a bad value is one message, and the session goes on
                self.options[name] = parse_value(name, value.strip(), self.options.get(name))
            except OrtServeError as exc:
                self.out(f"Error: {exc.message}\n")
                return
            self.out(f"Set parameter '{name}' to '{value.strip()}'\n")
        elif what == "system":
            self.system = _unquote(rest)
            self.out("Set system message.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self.out(f"Set '{what}' mode.\n")
        elif what in ("think", "nothink"):
            self.think = what == "think"
            self.out(f"Set '{what}' mode.\n")
        else:
            self.out("Usage: /set parameter NAME VALUE | /set system TEXT | /set verbose|quiet"
                     " | /set think|nothink\n")  # fmt: skip

    def _show(self, what: str) -> None:
        if what == "parameters":
            self.out(
                parameter_text(self.options) + "\n" if self.options else "No parameters set.\n"
            )
        elif what == "system":
            self.out((self.system or "No system message was specified for this model.") + "\n")
        elif what == "info":
            shown = next(iter(self.backend.stream("/api/show", {"model": self.model})))
            info = {k: shown.get(k) for k in ("details", "capabilities", "model_info")}
            self.out(json.dumps(info, indent=2) + "\n")
        else:
            self.out("Usage: /show info | parameters | system\n")


# Image paths in a prompt, as `ollama run` finds them (cmd/interactive.go, extractFileNames):
# an optional drive letter, ./ / or \ first, shell-escaped spaces allowed, an image extension
# last. What does not name an existing file stays text.
_IMAGE_PATH = re.compile(r"(?:[a-zA-Z]:)?(?:\./|/|\\)[\S\\ ]+?\.(?i:jpg|jpeg|png|webp)\b")
_SHELL_ESCAPES = {f"\\{c}": c for c in " ()[]{}$&;'\\*?~"}


def image_files(prompt: str) -> list[tuple[str, Path]]:
    """(the path as written, the file) for each existing image file the prompt names."""
    found = []
    for written in _IMAGE_PATH.findall(prompt):
        path = Path(re.sub(r"\\.", lambda m: _SHELL_ESCAPES.get(m[0], m[0]), written))
        if path.is_file():
            found.append((written, path))
    return found


def _read_image(path: Path) -> bytes:
    """The file's bytes, refused here when the server would refuse them for their size."""
    from ortserve.serving.images import MAX_IMAGE_BYTES

    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise OrtServeError(f"{path}: image too large: more than "
                                f"{MAX_IMAGE_BYTES >> 20} MiB")  # fmt: skip
        return path.read_bytes()
    except OSError as exc:
        raise OrtServeError(f"{path}: {exc.strerror}") from None


def parse_value(name: str, value: str, previous: Any) -> Any:
    """'0.7' -> 0.7, '40' -> 40, stop values accumulate into a list, as in Ollama.

    Typed and range-checked as a Modelfile PARAMETER is: InvalidRequest names what is wrong.
    """
    from ortserve.library.modelfile import check_parameters, parameter_value

    if name == "stop":
        items = previous if isinstance(previous, list) else []
        return [*items, _unquote(value)]
    typed = parameter_value(name, _unquote(value))
    check_parameters({name: typed})
    return typed


def timings(final: dict[str, Any]) -> str:
    """Ollama's --verbose block."""

    def seconds(key: str) -> float:
        return final.get(key, 0) / 1e9

    def rate(count: str, duration: str) -> str:
        d = seconds(duration)
        return f"{final.get(count, 0) / d:.2f} tokens/s" if d else "n/a"

    rows = [
        ("total duration", f"{seconds('total_duration'):.6f}s"),
        ("load duration", f"{seconds('load_duration'):.6f}s"),
        ("prompt eval count", f"{final.get('prompt_eval_count', 0)} token(s)"),
        ("prompt eval duration", f"{seconds('prompt_eval_duration'):.6f}s"),
        ("prompt eval rate", rate("prompt_eval_count", "prompt_eval_duration")),
        ("eval count", f"{final.get('eval_count', 0)} token(s)"),
        ("eval duration", f"{seconds('eval_duration'):.6f}s"),
        ("eval rate", rate("eval_count", "eval_duration")),
    ]
    return "".join(f"{k + ':':<22}{v}\n" for k, v in rows)


def read_message(read_line: Callable[[str], str]) -> str | None:
    """One user message; a line starting with \"\"\" opens a multi-line one. None at EOF."""
    read = read_input(read_line)
    return None if read is None else read[0]


def read_input(read_line: Callable[[str], str]) -> tuple[str, bool] | None:
    """(one user message, whether it was quoted in \"\"\"), None at EOF.

    A quoted message is text even when it starts with "/". Ctrl-C (KeyboardInterrupt) goes
    on to the caller, dropping what was typed so far.
    """
    try:
        line = read_line(">>> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line, False
    text = line.lstrip()[3:]
    if text.rstrip().endswith('"""') and text.strip() != "":
        return text.rstrip()[:-3], True
    lines = [text] if text else []
    while True:
        try:
            more = read_line("... ")
        except EOFError:
            return "\n".join(lines), True
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines).strip("\n"), True
        lines.append(more)


def repl(session: Session, read_line: Callable[[str], str] = input) -> None:
    """The interactive loop: messages, /commands, Ctrl-D or /bye to leave.

    Ctrl-C stops an answer (the conversation stays) or, at the prompt, drops the line typed
    and says how to leave, as `ollama run` does.
    """
    while True:
        try:
            read = read_input(read_line)
        except KeyboardInterrupt:
            session.out(f"\n{EXIT_HINT}\n")
            continue
        if read is None:
            session.out("\n")
            return
        message, quoted = read
        try:
            if not _turn(session, message, quoted):
                return
        except KeyboardInterrupt:
            session.out("\n")


def _turn(session: Session, message: str, quoted: bool) -> bool:
    """One message or /command; False when the session should end."""
    if not message.strip():
        return True
    if message.startswith("/") and not quoted:
        return session.command(message.strip())
    try:
        session.ask(message)
    except OrtServeError as exc:  # a refused request never ends the session
        session.out(f"\nError: {exc.message}\n")
    return True


def line_reader(history: Path | None) -> Callable[[str], str]:
    """input() with readline's line editing where it exists; each line read is saved to
    `history` (None: kept in memory only, as with ORTSERVE_NOHISTORY)."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return input
    if history is not None:
        with contextlib.suppress(OSError):  # none yet, or unreadable: start afresh
            readline.read_history_file(history)
        readline.set_history_length(HISTORY_LINES)

    def read_line(prompt: str) -> str:
        line = input(prompt)
        if history is not None and line.strip():
            _save_history(readline, history)
        return line

    return read_line


def _save_history(readline: Any, path: Path) -> None:
    """Write the history file, readable by its owner only (prompts can be private)."""
    with contextlib.suppress(OSError):  # a read-only home: the session goes on without
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        readline.write_history_file(path)


def history_path() -> Path:
    return Path.home() / ".ortserve" / "history"


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        try:
            return shlex.split(text)[0]
        except ValueError:
            return text[1:-1]
    return text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
