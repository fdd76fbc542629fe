"""A converted Qwen3 checkpoint with Qwen3's chat template is a thinking model; the plain one is not.

The tiny qwen3 checkpoint ships the ChatML template of every fixture; a copy of it gets Qwen3's
own template (as a real Qwen3 checkpoint saves it, chat_template.jinja), and both are
converted the ordinary way, so the capability comes from what conversion reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from converters import convert
from ortserve.engine.prompts import ChatTemplate, build_chat_prompt
from ortserve.library import Library
from tests.integration.conftest import Server

pytestmark = pytest.mark.slow

QWEN3 = (Path(__file__).parents[1] / "data" / "qwen3_chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def thinking_library(tmp_path_factory, tiny_checkpoint) -> Library:
    """tiny-qwen3 (the fixtures' template) and tiny-qwen3-thinking (Qwen3's template)."""
    scratch = tmp_path_factory.mktemp("thinking")
    library = Library(scratch / "models")
    plain = tiny_checkpoint("qwen3")
    thinking = scratch / "qwen3-thinking"
    shutil.copytree(plain, thinking)
    (thinking / "chat_template.jinja").write_text(QWEN3, encoding="utf-8")
    convert(plain, "tiny-qwen3", precision="int4", library=library, progress=False)
    convert(thinking, "tiny-qwen3-thinking", precision="int4", library=library, progress=False)
    return library


def test_the_library_lists_thinking_for_qwen3s_template_only(thinking_library):
    assert "thinking" in thinking_library.get("tiny-qwen3-thinking").capabilities
    assert "thinking" not in thinking_library.get("tiny-qwen3").capabilities
    assert "completion" in thinking_library.get("tiny-qwen3").capabilities


def test_the_converted_bundle_renders_qwen3s_switch(thinking_library):
    template = ChatTemplate.from_bundle(thinking_library.get("tiny-qwen3-thinking").path)
    assert template is not None and template.thinking and template.can_disable_thinking

    def prompt(think):
        text, _ = build_chat_prompt(
            template, [{"role": "user", "content": "Hi"}], system=None, tools=None,
            count_tokens=len, num_ctx=10_000, think=think,
        )  # fmt: skip
        return text

    assert prompt(False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt(None).endswith("<|im_start|>assistant\n")


def test_show_over_http_lists_thinking(thinking_library):
    server = Server(thinking_library)
    try:
        shown = {
            name: httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=30).json()
            for name in ("tiny-qwen3-thinking", "tiny-qwen3")
        }
    finally:
        server.stop()
    assert "thinking" in shown["tiny-qwen3-thinking"]["capabilities"]
    assert "thinking" not in shown["tiny-qwen3"]["capabilities"]
