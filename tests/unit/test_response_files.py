"""Stored Responses API answers under the library root (ORTSERVE_RESPONSES_STORE=library): what
two processes sharing a library (the cluster's replicas) both see. Two apps over one library
stand for two replicas; tests/integration/test_cluster_state.py runs real ones on Ray."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from ortserve.api import create_app
from ortserve.config import Settings, SettingsError
from ortserve.serving.response_files import FOLDER, LibraryResponseStore
from ortserve.serving.store import ResponseNotFound, ResponseStore, StoredResponse, new_id
from tests.support.fakes import RENDER_ALL_TEMPLATE as TEMPLATE
from tests.support.fakes import ManyTurnsRuntime as Runtime
from tests.support.fakes import add_model, prompt_text
from tests.support.http import openai_error


def stored(response_id: str | None = None, text: str = "hi") -> StoredResponse:
    response_id = new_id("resp") if response_id is None else response_id
    return StoredResponse({"id": response_id, "object": "response"},
                          [{"role": "user", "content": text}])  # fmt: skip


def test_what_one_store_puts_another_over_the_same_folder_reads(tmp_path):
    one, other = LibraryResponseStore(tmp_path), LibraryResponseStore(tmp_path)
    answer = stored(text="héllo")
    one.put(answer)
    assert other.get(answer.response["id"]) == answer
    assert len(other) == 1
    other.delete(answer.response["id"])
    with pytest.raises(ResponseNotFound) as missing:
        one.get(answer.response["id"], "previous_response_id")
    assert missing.value.param == "previous_response_id"
    assert "Previous response with id" in missing.value.message
    with pytest.raises(ResponseNotFound):
        one.delete(answer.response["id"])


@pytest.mark.parametrize("response_id", [
    "../../manifests/x", "resp_" + "a" * 47, "resp_" + "A" * 48, "resp_" + "a" * 48 + "/x",
    "/etc/passwd", "", ".resp_" + "a" * 48, "resp_" + "a" * 48 + "\n",
])  # fmt: skip
def test_an_id_of_another_shape_names_no_file(tmp_path, response_id):
    """Any id that is not exactly new_id("resp")'s shape is not found, never a path."""
    (tmp_path / "secret.json").write_text(json.dumps({"response": {}, "conversation": []}))
    store = LibraryResponseStore(tmp_path)
    with pytest.raises(ResponseNotFound):
        store.get(response_id)
    with pytest.raises(ResponseNotFound):
        store.delete(response_id)
    with pytest.raises(ValueError):
        store.put(stored(response_id))
    assert (tmp_path / "secret.json").exists()


def test_the_store_keeps_the_most_recently_used(tmp_path):
    store = LibraryResponseStore(tmp_path, capacity=2)
    a, b, c = stored(), stored(), stored()
    store.put(a)
    time.sleep(0.01)
    store.put(b)
    time.sleep(0.01)
    store.get(a.response["id"])  # now b is the least recently used
    time.sleep(0.01)
    store.put(c)
    assert len(store) == 2 and store.get(a.response["id"]) and store.get(c.response["id"])
    with pytest.raises(ResponseNotFound):
        store.get(b.response["id"])


def test_an_answer_past_the_size_bound_is_not_stored(tmp_path):
    store = LibraryResponseStore(tmp_path, max_entry_bytes=1000)
    big = stored(text="x" * 2000)
    store.put(big)
    assert len(store) == 0
    with pytest.raises(ResponseNotFound):
        store.get(big.response["id"])


def test_a_damaged_file_and_abandoned_temporary_files(tmp_path):
    store = LibraryResponseStore(tmp_path)
    damaged = new_id("resp")
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / f"{damaged}.json").write_text("{not json")
    with pytest.raises(ResponseNotFound):
        store.get(damaged)
    abandoned = tmp_path / FOLDER / f".{damaged}.json.k2j3h4"
    abandoned.write_text("{")
    fresh = tmp_path / FOLDER / f".{new_id('resp')}.json.a1b2c3"
    fresh.write_text("{")
    hour_ago = time.time() - 3600
    os.utime(abandoned, (hour_ago, hour_ago))
    store.put(stored())
    assert not abandoned.exists() and fresh.exists()  # a write in progress elsewhere is kept


def test_threads_putting_and_trimming_at_once(tmp_path):
    store = LibraryResponseStore(tmp_path, capacity=20)
    errors = []

    def work() -> None:
        try:
            for _ in range(30):
                store.put(stored())
        except Exception as exc:  # pragma: no cover - what the test looks for
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(store) == 20


def test_the_setting_chooses_the_store(library):
    assert Settings.from_env({}).responses_store == "memory"
    assert Settings.from_env({"ORTSERVE_RESPONSES_STORE": "Library"}).responses_store == "library"
    with pytest.raises(SettingsError, match="ORTSERVE_RESPONSES_STORE"):
        Settings.from_env({"ORTSERVE_RESPONSES_STORE": "redis"})
    memory = create_app(Settings(models=library.root))
    on_disk = create_app(Settings(models=library.root, responses_store="library"))
    assert isinstance(memory.extensions["ortserve"].responses, ResponseStore)
    assert isinstance(on_disk.extensions["ortserve"].responses, LibraryResponseStore)


def test_a_conversation_continues_in_another_app_over_the_same_library(library):
    """Two replicas: turn 1 on one, turn 2, GET and DELETE on the other (404 with memory)."""
    add_model(library, "tiny", template=TEMPLATE)
    runtime = Runtime(library)
    apps = [create_app(Settings(models=library.root, responses_store="library"), runtime=runtime)
            for _ in range(2)]  # fmt: skip
    one, other = (app.test_client() for app in apps)
    first = one.post("/v1/responses", json={"model": "tiny", "input": "Hi"}).get_json()
    second = other.post("/v1/responses", json={"model": "tiny", "input": "And?",
                                                 "previous_response_id": first["id"]})  # fmt: skip
    assert second.status_code == 200, second.get_json()
    assert prompt_text(runtime) == "<user>Hi<assistant>Hello world<user>And?<assistant>"
    assert other.get(f"/v1/responses/{first['id']}").get_json() == first
    assert other.delete(f"/v1/responses/{first['id']}").status_code == 200
    openai_error(one.get(f"/v1/responses/{first['id']}"), 404)

    memory = [create_app(Settings(models=library.root), runtime=runtime) for _ in range(2)]
    made = memory[0].test_client().post("/v1/responses", json={"model": "tiny", "input": "Hi"})
    openai_error(memory[1].test_client().get(f"/v1/responses/{made.get_json()['id']}"), 404)
