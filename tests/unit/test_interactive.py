"""The `ortserve run` session: slash commands, multi-line input, what it sends."""

import pytest

from ortserve import interactive


class RecordingBackend:
    """Answers every chat with 'ok' in two chunks and remembers the bodies (plumbing only)."""

    def __init__(self):
        self.bodies = []

    def stream(self, path, body):
        self.bodies.append((path, body))
        yield {"message": {"role": "assistant", "content": "o"}, "done": False}
        yield {"message": {"role": "assistant", "content": "k"}, "done": True,
               "eval_count": 2, "eval_duration": 1_000_000_000}  # fmt: skip


def session(verbose=False):
    out = []
    s = interactive.Session(RecordingBackend(), "m", keep_alive="1m", verbose=verbose,
                            out=out.append)  # fmt: skip
    return s, out


def feed(lines):
    items = iter(lines)

    def read_line(prompt):
        try:
            return next(items)
        except StopIteration:
            raise EOFError from None

    return read_line


def test_conversation_history_system_and_parameters_are_sent():
    s, out = session()
    interactive.repl(s, feed(["/set system Be brief.", "/set parameter temperature 0.2",
                              "/set parameter stop END", "hello", "again", "/bye", "ignored"]))  # fmt: skip
    path, body = s.backend.bodies[-1]
    assert path == "/api/chat"
    assert body["keep_alive"] == "1m"
    assert body["options"] == {"temperature": 0.2, "stop": ["END"]}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    assert "".join(out).count("ok\n") == 2


def test_clear_forgets_the_conversation():
    s, _ = session()
    interactive.repl(s, feed(["first", "/clear", "second"]))
    assert s.backend.bodies[-1][1]["messages"] == [{"role": "user", "content": "second"}]


def test_multi_line_messages():
    read = feed(['"""line one', "line two", 'end"""'])
    assert interactive.read_message(read) == "line one\nline two\nend"
    assert interactive.read_message(feed(['"""one line"""'])) == "one line"


def test_verbose_prints_ollama_timings():
    s, out = session(verbose=True)
    s.ask("hi")
    text = "".join(out)
    assert "eval count:           2 token(s)" in text
    assert "eval rate:            2.00 tokens/s" in text


def test_unknown_command_and_help():
    s, out = session()
    assert s.command("/nonsense")
    assert "Unknown command '/nonsense'" in out[-1]
    assert s.command("/?")
    assert "/set parameter" in out[-1]
    assert not s.command("/exit")


def test_parse_value():
    assert interactive.parse_value("temperature", "0.5", None) == 0.5
    assert interactive.parse_value("top_k", "40", None) == 40
    assert interactive.parse_value("stop", '"<|end|>"', ["a"]) == ["a", "<|end|>"]


def test_a_bad_parameter_is_refused_at_once_and_the_session_goes_on():
    s, out = session()
    interactive.repl(s, feed(["/set parameter temperature hot", "/set parameter top_k -3",
                              "/set parameter temprature 1", "/set parameter top_k 5", "hi"]))  # fmt: skip
    text = "".join(out)
    assert 'Error: invalid value for parameter "temperature": "hot" is not a number' in text
    assert "Error: parameters.top_k" in text
    assert 'Error: unknown parameter "temprature"' in text
    assert s.backend.bodies[-1][1]["options"] == {"top_k": 5}
    assert "ok\n" in text


class RefusingBackend(RecordingBackend):
    """Refuses the second chat as a server would refuse a request."""

    calls = 0

    def stream(self, path, body):
        from ortserve.client import ServerError

        self.calls += 1
        if self.calls == 2:
            raise ServerError("prompt is too long")
        yield from super().stream(path, body)


def test_a_refused_message_neither_ends_the_session_nor_loses_the_conversation():
    out = []
    s = interactive.Session(RefusingBackend(), "m", keep_alive=None, verbose=False, out=out.append)
    interactive.repl(s, feed(["first", "too long", "third"]))
    assert "Error: prompt is too long" in "".join(out)
    assert s.messages == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "ok"},
    ]


class ThinkingBackend(RecordingBackend):
    """A thinking model's stream: the thought first, then the answer."""

    def stream(self, path, body):
        self.bodies.append((path, body))
        yield {"message": {"role": "assistant", "content": "", "thinking": "Hmm, "}, "done": False}
        yield {"message": {"role": "assistant", "content": "", "thinking": "two."}, "done": False}
        yield {"message": {"role": "assistant", "content": "2"}, "done": True}


def test_the_thought_shows_apart_from_the_answer_as_ollama_shows_it():
    out = []
    s = interactive.Session(ThinkingBackend(), "m", keep_alive=None, verbose=False,
                            out=out.append)  # fmt: skip
    assert s.ask("1 + 1?") == "2"
    assert "".join(out) == "Thinking...\nHmm, two.\n...done thinking.\n\n2\n"
    assert "think" not in s.backend.bodies[-1][1]  # the model's default
    assert s.messages[-1] == {"role": "assistant", "content": "2"}  # the thought is not history


def test_think_flags_reach_the_request_and_hidden_thinking_prints_only_the_answer():
    out = []
    s = interactive.Session(ThinkingBackend(), "m", keep_alive=None, verbose=False,
                            out=out.append, think=True, hide_thinking=True)  # fmt: skip
    s.ask("1 + 1?")
    assert s.backend.bodies[-1][1]["think"] is True and "".join(out) == "2\n"
    interactive.repl(s, feed(["/set nothink", "again"]))
    assert s.backend.bodies[-1][1]["think"] is False


# ---- Ctrl-C, quoted commands, /show parameters, history ---------------------------------------


class InterruptedBackend(RecordingBackend):
    """The second chat is interrupted (Ctrl-C) after part of its answer; records the close."""

    calls = 0
    closed = False

    def stream(self, path, body):
        self.calls += 1
        if self.calls != 2:
            yield from super().stream(path, body)
            return
        self.bodies.append((path, body))
        try:
            yield {"message": {"role": "assistant", "content": "par"}, "done": False}
            yield {"message": {"role": "assistant", "content": "tial"}, "done": False}
            raise KeyboardInterrupt  # as SIGINT lands while the answer streams
        finally:
            self.closed = True


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation():
    out = []
    s = interactive.Session(InterruptedBackend(), "m", keep_alive=None, verbose=False,
                            out=out.append)  # fmt: skip
    interactive.repl(s, feed(["first", "second", "third"]))
    assert s.backend.closed
    assert s.backend.bodies[-1][1]["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "partial"},  # what the user saw
        {"role": "user", "content": "third"},
    ]
    assert "partial\n" in "".join(out)


def test_ctrl_c_before_any_answer_forgets_that_message():
    s, _ = session()
    s.backend.stream = lambda path, body: iter(_interrupt())
    with pytest.raises(KeyboardInterrupt):
        s.ask("lost")
    assert s.messages == []


def _interrupt():
    raise KeyboardInterrupt
    yield


def interrupting(lines):
    """feed(), where the item KeyboardInterrupt stands for Ctrl-C at the prompt."""
    items = iter(lines)

    def read_line(prompt):
        item = next(items, EOFError)
        if item in (KeyboardInterrupt, EOFError):
            raise item
        return item

    return read_line


def test_ctrl_c_at_the_prompt_says_how_to_leave_and_drops_a_half_typed_message():
    s, out = session()
    lines = [KeyboardInterrupt, '"""half', "typed", KeyboardInterrupt, "hello"]
    interactive.repl(s, interrupting(lines))
    assert "".join(out).count("\nUse Ctrl + d or /bye to exit.\n") == 2
    assert s.backend.bodies[-1][1]["messages"] == [{"role": "user", "content": "hello"}]
    assert out[-1] == "\n"  # then Ctrl-D: the session ends


def test_a_quoted_message_starting_with_a_slash_is_text():
    s, out = session()
    interactive.repl(s, feed(['"""/set parameter top_k 3', 'is this a command?"""',
                              '"""/bye"""', "/show parameters"]))  # fmt: skip
    sent = [body["messages"][-1]["content"] for _, body in s.backend.bodies]
    assert sent == ["/set parameter top_k 3\nis this a command?", "/bye"]
    assert s.options == {} and out[-2] == "No parameters set.\n"  # out[-1]: Ctrl-D's newline
    assert interactive.read_input(feed(["/bye"])) == ("/bye", False)


def test_show_parameters_prints_one_line_per_value_as_ollama():
    s, out = session()
    interactive.repl(s, feed(["/set parameter stop .", '/set parameter stop "<|end|>"',
                              "/set parameter temperature 0.5", "/show parameters"]))  # fmt: skip
    assert out[-2] == (
        'stop                           "."\n'
        'stop                           "<|end|>"\n'
        "temperature                    0.5\n"
    )


def test_history_is_saved_unless_turned_off(tmp_path, monkeypatch):
    import readline

    def typing(prompt):  # input() on a terminal: readline adds each line to its history
        line = next(typed)
        readline.add_history(line)
        return line

    typed = iter(["first line", "/bye"])
    monkeypatch.setattr("builtins.input", typing)
    readline.clear_history()
    path = tmp_path / ".ortserve" / "history"
    read_line = interactive.line_reader(path)
    assert read_line(">>> ") == "first line"
    assert path.read_text().splitlines() == ["first line"]
    assert path.stat().st_mode & 0o077 == 0  # prompts can be private
    readline.clear_history()
    interactive.line_reader(path)  # a new session reads it back
    assert readline.get_history_item(1) == "first line"

    typed = iter(["secret"])  # ORTSERVE_NOHISTORY: kept in memory, never written
    assert interactive.line_reader(None)(">>> ") == "secret"
    assert path.read_text().splitlines() == ["first line"]
