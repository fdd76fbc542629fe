"""`ortserve pull` and POST /api/pull end to end: the real huggingface-hub client and the real
pull code against tests/hub.py serving bundles and checkpoints the fixtures built."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters import convert
from ortserve.library import Library
from tests.hub import LocalHub
from tests.integration.conftest import Server
from tests.support.http import free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow

MULTI = "test/tiny-chat-onnx"
CHECKPOINT = "test/tiny-qwen2"
PADDED = "test/padded-chat"
CPU, CUDA, DML = "cpu-int4-rtn-block-32", "cuda-fp16", "directml-int4"
# huggingface-hub writes what it receives in 10 MiB reads: a file must be larger than that
# for a partial download to reach the disk before a kill.
_PAD_BYTES = 24 * 1024 * 1024
_STALL_AT = 16 * 1024 * 1024
_HF_READ = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """A tiny qwen2 converted to an int4 CPU bundle (what a hub repo variant holds)."""
    library = Library(tmp_path_factory.mktemp("pull-source") / "models")
    info = convert(
        tiny_checkpoint("qwen2"), "tiny-chat", precision="int4", library=library, progress=False
    )
    return info.path


@pytest.fixture(scope="module")
def hub(tmp_path_factory, chat_bundle, tiny_checkpoint):
    """The test hub with a multi-variant bundle repo, a checkpoint repo and a large one."""
    repos = tmp_path_factory.mktemp("hub-repos")
    running = LocalHub()
    multi = repos / "multi"
    for variant, options in ((CPU, []), (CUDA, [{"cuda": {}}]), (DML, [{"dml": {}}])):
        _copy_bundle(chat_bundle, multi / variant, options)
    (multi / "LICENSE").write_text("MIT License\n")
    (multi / "README.md").write_text("# tiny chat, three variants\n")
    running.add_repo(MULTI, multi)
    running.add_repo(CHECKPOINT, tiny_checkpoint("qwen2"))
    padded = repos / "padded"
    _copy_bundle(chat_bundle, padded / CPU, [])
    # Not read by the model: only there to make a download long enough to kill half way.
    (padded / CPU / "padding.onnx.data").write_bytes(os.urandom(_PAD_BYTES))
    running.add_repo(PADDED, padded)
    running.start()
    yield running
    running.stop()


def _copy_bundle(bundle: Path, target: Path, provider_options: list) -> None:
    shutil.copytree(bundle, target)
    (target / "ortserve-files.json").unlink()
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["provider_options"] = (
        provider_options
    )
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def env(hub, library, tmp_path) -> dict[str, str]:
    """A CLI environment: the test hub, an empty huggingface-hub cache, the test library."""
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "ORTSERVE_MODELS": str(library.root),
        "ORTSERVE_HOST": f"127.0.0.1:{free_port()}",  # no server: `run` works in-process
    }


def cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ortserve", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def fetched(hub: LocalHub, repo: str, since: int = 0) -> set[str]:
    """The files of `repo` the hub sent (GETs) since request number `since`."""
    prefix = f"/{repo}/resolve/"
    return {
        r.path.split(prefix, 1)[1].split("/", 1)[1]
        for r in hub.log[since:]
        if r.method == "GET" and r.path.startswith(prefix)
    }


# ---- bundles -----------------------------------------------------------------------------------


def test_cli_pulls_the_cpu_variant_only_and_it_answers(hub, env, library):
    before = len(hub.log)
    result = cli(env, "pull", f"hf.co/{MULTI}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"hf.co/{MULTI}:latest  ")
    assert "pulling manifest" in result.stderr and "success" in result.stderr

    info = library.get(f"hf.co/{MULTI}")
    assert info.manifest["source"] == {
        "source": f"hf.co/{MULTI}",
        "revision": hub.repos[MULTI].commit,
        "variant": CPU,
    }
    got = fetched(hub, MULTI, since=before)
    assert got and all(path.startswith(f"{CPU}/") or path == "LICENSE" for path in got)
    assert f"{CPU}/model.onnx" in got
    assert library.verify(info.name)[0].ok

    listed = cli(env, "list")
    assert f"hf.co/{MULTI}:latest" in listed.stdout
    answer = cli(env, "run", f"hf.co/{MULTI}", "Hello there")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()


def test_a_named_variant_is_pulled_even_for_a_provider_this_machine_lacks(hub, env, library):
    before = len(hub.log)
    result = cli(env, "pull", f"{MULTI}:{CUDA}")
    assert result.returncode == 0, result.stderr
    info = library.get(f"{MULTI}:{CUDA}")
    assert info.manifest["source"]["variant"] == CUDA
    config = json.loads((info.path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    got = fetched(hub, MULTI, since=before)
    assert f"{CUDA}/model.onnx" in got
    assert all(path.startswith(f"{CUDA}/") or path == "LICENSE" for path in got)


def test_unknown_variant_repo_and_bad_ref_are_one_line_errors(hub, env, library):
    for args, message in [
        (["pull", f"{MULTI}:q4_k_m"], "variant 'q4_k_m' not found; variants: cpu-int4-rtn"),
        (["pull", "test/nothing-here"], "repository not found on http://127.0.0.1"),
        (["pull", "not a reference"], "invalid model reference 'not a reference'"),
        (["pull", f"{MULTI}@v9"], "revision 'v9' not found"),
    ]:
        result = cli(env, *args)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("Error: ") and message in lines[-1], result.stderr
        assert "Traceback" not in result.stderr
    assert library.list() == []


# ---- checkpoints -------------------------------------------------------------------------------


def test_a_checkpoint_repo_is_downloaded_converted_and_answers(hub, env, library):
    result = cli(env, "pull", f"hf.co/{CHECKPOINT}", "--precision", "int4", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "converting (int4)" in result.stderr

    info = library.get(f"hf.co/{CHECKPOINT}:latest")
    source = info.manifest["source"]
    assert source["source"] == f"hf.co/{CHECKPOINT}"
    assert source["revision"] == hub.repos[CHECKPOINT].commit
    assert source["options"]["precision"] == "int4"
    assert info.details["family"] == "qwen2"
    assert info.manifest["verification"]["logits_cosine"] > 0.9  # the converter's own check
    assert "model.safetensors" in fetched(hub, CHECKPOINT)

    answer = cli(env, "run", f"hf.co/{CHECKPOINT}", "Hello")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()
    again = cli(env, "pull", f"hf.co/{CHECKPOINT}")  # same commit, same precision: no work
    assert again.returncode == 0 and "already up to date" in again.stderr


# ---- short names from the catalog ------------------------------------------------------------


def _catalog(path: Path) -> Path:
    """A catalog of fixture repos: tiny-chat (latest = 1b) has the three bundle variants,
    tiny-qwen is the checkpoint converted at int8."""
    variants = {"cpu": CPU, "cuda": CUDA, "dml": DML}
    models = {
        "tiny-chat": {"tags": {"latest": "1b", "1b": {"bundles": {
            p: {"repo": MULTI, "variant": v} for p, v in variants.items()}}}},
        "tiny-qwen": {"tags": {"latest": {"checkpoint": {"repo": CHECKPOINT, "precision": "int8"}}}},
    }  # fmt: skip
    path.write_text(json.dumps({"models": models}))
    return path


def test_cli_pulls_a_short_name_from_the_librarys_catalog_and_lists_it(hub, env, library):
    library.root.mkdir(parents=True, exist_ok=True)
    _catalog(library.root / "catalog.json")  # the library root's catalog extends the shipped one
    listed = cli(env, "list", "--catalog")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "latest" in rows["tiny-chat:1b"] and "cpu bundle" in rows["tiny-chat:1b"]
    assert "cpu, cuda, dml" in rows["tiny-chat:1b"]
    assert f"{CHECKPOINT} (int8)" in rows["tiny-qwen:latest"]
    assert "llama3.2:3b" in rows and "qwen2.5:0.5b" in rows  # the shipped entries too

    before = len(hub.log)
    result = cli(env, "pull", "tiny-chat")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny-chat:latest  ")
    info = library.get("tiny-chat")
    assert info.manifest["source"] == {"source": f"hf.co/{MULTI}", "catalog": "tiny-chat:1b",
                                       "revision": hub.repos[MULTI].commit, "variant": CPU}  # fmt: skip
    got = fetched(hub, MULTI, since=before)
    assert f"{CPU}/model.onnx" in got
    assert all(path.startswith(f"{CPU}/") or path == "LICENSE" for path in got)
    answer = cli(env, "run", "tiny-chat", "Hello there")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()

    unknown = cli(env, "pull", "tiny-chatt")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    last = unknown.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: unknown model 'tiny-chatt': not in the catalog of short names")
    assert "(close: tiny-chat" in last


def test_a_short_name_for_a_checkpoint_is_converted_by_its_recipe(hub, env, library, tmp_path):
    env = {**env, "ORTSERVE_CATALOG": str(_catalog(tmp_path / "catalog.json"))}
    result = cli(env, "pull", "tiny-qwen", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "converting (int8)" in result.stderr
    info = library.get("tiny-qwen:latest")
    source = info.manifest["source"]
    assert (source["source"], source["catalog"]) == (f"hf.co/{CHECKPOINT}", "tiny-qwen:latest")
    assert source["options"]["precision"] == "int8" and info.details["quantization"] == "int8"
    answer = cli(env, "run", "tiny-qwen", "Hello")
    assert answer.returncode == 0, answer.stderr


def test_ollama_client_pulls_a_short_name(hub, library, tmp_path):
    import ollama

    catalog = _catalog(tmp_path / "catalog.json")
    server = Server(library, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"),
                    ORTSERVE_CATALOG=str(catalog))  # fmt: skip
    try:
        client = ollama.Client(host=server.url)
        progress = list(client.pull("tiny-chat", stream=True))
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        assert any(p.status == f"downloading {CPU}/model.onnx" for p in progress)
        assert [m.model for m in client.list().models] == ["tiny-chat:latest"]
        reply = client.chat("tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                            options={"num_predict": 8})  # fmt: skip
        assert reply.message.content
        with pytest.raises(ollama.ResponseError) as unknown:
            client.pull("llama9")
        assert unknown.value.status_code == 404
        assert "unknown model 'llama9'" in unknown.value.error
    finally:
        server.stop()


# ---- the official ollama client against `ortserve serve` ------------------------------------


def test_ollama_client_pull_streams_progress(hub, library, tmp_path):
    import ollama

    server = Server(library, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    try:
        client = ollama.Client(host=server.url)
        progress = list(client.pull(f"hf.co/{MULTI}:{CPU}", stream=True))
        assert progress[0].status == "pulling manifest"
        assert progress[-1].status == "success"
        files = [p for p in progress if p.status.startswith("downloading ")]
        model = [p for p in files if p.status.endswith("/model.onnx")]
        size = hub.repos[MULTI].files[f"{CPU}/model.onnx"]
        assert model[-1].digest == f"sha256:{size.sha256}"
        assert model[-1].total == model[-1].completed == size.size
        assert {p.status for p in progress} >= {"verifying sha256 digest", "writing manifest"}

        names = [m.model for m in client.list().models]
        assert f"hf.co/{MULTI}:{CPU}" in names
        reply = client.chat(f"hf.co/{MULTI}:{CPU}", messages=[{"role": "user", "content": "Hi"}],
                            options={"num_predict": 8})  # fmt: skip
        assert reply.message.content

        assert client.pull(f"hf.co/{MULTI}:{CPU}").status == "success"  # stream: false
        with pytest.raises(ollama.ResponseError) as missing:
            client.pull("test/nothing-here")
        assert missing.value.status_code == 404
        assert "repository not found" in missing.value.error
        with pytest.raises(ollama.ResponseError) as bad:
            client.pull("a b c", stream=True).__next__()
        assert bad.value.status_code == 400
    finally:
        server.stop()


# ---- killed half way, concurrent, offline -----------------------------------------------------


def test_a_pull_killed_half_way_leaves_nothing_and_the_next_resumes(hub, env, library, tmp_path):
    stalled = hub.stall(f"{CPU}/padding.onnx.data", after=_STALL_AT)
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "pull", PADDED], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert stalled.wait(120), "the download never reached the stall"
        blobs = Path(env["HF_HOME"]) / "hub" / "models--test--padded-chat" / "blobs"
        wait_for(lambda: any(p.stat().st_size >= _HF_READ for p in blobs.glob("*.incomplete")),
                 timeout=60)  # fmt: skip
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        hub.release()
    assert process.returncode == -signal.SIGKILL
    assert library.list() == []
    assert cli(env, "list").stdout.strip().splitlines()[1:] == []

    result = cli(env, "pull", PADDED)
    assert result.returncode == 0, result.stderr
    resumed = [r.range for r in hub.downloads(f"{CPU}/padding.onnx.data")]
    assert resumed[-1] == f"bytes={_HF_READ}-", resumed
    info = library.get(f"{PADDED}:latest")
    assert (info.path / "padding.onnx.data").stat().st_size == _PAD_BYTES
    assert library.verify(info.name)[0].ok


def test_two_pulls_at_once_share_one_download(hub, env, library):
    stalled = hub.stall(f"{CPU}/model.onnx", after=1000)
    command = [sys.executable, "-m", "ortserve", "pull", f"{MULTI}:{CPU}"]
    gets_before = len(hub.downloads(f"{CPU}/model.onnx"))
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert stalled.wait(120)
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        waited = any(line.startswith("waiting for another pull") for line in _until_waiting(second))
    finally:
        hub.release()
    out_first, err_first = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)
    assert first.returncode == 0, err_first
    assert second.returncode == 0, err_second
    assert waited and "already up to date" in err_second
    assert out_first.split()[:2] == out_second.split()[:2]  # same name, same bundle
    assert len(hub.downloads(f"{CPU}/model.onnx")) - gets_before == 1


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "refused"])
def test_without_a_network_pull_fails_fast_and_clearly(offline, env, library):
    if offline == "HF_HUB_OFFLINE":
        env = {**env, "HF_HUB_OFFLINE": "1"}
        expected = "no network: HF_HUB_OFFLINE is set"
    else:
        env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens
        expected = f"no network connection to {env['HF_ENDPOINT']}"
    started = time.monotonic()
    result = cli(env, "pull", f"hf.co/{MULTI}")
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: cannot pull 'hf.co/{MULTI}': ") and expected in last
    assert "Traceback" not in result.stderr
    assert library.list() == []


def _until_waiting(process):
    """The second pull's stderr lines, up to the one saying it waits for the first."""
    for line in process.stderr:
        yield line
        if line.startswith("waiting for another pull"):
            return
