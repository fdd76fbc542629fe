"""CLI messages: the commands run in-process through click's runner on a real library."""

from __future__ import annotations

import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from converters.verify import EXPECTED, verdict
from ortserve.cli import _echo_verification, cli
from ortserve.config import VARIABLES


def invoke(*args: str, **env: str):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_serve_help_lists_every_variable_with_its_ollama_name():
    text = invoke("serve", "--help").output
    assert "Environment Variables:" in text
    for variable in VARIABLES:
        assert variable.name in text
        if variable.ollama:
            assert variable.ollama in text
    assert "ORTSERVE_CONTEXT_LENGTH" in text and "OLLAMA_NOHISTORY" in text


def test_a_bad_value_is_one_line_in_ortserves_words(library):
    result = invoke("serve", ORTSERVE_NUM_PARALLEL="zero")
    assert result.exit_code == 1
    assert result.stderr == "Error: ORTSERVE_NUM_PARALLEL must be a whole number, got 'zero'\n"
    result = invoke("serve", ORTSERVE_NUM_PARALLEL="", OLLAMA_NUM_PARALLEL="many")
    assert result.stderr == "Error: OLLAMA_NUM_PARALLEL must be a whole number, got 'many'\n"


def test_rm_of_a_missing_model_names_it_and_removes_nothing(library):
    library.add("kept", _bundle(library), {"details": {}, "capabilities": ["completion"]})
    result = invoke("rm", "kept", "nosuch")
    assert result.exit_code == 1
    assert result.stderr == ('Error: model "nosuch:latest" not found, nothing removed: '
                             "`ortserve list` shows the models in the library\n")  # fmt: skip
    assert library.exists("kept")  # checked before anything was removed


def test_prune_counts_the_leftovers_it_removes(library):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name in (f"convert-{dead}-a", f"pull-{dead}-b"):
        (library.tmp_dir / name / "sub").mkdir(parents=True)
    result = invoke("prune")
    assert result.output == (
        "removed 0 unused bundle(s) and blob(s), 2 leftover(s) of interrupted work\n"
    )
    assert list(library.tmp_dir.iterdir()) == []


@pytest.fixture
def other_server(tmp_path):
    """A real HTTP server that is not ortserve: "/" answers 200, /api/ps 404."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("variable", ["ORTSERVE_HOST", "OLLAMA_HOST"])
def test_ps_against_a_server_that_is_not_ortserve(library, other_server, variable):
    env = {"ORTSERVE_HOST": "", variable: other_server}
    result = invoke("ps", **env)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the server at http://{other_server} is not an ortserve or Ollama server "
        "(or it lacks /api/ps): it answered 404\n"
    )


# ---- convert's verdict ---------------------------------------------------------------------


def test_figures_the_suite_measures_are_within_the_norm():
    measured = {  # tests/integration/test_convert.py's tiny models, all-MiniLM-L6-v2
        "int4": {"top1_agreement": 0.6042, "logits_cosine": 0.9885},
        "int8": {"top1_agreement": 0.9583, "logits_cosine": 0.99994},
        "fp16": {"top1_agreement": 1.0, "logits_cosine": 1.0, "embedding_cosine_min": 0.999999},
        "fp32": {"top1_agreement": 1.0, "logits_cosine": 0.99999},
    }
    for precision, figures in measured.items():
        assert verdict(figures, precision) == (True, f"within what {precision} normally loses")
    assert set(EXPECTED) == {"fp32", "fp16", "int8", "int4"}


def test_convert_prints_a_verdict_and_flags_an_unusual_loss(capsys):
    figures = {"greedy_tokens": 32, "greedy_match": 6, "top1_agreement": 0.73,
               "logits_cosine": 0.99}  # fmt: skip
    _echo_verification(figures, "int4")
    out = capsys.readouterr()
    assert out.out == ("verified: greedy_match 6/32, top1_agreement 0.73, logits_cosine 0.99: "
                       "within what int4 normally loses\n")  # fmt: skip
    _echo_verification(figures, "fp16")  # fine for int4, far too much lost for fp16
    out = capsys.readouterr()
    assert out.out == "verified: greedy_match 6/32, top1_agreement 0.73, logits_cosine 0.99\n"
    assert out.err.startswith("WARNING: top1_agreement 0.73 < 0.95, logits_cosine 0.99 < 0.999: "
                              "more than fp16 normally loses")  # fmt: skip


def _bundle(library):
    staged = library.tmp_dir / "stage-kept"
    staged.mkdir(parents=True)
    (staged / "model.onnx").write_bytes(b"graph")
    return staged
