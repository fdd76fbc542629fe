"""The engine interface: backends chosen by a bundle's format through one registry.

The Runtime loads, generates with and unloads a model of the fake backend
(tests/support/fakes.py) without onnxruntime; the og backend's own behaviour is tested with
real models in tests/integration/.
"""

from __future__ import annotations

import json
import sys

import pytest

from ortserve.config import Settings
from ortserve.engine.backend import backend_for, model_format
from ortserve.engine.og_backend import OgBackend
from ortserve.engine.runtime import Runtime, planned_provider
from ortserve.engine.scheduler import apply_turn_options
from ortserve.engine.types import Finished, GenerationOptions, Guidance, TextChunk
from ortserve.errors import ModelLoadError
from ortserve.library import ModelInfo
from ortserve.library.bundle import decoder_config, genai_config, target_provider
from tests.support.bundles import write_bundle
from tests.support.fakes import FakeModel, add_fake_model, add_model, fake_backend


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """Any import of onnxruntime or onnxruntime_genai fails while the test runs."""
    for module in ("onnxruntime", "onnxruntime_genai"):
        monkeypatch.setitem(sys.modules, module, None)


def test_the_runtime_loads_and_generates_through_the_registered_backend(library, no_onnxruntime):
    add_fake_model(library, "fake")
    runtime = Runtime(Settings(models=library.root), library)
    try:
        with fake_backend() as backend:
            loaded = runtime.acquire("fake")
            assert isinstance(loaded, FakeModel) and backend.loaded == [loaded]
            events = list(loaded.generate(loaded.encode("hi"), GenerationOptions()))
            runtime.release(loaded)
            assert runtime.turn_counts() == {"fake:latest": (0, 0)}
            assert runtime.unload("fake") and loaded.stopped
    finally:
        runtime.shutdown()
    assert [type(e) for e in events] == [TextChunk, TextChunk, TextChunk, Finished]
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == "Hello world"
    assert loaded.turns[0][0] == [ord("h"), ord("i")]
    with pytest.raises(ImportError):
        import onnxruntime_genai  # noqa: F401  (the fixture's guard: og was never needed)


def test_the_planned_provider_comes_from_the_backend(library):
    info = add_fake_model(library, "fake")
    with fake_backend():
        assert planned_provider(info, "auto") == "fake"


def test_a_format_no_backend_loads_is_a_clear_load_error(library):
    add_fake_model(library, "fake")  # registered only inside fake_backend()
    runtime = Runtime(Settings(models=library.root), library)
    try:
        with pytest.raises(ModelLoadError, match="format 'fake'.*onnx-genai"):
            runtime.acquire("fake")
    finally:
        runtime.shutdown()


def test_the_format_is_the_manifests_else_read_from_the_bundle(library, tmp_path):
    assert model_format(add_model(library, "tiny")) == "onnx-genai"
    bundle = write_bundle(tmp_path / "bundle")
    assert model_format(ModelInfo("bare:latest", bundle, {})) == "onnx-genai"
    assert isinstance(backend_for(ModelInfo("bare:latest", bundle, {})), OgBackend)


def test_guidance_reaches_og_as_its_own_kind_and_data():
    calls = []

    class Recording:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, args))

    options = GenerationOptions(guidance=Guidance("regex", "a+"), temperature=0)
    apply_turn_options(Recording(), options, prompt_tokens=4)
    assert ("set_guidance", ("regex", "a+")) in calls


def test_genai_config_is_read_in_one_place(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    assert genai_config(bundle)["model"]["type"] == "qwen2"
    assert decoder_config(bundle)["filename"] == "model.onnx"
    assert target_provider(bundle) == "cpu"
    config = genai_config(bundle)
    config["model"]["decoder"]["session_options"] = {"provider_options": [{"CUDA": {}}]}
    (bundle / "genai_config.json").write_text(json.dumps(config))
    assert target_provider(bundle) == "cuda"
