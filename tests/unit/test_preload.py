"""ORTSERVE_PRELOAD: models loaded in the background at start-up, kept loaded, and /readyz
answering 503 until they are (the real server: tests/integration/test_preload.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from ortserve.api import create_app
from ortserve.config import Settings
from ortserve.engine.preload import Preload
from ortserve.engine.resident import Resident
from ortserve.engine.runtime import Runtime
from ortserve.errors import ModelLoadError, ModelNotFound
from tests.support.fakes import FakeRuntime, add_model
from tests.support.wait import wait_for


def test_the_setting_is_a_list_of_names():
    settings = Settings.from_env({"ORTSERVE_PRELOAD": " tiny-chat, all-minilm:latest ,,"})
    assert settings.preload == ("tiny-chat", "all-minilm:latest")
    assert Settings.from_env({}).preload == ()


# ---- Preload: the background loads and what they report ---------------------------------------


class GatedLoads:
    """A load function whose loads wait for the test to let them finish."""

    def __init__(self, fail: dict[str, Exception] | None = None):
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self.fail = fail or {}

    def __call__(self, name: str) -> str:
        self.started.append(name)
        self.gates.setdefault(name, threading.Event()).wait(10)
        if name in self.fail:
            raise self.fail[name]
        return name

    def finish(self, name: str) -> None:
        self.gates.setdefault(name, threading.Event()).set()


def test_loading_until_every_model_is_loaded_in_order():
    loads = GatedLoads()
    preload = Preload(loads, ["a", "b", "a"]).start()
    wait_for(lambda: loads.started == ["a"])
    report = preload.report()
    assert (report.status, report.models, report.error) == (
        "loading", {"a": "loading", "b": "waiting"}, None)  # fmt: skip
    loads.finish("a")
    wait_for(lambda: loads.started == ["a", "b"])
    assert preload.report().models == {"a": "loaded", "b": "loading"}
    loads.finish("b")
    preload.join(5)
    assert preload.report().status == "ready"
    assert loads.started == ["a", "b"]  # a name given twice loads once


def test_a_failure_names_the_model_and_the_others_still_load():
    loads = GatedLoads(fail={"nope": ModelNotFound("nope:latest")})
    for name in ("nope", "b"):
        loads.finish(name)
    preload = Preload(loads, ["nope", "b"]).start()
    preload.join(5)
    report = preload.report()
    assert report.status == "failed"
    assert report.models == {"nope": "failed", "b": "loaded"}
    assert (
        report.error
        == 'model "nope" failed to preload: model "nope:latest" not found, try pulling it first'
    )


def test_an_unexpected_error_is_not_shown_as_it_is():
    """/readyz needs no key: a raw exception (a server path) stays in the log."""
    loads = GatedLoads(fail={"a": OSError("/srv/secret/models/x: permission denied")})
    loads.finish("a")
    preload = Preload(loads, ["a"]).start()
    preload.join(5)
    report = preload.report()
    assert report.status == "failed" and "/srv" not in report.error
    assert report.error.startswith('model "a" failed to preload')


def test_stop_loads_nothing_more():
    loads = GatedLoads()
    preload = Preload(loads, ["a", "b"]).start()
    wait_for(lambda: loads.started == ["a"])
    preload.stop()
    loads.finish("a")
    preload.join(5)
    assert loads.started == ["a"]


# ---- /readyz --------------------------------------------------------------------------------------


class PreloadingRuntime(FakeRuntime):
    """FakeRuntime with Runtime.preload, each load gated by the test."""

    def __init__(self, library, loads: GatedLoads):
        super().__init__(library)
        self.loads = loads

    def preload(self, name: str) -> str:
        return self.loads(name)


@pytest.fixture
def models(library):
    add_model(library, "tiny")
    return library


def readyz_app(library, loads, names):
    settings = Settings(models=library.root, preload=tuple(names))
    app = create_app(settings, runtime=PreloadingRuntime(library, loads))
    app.testing = True
    return app


def test_readyz_is_503_loading_until_the_preloaded_models_are_loaded(models):
    loads = GatedLoads()
    app = readyz_app(models, loads, ["tiny"])
    client = app.test_client()
    wait_for(lambda: loads.started == ["tiny"])
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "loading", "models": {"tiny": "loading"}}
    assert client.get("/healthz").status_code == 200  # alive meanwhile: no restart
    loads.finish("tiny")
    app.extensions["ortserve"].preload.join(5)
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "models": {"tiny": "loaded"}}


def test_readyz_is_503_naming_a_model_that_failed(models):
    loads = GatedLoads(fail={"tiny": ModelLoadError('failed to load model "tiny": bad graph')})
    loads.finish("tiny")
    app = readyz_app(models, loads, ["tiny"])
    app.extensions["ortserve"].preload.join(5)
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "failed" and body["models"] == {"tiny": "failed"}
    assert body["error"] == 'model "tiny" failed to preload: failed to load model "tiny": bad graph'


def test_readyz_needs_no_key_while_loading(models):
    """Probes send no key: /readyz answers them with keys set."""
    loads = GatedLoads()
    settings = Settings(models=models.root, preload=("tiny",),
                        api_keys=(("app", "k" * 32),))  # fmt: skip
    app = create_app(settings, runtime=PreloadingRuntime(models, loads))
    try:
        assert app.test_client().get("/readyz").status_code == 503
        assert app.test_client().get("/api/tags").status_code == 401
    finally:
        loads.finish("tiny")


# ---- Runtime.preload: kept loaded, never evicted ------------------------------------------------


@dataclass(eq=False, kw_only=True)
class StubModel(Resident):
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True

    def pending(self) -> int:
        return 0


def stub_runtime(library, **settings) -> Runtime:
    runtime = Runtime(Settings(models=library.root, **settings), library)
    runtime._load = lambda info: StubModel(info=info, provider="cpu")
    return runtime


def names(runtime: Runtime) -> set[str]:
    return {m.name for m in runtime.loaded_models()}


def test_a_preloaded_model_outlives_the_keep_alive(library):
    for name in ("tiny", "other"):
        add_model(library, name)
    runtime = stub_runtime(library, keep_alive=0.05)
    try:
        assert runtime.preload("tiny") == "tiny:latest"
        runtime.release(runtime.acquire("other"))
        assert runtime.loaded("tiny").expires_at is None  # kept forever
        wait_for(lambda: names(runtime) == {"tiny:latest"})  # other's keep-alive ran out
        runtime.release(runtime.acquire("tiny"))  # a request without keep_alive: still forever
        time.sleep(0.2)
        assert names(runtime) == {"tiny:latest"}
        runtime.release(runtime.acquire("tiny"), keep_alive=0)  # a request's own keep_alive wins
        assert names(runtime) == set()
    finally:
        runtime.shutdown()


def test_a_preloaded_model_is_never_evicted(library):
    for name in ("tiny", "other", "third"):
        add_model(library, name)
    runtime = stub_runtime(library, max_loaded_models=1)
    try:
        runtime.preload("tiny")
        runtime.release(runtime.acquire("other"))
        assert names(runtime) == {"tiny:latest", "other:latest"}  # over the limit, not evicted
        runtime.release(runtime.acquire("third"))
        assert names(runtime) == {"tiny:latest", "third:latest"}  # the unpinned one went
    finally:
        runtime.shutdown()


def test_a_failed_preload_pins_nothing(library):
    add_model(library, "tiny")
    runtime = stub_runtime(library)

    def broken(info):
        raise ModelLoadError("bad graph")

    runtime._load = broken
    try:
        with pytest.raises(ModelLoadError):
            runtime.preload("tiny")
        assert runtime._pinned == set()
    finally:
        runtime.shutdown()
