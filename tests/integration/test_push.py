"""`ortserve push` and POST /api/push end to end: a converted model with every manifest part
(parameters, template, system, messages, a LoRA adapter, licence) pushed from one library to
tests/hub.py with the real huggingface-hub client, pulled into another, and served."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ollama
import pytest
import requests

from ortserve.library import Library
from tests.hub import LocalHub
from tests.integration.conftest import Server
from tests.support.http import free_port

pytestmark = pytest.mark.slow
TOKEN = "hf_test_write_token"
KEY = "push-test-key-0123456789"
_LFS = (".onnx", ".data", ".onnx_data")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_checkpoint) -> Library:
    """tiny-chat: an int4 qwen2 with an extra weights-sized file, an .onnx_adapter, and a
    Modelfile's worth of parameters, template, system, messages and licence."""
    from converters import convert
    from converters.adapter import convert_peft_adapter
    from ortserve.models.adapters import attach_adapters
    from tests.support.lora import write_peft_adapter

    root = tmp_path_factory.mktemp("push-source")
    library = Library(root / "models")
    checkpoint = tiny_checkpoint("qwen2")
    base = convert(checkpoint, "base", precision="int4", library=library, progress=False)
    convert_peft_adapter(write_peft_adapter(checkpoint, root / "lora", seed=3),
                         root / "style.onnx_adapter")  # fmt: skip
    fields = attach_adapters(library, base, [("style.onnx_adapter", root / "style.onnx_adapter")])
    with library.staging("extra") as staged:  # a second LFS file, uploaded before model.onnx
        bundle = staged / "bundle"
        shutil.copytree(library.bundle_path(fields["bundle"]), bundle)
        (bundle / "extra.onnx.data").write_bytes(os.urandom(256 * 1024))
        digest = library.add_bundle(bundle)
    library.save("tiny-chat", {
        **base.manifest, **fields, "bundle": digest,
        "parameters": {"temperature": 0.0, "num_predict": 8, "stop": ["<|im_end|>", "###"]},
        "system": "You answer in one short line.",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        "license": "Apache-2.0\n\nA tiny test model.",
    })  # fmt: skip
    return library


@pytest.fixture
def hub():
    running = LocalHub().start()
    running.write_token = TOKEN
    yield running
    running.stop()


def _env(hub: LocalHub, library_root: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": TOKEN,
            "ORTSERVE_MODELS": str(library_root),
            "ORTSERVE_HOST": f"127.0.0.1:{free_port()}", **extra}  # fmt: skip


def cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ortserve", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _modelfile(env, name: str, root: Path) -> str:
    """`show --modelfile` with the library's root and the model's name left out."""
    shown = cli(env, "show", "--modelfile", name)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.replace(str(root), "LIBRARY").replace(name, "NAME")


def _lfs_oids(library: Library, name: str) -> list[str]:
    """sha256 of the model's LFS files (its weights and graphs) in the order a push sends them."""
    info = library.get(name)
    index = (info.path / "ortserve-files.json").read_text()
    return [f["sha256"] for f in json.loads(index)["files"] if f["path"].endswith(_LFS)]


def test_a_pushed_model_pulled_elsewhere_is_the_same_and_answers(source, hub, tmp_path):
    push_env = _env(hub, source.root, tmp_path)
    pushed = cli(push_env, "push", "tiny-chat", "hf.co/test/tiny-chat:cpu-int4")
    assert pushed.returncode == 0, pushed.stderr
    assert "retrieving manifest" in pushed.stderr and "success" in pushed.stderr
    assert len(hub.commits) == 1
    commit = hub.requests("POST", "/api/models/test/tiny-chat/commit/")
    assert [r.authorization for r in commit] == [f"Bearer {TOKEN}"]

    target = Library(tmp_path / "elsewhere")
    pull_env = _env(hub, target.root, tmp_path, HF_TOKEN="")
    pulled = cli(pull_env, "pull", "hf.co/test/tiny-chat:cpu-int4")
    assert pulled.returncode == 0, pulled.stderr
    original, copy = source.get("tiny-chat"), target.get("hf.co/test/tiny-chat:cpu-int4")
    assert copy.digest == original.digest
    assert copy.manifest["adapters"] == original.manifest["adapters"]
    assert _modelfile(pull_env, copy.name, target.root) == _modelfile(
        push_env, original.name, source.root
    )
    assert target.verify(copy.name)[0].ok

    answer = cli(pull_env, "run", copy.name, "Hello there")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


def test_without_a_write_token_the_push_fails_clearly(source, hub, tmp_path):
    result = cli(_env(hub, source.root, tmp_path, HF_TOKEN=""), "push", "tiny-chat",
                 "test/denied")  # fmt: skip
    assert result.returncode == 1
    assert "refused the write (HTTP 401): set HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr and hub.commits == []


def test_a_push_killed_half_way_shows_nothing_and_the_next_sends_only_the_rest(
    source, hub, tmp_path
):
    env = _env(hub, source.root, tmp_path)
    *before, last = _lfs_oids(source, "tiny-chat")
    assert before, "the model needs two LFS files for this test"
    reached = hub.stall(last, after=1024)
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "push", "tiny-chat",
                                "test/resumed:cpu"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert reached.wait(120), "the push never reached the last file"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        hub.release()
    assert hub.commits == [] and set(hub.files("test/resumed")) == {".gitattributes"}
    assert all(len(hub.uploads(oid)) == 1 for oid in before)

    result = cli(env, "push", "tiny-chat", "test/resumed:cpu")
    assert result.returncode == 0, result.stderr
    assert all(len(hub.uploads(oid)) == 1 for oid in before)  # the hub had them: not re-sent
    assert len(hub.uploads(last)) == 2 and last in hub.objects
    assert len(hub.commits) == 1 and "cpu/ortserve-manifest.json" in hub.files("test/resumed")


def test_ollama_client_push_streams_progress_behind_the_key_guard(source, hub, tmp_path):
    source.copy("tiny-chat", "hf.co/test/ollama:cpu")
    server = Server(source, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"),
                    ORTSERVE_API_KEYS=f"ci:{KEY}")  # fmt: skip
    try:
        denied = requests.post(server.url + "/api/push", json={"model": "hf.co/test/ollama:cpu"},
                               timeout=30)  # fmt: skip
        assert denied.status_code == 401 and hub.requests("POST") == []

        client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})
        started = time.monotonic()
        events = list(client.push("hf.co/test/ollama:cpu", stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "retrieving manifest" and statuses[-1] == "success"
        layers = [e for e in events if (e.status or "").startswith("pushing ") and e.total]
        assert layers and all(e.digest.startswith("sha256:") for e in layers)
        assert time.monotonic() - started < 120
        assert "cpu/genai_config.json" in hub.files("test/ollama")

        body = {"model": "tiny-chat", "destination": "hf.co/test/other", "stream": False}
        whole = requests.post(server.url + "/api/push", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert whole.status_code == 200 and whole.json() == {"status": "success"}
        assert "ortserve-manifest.json" in hub.files("test/other")  # no variant: the root
    finally:
        server.stop()
