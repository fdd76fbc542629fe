"""The CLI as a user runs it: the real console script, a real library, one-line errors."""

import subprocess

import pytest

from tests.support.cli import ORTSERVE, assert_one_line_error, ortserve

pytestmark = pytest.mark.slow


def test_convert_list_show_cp_rm(tiny_checkpoint, library):
    checkpoint = str(tiny_checkpoint("qwen2"))
    for precision in ("int4", "int8", "fp16", "fp32"):
        out = ortserve(
            "convert", checkpoint, "--name", f"tiny:{precision}", "--precision", precision
        )
        assert out.stdout.startswith(f"tiny:{precision}")
        assert "verified: greedy_match " in out.stdout
        assert f": within what {precision} normally loses" in out.stdout  # the verdict
        assert "WARNING" not in out.stderr

    listing = ortserve("list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert [line.split()[0] for line in listing[1:]] == [
        "tiny:fp32", "tiny:fp16", "tiny:int8", "tiny:int4"
    ]  # fmt: skip

    shown = ortserve("show", "tiny:int4").stdout
    for expected in ("architecture", "qwen2", "quantization", "int4", "context length",
                     "1024", "embedding length", "completion", "tools", "top1 agreement"):  # fmt: skip
        assert expected in shown
    assert ortserve("show", "tiny:int4", "--license").stdout.startswith("MIT")
    assert "<|im_start|>" in ortserve("show", "tiny:int4", "--template").stdout
    modelfile = ortserve("show", "tiny:int4", "--modelfile").stdout.splitlines()
    (from_line,) = [line for line in modelfile if line.startswith("FROM ")]
    assert "/bundles/sha256-" in from_line

    ortserve("cp", "tiny:int4", "team/copy")

    def without_created(text):
        return [line for line in text.splitlines() if "created" not in line]

    assert without_created(ortserve("show", "team/copy").stdout) == without_created(shown)
    ortserve("rm", "tiny:int4")
    assert "team/copy:latest" in ortserve("ls").stdout
    assert "tiny:int4" not in ortserve("ls").stdout
    assert "ok" in ortserve("verify", "team/copy").stdout


def test_errors_are_one_line(tiny_checkpoint, library, tmp_path):
    assert_one_line_error(ortserve("show", "missing", check=False),
                          'model "missing:latest" not found')  # fmt: skip
    assert_one_line_error(ortserve("rm", "missing", check=False), "not found")
    assert_one_line_error(ortserve("cp", "missing", "other", check=False), "not found")
    assert_one_line_error(ortserve("show", "../etc/passwd", check=False), "'..'")
    assert_one_line_error(
        ortserve("convert", str(tmp_path / "nowhere"), "--name", "x", check=False),
        "does not exist",
    )
    assert_one_line_error(
        ortserve("convert", str(tiny_checkpoint("llama")), "--name", "a b", check=False),
        "must start with a letter or digit",
    )
    assert_one_line_error(
        ortserve("convert", str(tiny_checkpoint("llama")), "--block-size", "24", check=False),
        "power of two",
    )
    assert ortserve("list").stdout.strip() == "NAME    ID    SIZE    MODIFIED"


def test_version():
    from ortserve import __version__

    assert ortserve("--version").stdout.strip() == f"ortserve, version {__version__}"


def test_a_machine_set_up_for_ollama_serves_and_connects_the_same(served_library, tmp_path):
    """OLLAMA_HOST and OLLAMA_CONTEXT_LENGTH with no ORTSERVE_ ones: serve says which it read,
    `ps` finds the server, and a request with no num_ctx gets that context."""
    import json
    import os
    import urllib.error
    import urllib.request

    from tests.support.http import free_port
    from tests.support.wait import wait_until_up

    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORTSERVE_", "OLLAMA_"))}
    env.update(ORTSERVE_MODELS=str(served_library.root), OLLAMA_HOST=address,
               OLLAMA_CONTEXT_LENGTH="32", HOME=str(tmp_path))  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([ORTSERVE, "serve"], env=env, stdout=out, stderr=out)
    try:
        wait_until_up(f"http://{address}/", server, timeout=60, interval=0.2)
        assert "ortserve listening on http://" + address in log.read_text()
        assert "ORTSERVE_CONTEXT_LENGTH is unset: using OLLAMA_CONTEXT_LENGTH='32'" in (
            log.read_text()
        )
        ps = subprocess.run([ORTSERVE, "ps"], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
        assert ps.returncode == 0 and ps.stdout.split()[:2] == ["NAME", "ID"], ps.stderr

        def chat(**options):
            body = {"model": "tiny-chat", "stream": False, "options": options,
                    "messages": [{"role": "user", "content": "word " * 40}]}  # fmt: skip
            request = urllib.request.Request(f"http://{address}/api/chat",
                                             data=json.dumps(body).encode())  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, answer = chat(num_predict=1)
        assert status == 400 and "exceed the context length of 32" in answer["error"]
        assert chat(num_predict=1, num_ctx=512)[0] == 200  # a request's num_ctx still wins
    finally:
        server.terminate()
        server.wait(timeout=60)

    bad = subprocess.run([ORTSERVE, "serve"], env={**env, "OLLAMA_NUM_PARALLEL": "zero"},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr == "Error: OLLAMA_NUM_PARALLEL must be a whole number, got 'zero'\n"
