"""The Modelfile parser (Ollama's syntax) and render_modelfile reading back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from ortserve.errors import InvalidRequest
from ortserve.library.modelfile import (
    ModelfileError,
    parse_modelfile,
    quote,
    read_modelfile,
    render_modelfile,
    representable,
)
from ortserve.library.store import ModelInfo

FULL = '''# a comment line, then a blank one

from tiny-chat
PARAMETER temperature 0.5
parameter num_predict 3
Parameter stop "<|im_end|>"
PARAMETER stop """
"""
PARAMETER seed -1
PARAMETER use_mmap false
TEMPLATE """{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"""
SYSTEM """You are
  a "pirate".   """
MESSAGE user hi there
MESSAGE Assistant """ahoy
"""
LICENSE MIT
license """two
lines"""
'''


def test_every_instruction_in_any_case():
    spec = parse_modelfile(FULL, "/tmp")
    assert spec.from_ == "tiny-chat" and spec.from_path is None
    assert spec.parameters == {
        "temperature": 0.5,
        "num_predict": 3,
        "stop": ["<|im_end|>", "\n"],
        "seed": -1,
        "use_mmap": False,
    }
    assert spec.template == "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert spec.system == 'You are\n  a "pirate".   '
    assert spec.messages == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "ahoy\n"},
    ]
    assert spec.license == ["MIT", "two\nlines"]
    assert spec.lines["from"] == 3 and spec.lines["system"] == 12 and spec.lines["messages"] == 14


def test_values_are_typed():
    spec = parse_modelfile(
        "FROM m\nPARAMETER top_k 40\nPARAMETER top_p 1\nPARAMETER num_ctx 2048.0\n"
        "PARAMETER temperature 1e-2\nPARAMETER repeat_penalty 1.1\n",
        ".",
    )
    assert spec.parameters == {
        "top_k": 40, "top_p": 1, "num_ctx": 2048, "temperature": 0.01, "repeat_penalty": 1.1,
    }  # fmt: skip
    assert isinstance(spec.parameters["top_k"], int)


def test_single_quotes_hash_in_values_and_crlf():
    spec = parse_modelfile(
        'FROM m\r\nSYSTEM "two\r\nlines"\r\nTEMPLATE {{ x }} # not a comment\r\n', "."
    )
    assert spec.system == "two\nlines"
    assert spec.template == "{{ x }} # not a comment"


def test_later_system_and_template_replace_earlier_ones():
    spec = parse_modelfile("FROM m\nSYSTEM one\nSYSTEM two\n", ".")
    assert spec.system == "two" and spec.lines["system"] == 3


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("FROM m\n\nFORM x\n", 3, 'unknown instruction "FORM"'),
        ("FROM m\nPARAMETER temprature 1\n", 2, 'unknown parameter "temprature"'),
        ("FROM m\nPARAMETER temperature hot\n", 2, '"hot" is not a number'),
        ("FROM m\nPARAMETER num_predict 2.5\n", 2, '"2.5" is not an integer'),
        ("FROM m\nPARAMETER use_mmap maybe\n", 2, "not true or false"),
        (
            "FROM m\nPARAMETER temperature -1\n",
            2,
            "parameters.temperature must be between 0.0 and 100.0",
        ),
        ("FROM m\nPARAMETER top_p 3\n", 2, "parameters.top_p must be between"),
        ("FROM m\nPARAMETER temperature\n", 2, "PARAMETER needs a name and a value"),
        ("FROM m\nMESSAGE robot hi\n", 2, 'MESSAGE role must be one of "system", "user"'),
        ("FROM m\nMESSAGE user\n", 2, "MESSAGE needs a role and a text"),
        ("FROM m\n# c\nSYSTEM\n", 3, "SYSTEM needs a value"),
        ('FROM m\nSYSTEM """never\nclosed\n', 2, "quoted SYSTEM value is never closed"),
        ("FROM m\nFROM n\n", 2, "a second FROM (the first is on line 1)"),
        ("FROM m\nRENDERER x\n", 2, "RENDERER is not supported by ortserve"),
        ("FROM m\nDRAFT\n", 2, "DRAFT needs a value"),
        ("FROM m\nADAPTER ./nowhere\n", 2, "ADAPTER ./nowhere: no such file or directory"),
        ("FROM m\n!bang\n", 2, 'unknown instruction "!bang"'),
    ],
)
def test_errors_name_the_line(text, line, message):
    with pytest.raises(ModelfileError) as err:
        parse_modelfile(text, "/nonexistent")
    assert err.value.line == line
    assert err.value.message.startswith(f"Modelfile line {line}: ")
    assert message in err.value.message
    assert err.value.status == 400


def test_missing_from_and_missing_file(tmp_path):
    with pytest.raises(InvalidRequest, match="no FROM line"):
        parse_modelfile("# only a comment\nSYSTEM hi\n", ".")
    with pytest.raises(InvalidRequest, match="no Modelfile at"):
        read_modelfile(tmp_path / "Modelfile")


def test_relative_paths_resolve_against_the_modelfiles_directory(tmp_path, monkeypatch):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "one.onnx_adapter").write_bytes(b"y")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM ./bundle\nADAPTER lora\nADAPTER ./one.onnx_adapter\n")
    monkeypatch.chdir("/")
    spec = read_modelfile(modelfile)
    assert spec.from_path == (tmp_path / "bundle").resolve()
    assert spec.adapters == [
        ("adapter_config.json", (tmp_path / "lora" / "adapter_config.json").resolve()),
        ("adapter_model.safetensors", (tmp_path / "lora" / "adapter_model.safetensors").resolve()),
        ("one.onnx_adapter", (tmp_path / "one.onnx_adapter").resolve()),
    ]
    assert spec.lines["adapters"] == 2


def test_a_bom_is_ignored(tmp_path):
    path = tmp_path / "Modelfile"
    path.write_bytes("\ufeffFROM m\n".encode())
    assert read_modelfile(path).from_ == "m"


# ---- quoting and the round trip ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        " padded ",
        '"starts with a quote',
        'ends with a quote"',
        "two\nlines",
        "\n",
        'a line ending in a quote"\nand more',
        '"""',
        'has """ inside',
        "{% if x %}\n  {{ '<|im_start|>' + m['role'] }}\n{% endif %}\n",
        "",
        "tab\tinside",
    ],
)
def test_quote_reads_back(text):
    assert representable(text)
    spec = parse_modelfile(f"FROM m\nSYSTEM {quote(text)}\n", ".")
    assert spec.system == text


def test_text_no_quoting_can_carry_is_flagged():
    text = 'first\nline two ends like this"""\nlast'
    assert not representable(text)
    info = ModelInfo("x:latest", Path("/lib/bundles/sha256-ab"), {"system": text})
    assert "# warning: the next value" in render_modelfile(info)


def test_render_reads_back_as_the_same_values():
    manifest = {
        "bundle": "sha256-ab",
        "template": '{{ bos_token }}{% for m in messages %}"{{ m.content }}"\n{% endfor %}',
        "system": 'Talk like a "pirate".\nAlways.',
        "parameters": {
            "temperature": 0.7,
            "top_k": 20,
            "stop": ["<|im_end|>", "\n", "a b"],
            "num_predict": 5,
            "use_mmap": True,
        },  # fmt: skip
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": ' "A pirate."\n'},
        ],
        "license": "MIT License\n\nCopyright (c) someone",
    }
    info = ModelInfo("pirate:latest", Path("/lib/dir with space/bundles/sha256-ab"), manifest)
    text = render_modelfile(info)
    spec = parse_modelfile(text, "/elsewhere")
    assert spec.from_ == "/lib/dir with space/bundles/sha256-ab"
    assert spec.template == manifest["template"]
    assert spec.system == manifest["system"]
    assert spec.parameters == manifest["parameters"]
    assert spec.messages == manifest["messages"]
    assert spec.license == [manifest["license"]]
