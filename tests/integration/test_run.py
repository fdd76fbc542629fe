"""`ortserve run` as a new user runs it: in-process with no server, or through a running one."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pexpect
import pytest

from tests.support.http import free_port

pytestmark = pytest.mark.slow


def run_cli(args, library, host, stdin_text=None):
    env = {**os.environ, "ORTSERVE_MODELS": str(library.root), "ORTSERVE_HOST": host}
    return subprocess.run([sys.executable, "-m", "ortserve", "run", *args], input=stdin_text,
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


def test_run_answers_in_process_without_a_server(served_library):
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli(["tiny-chat", "Hello", "there", "--verbose"], served_library, nobody)
    assert result.returncode == 0, result.stderr
    answer, _, stats = result.stdout.partition("total duration:")
    assert answer.strip()
    assert "eval rate:" in stats and "tokens/s" in stats


def test_run_reads_a_piped_prompt(served_library):
    result = run_cli(["tiny-chat"], served_library, f"127.0.0.1:{free_port()}", "Hi from a pipe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_run_uses_the_running_server(server, served_library):
    result = run_cli(["tiny-llama", "Hello", "--keepalive", "10m"], served_library,
                     f"127.0.0.1:{server.port}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with urllib.request.urlopen(server.url + "/api/ps") as response:
        loaded = {m["name"] for m in json.loads(response.read())["models"]}
    assert "tiny-llama:latest" in loaded  # the server loaded it, so the CLI went through it


def test_run_unknown_model_is_one_line(served_library):
    result = run_cli(["nope", "hi"], served_library, f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.strip() == 'Error: model "nope:latest" not found, try pulling it first'


def test_interactive_session_on_a_terminal(served_library, tmp_path):
    env = {**os.environ, "ORTSERVE_MODELS": str(served_library.root), "HOME": str(tmp_path),
           "ORTSERVE_HOST": f"127.0.0.1:{free_port()}"}  # fmt: skip
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "run", "tiny-chat"],
                               stdin=follower, stdout=follower, stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    screen = _read_until(leader, ">>> ")
    steps = [("/set parameter num_predict 4", ">>> "), ('"""first line', "... "),
             ('second line"""', ">>> "), ("/show parameters", ">>> "), ("/clear", ">>> "),
             ("/bye", None)]  # fmt: skip
    for line, prompt in steps:
        os.write(leader, (line + "\n").encode())
        screen += _read_until(leader, prompt)
    assert process.wait(timeout=30) == 0
    os.close(leader)
    assert "Set parameter 'num_predict' to '4'" in screen
    assert "num_predict                    4\r\n" in screen  # Ollama's form
    assert "Cleared session context" in screen


def _read_until(fd, marker, timeout=60.0):
    """Read the terminal until `marker` shows up (or the program ends)."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096).decode(errors="replace")
        except OSError:
            return seen
        if not chunk:
            return seen
        seen += chunk
        if marker and seen.rstrip().endswith(marker.strip()):
            return seen
    raise AssertionError(f"timed out waiting for {marker!r}; saw: {seen[-500:]!r}")


# ---- Ctrl-C, Ctrl-D, quoted messages, history: a real terminal (pexpect) ---------------------


class PacedProxy:
    """Forwards to a real server, recording each POST's body and pacing the streamed lines
    (one per `delay` s), so that an answer of the tiny model (about 1000 tokens in 0.3 s)
    lasts long enough for a Ctrl-C to land in the middle of it."""

    def __init__(self, upstream: str, delay: float = 0.05):
        self.upstream, self.delay = upstream, delay
        self.bodies: list[tuple[str, dict]] = []  # (path, JSON body) of each POST
        self.streams: list[list[dict]] = []  # each POST's chunks passed on to the client
        self.client_gone = threading.Event()  # the client closed a stream midway
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._forward(urllib.request.Request(proxy.upstream + self.path))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                relayed: list[dict] = []
                proxy.bodies.append((self.path, json.loads(raw)))
                proxy.streams.append(relayed)
                self._forward(urllib.request.Request(
                    proxy.upstream + self.path, data=raw, method="POST",
                    headers={"Content-Type": "application/json"}), relayed)  # fmt: skip

            def _forward(self, request, relayed=None):
                try:
                    upstream = urllib.request.urlopen(request, timeout=60)
                except urllib.error.HTTPError as exc:
                    upstream = exc
                with upstream:
                    self.send_response(upstream.status)
                    self.send_header("Content-Type", upstream.headers["Content-Type"])
                    self.end_headers()
                    try:
                        for line in upstream:
                            if relayed is not None:
                                time.sleep(proxy.delay)
                                relayed.append(json.loads(line))
                            self.wfile.write(line)
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        proxy.client_gone.set()  # closing `upstream` cancels the turn

        return Handler


@pytest.fixture
def paced(server):
    proxy = PacedProxy(server.url)
    yield proxy
    proxy.close()


def spawn_run(library, home, **variables):
    """`ortserve run tiny-chat` on a pseudo-terminal, with a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_NOHISTORY", "_HOST"))}
    env.update(ORTSERVE_MODELS=str(library.root), HOME=str(home), **variables)
    return pexpect.spawn(sys.executable, ["-m", "ortserve", "run", "tiny-chat"], env=env,
                         encoding="utf-8", timeout=60, dimensions=(50, 200))  # fmt: skip


def chats(proxy):
    return [body for path, body in proxy.bodies if path == "/api/chat" and body["messages"]]


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(served_library, paced, tmp_path):
    child = spawn_run(served_library, tmp_path, ORTSERVE_HOST=paced.address)
    child.expect(">>> ")
    child.sendline("/set parameter temperature 0")  # one answer, the same every run
    child.expect(">>> ")
    child.sendline("Tell me a long story")
    deadline = time.monotonic() + 30
    while not (chats(paced) and len(paced.streams[-1]) >= 5) and time.monotonic() < deadline:
        time.sleep(0.02)
    relayed = paced.streams[-1]
    child.sendintr()  # Ctrl-C, as the terminal sends it
    started = time.monotonic()
    child.expect(">>> ", timeout=10)
    back_after = time.monotonic() - started
    assert back_after < 2, back_after  # the paced answer would have taken ~40 s
    assert paced.client_gone.wait(5)  # the stream was closed, so the server stops the turn
    shown = "".join(c["message"]["content"] for c in relayed)
    assert not any(c.get("done") for c in relayed)  # it really was cut short
    assert "Error" not in child.before

    child.sendline("/set parameter num_predict 3")
    child.expect(">>> ")
    child.sendline("And then?")
    child.expect(">>> ")
    messages = chats(paced)[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "Tell me a long story"
    assert messages[1]["content"] and shown.startswith(messages[1]["content"])
    assert messages[2]["content"] == "And then?"

    child.sendintr()  # at an empty prompt: how to leave
    child.expect(">>> ")
    assert "Use Ctrl + d or /bye to exit." in child.before
    child.sendline('"""/set parameter top_k 3')  # quoted: text for the model, not a command
    child.expect(r"\.\.\. ")
    child.sendline('is a command?"""')
    child.expect(">>> ")
    assert chats(paced)[-1]["messages"][-1]["content"] == "/set parameter top_k 3\nis a command?"
    assert "top_k" not in chats(paced)[-1]["options"]

    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / ".ortserve" / "history").read_text()
    assert "Tell me a long story" in history  # kept between sessions, as Ollama's
    assert (tmp_path / ".ortserve" / "history").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("variable", ["ORTSERVE_NOHISTORY", "OLLAMA_NOHISTORY"])
def test_no_history_file_when_asked(served_library, paced, tmp_path, variable):
    # OLLAMA_HOST too: a machine set up for Ollama finds the server (ORTSERVE_HOST unset)
    child = spawn_run(served_library, tmp_path, OLLAMA_HOST=paced.address, **{variable: "1"})
    child.expect(">>> ")
    child.sendline("/set parameter num_predict 2")
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert chats(paced)[-1]["messages"] == [{"role": "user", "content": "hello"}]
    assert not (tmp_path / ".ortserve" / "history").exists()
