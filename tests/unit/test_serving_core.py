"""The serving core (serving/core.py, serving/embedding.py) against the fake engine backend.

A real Runtime loads models of the fake backend (tests/support/fakes.py): no HTTP, no
protocol, no onnxruntime. What every protocol relies on is checked here once: the model is
resolved once and leased for the exchange, options are the request's over the model's
parameters (parsed when it loads), the rules that combine fields, choices, cancellation and
keep-alive, embeddings.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ortserve.config import Settings
from ortserve.engine import resident
from ortserve.engine.runtime import Runtime
from ortserve.engine.types import Finished, TextChunk
from ortserve.errors import InvalidRequest, ModelNotFound
from ortserve.options import Sampling
from ortserve.serving import core, embedding
from ortserve.serving.embedding import EmbeddingRequest
from ortserve.serving.requests import ChatPrompt, GenerationRequest, TextPrompt
from ortserve.serving.tools import tool_spec
from tests.support.fakes import add_fake_model, fake_backend
from tests.support.tools import WEATHER

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


@pytest.fixture
def backend():
    with fake_backend() as backend:
        yield backend


@pytest.fixture
def state(library, backend):
    add_fake_model(library, "chat", capabilities=["completion", "tools"])
    add_fake_model(library, "vectors", capabilities=["embedding"])
    settings = Settings(models=library.root, keep_alive=300.0)
    runtime = Runtime(settings, library)
    yield SimpleNamespace(library=library, runtime=runtime, settings=settings)
    runtime.shutdown()


def chat(text="Hi", **fields) -> GenerationRequest:
    return GenerationRequest("chat", [ChatPrompt([{"role": "user", "content": text}])], **fields)


def test_a_turn_streams_its_events_and_releases_the_model(state, backend):
    exchange = core.start(state, chat())
    events = [event for _, event in exchange.events()]
    exchange.close()
    assert [type(e) for e in events] == [TextChunk, TextChunk, TextChunk, Finished]
    assert exchange.choices[0].content == "Hello world"
    model = backend.loaded[0]
    rendered = "<user>Hi<assistant>"  # the fake template, rendered by the real prompt builder
    assert model.turns[0][0] == [ord(c) for c in rendered]
    assert exchange.usage().prompt_tokens == len(rendered)
    assert exchange.usage().completion_tokens == 3
    assert model.active == 0 and model.expires_at is not None  # released: keep-alive runs


def test_the_model_is_resolved_once_per_request(state, monkeypatch):
    calls = []
    original = state.library.get
    monkeypatch.setattr(state.library, "get", lambda name: calls.append(name) or original(name))
    core.start(state, chat()).finish()
    assert calls == ["chat"]


def test_an_unknown_model_is_404_and_a_model_without_the_capability_400_before_loading(
    state, backend
):
    with pytest.raises(ModelNotFound):
        core.start(state, GenerationRequest("nope", [TextPrompt("x")]))
    with pytest.raises(InvalidRequest) as refused:
        core.start(state, GenerationRequest("vectors", [TextPrompt("x")], kind="generate"))
    assert refused.value.param == "model" and "does not support generate" in str(refused.value)
    assert backend.loaded == []


def test_options_are_the_requests_over_the_models_parameters(state, backend):
    # the fake manifest's parameters: temperature 0.5, stop <end> <eot>
    core.start(state, chat(sampling=Sampling(top_k=7, stop=("X",)))).finish()
    options = backend.loaded[0].turns[0][1]
    assert (options.temperature, options.top_k, options.stop) == (0.5, 7, ("X",))


def test_the_models_parameters_are_parsed_when_it_loads_not_per_request(
    state, backend, monkeypatch
):
    parsed = []
    original = resident.model_sampling
    monkeypatch.setattr(resident, "model_sampling", lambda p: parsed.append(p) or original(p))
    for _ in range(3):
        core.start(state, chat()).finish()
    assert len(parsed) == 1 and len(backend.loaded) == 1
    # a create that changes the parameters applies to the loaded weights, parsed again once
    add_fake_model(state.library, "chat", capabilities=["completion", "tools"],
                   parameters={"temperature": 0.1})  # fmt: skip
    core.start(state, chat()).finish()
    core.start(state, chat()).finish()
    assert len(parsed) == 2 and len(backend.loaded) == 1
    assert backend.loaded[0].turns[-1][1].temperature == 0.1


@pytest.mark.parametrize(("fields", "tools", "schema"), [
    ({}, "tools", "format"),  # Ollama's names, the default
    ({"schema": "response_format"}, "tools", "response_format"),
    ({"schema": "generationConfig.responseSchema"}, "tools", "generationConfig.responseSchema"),
])  # fmt: skip
def test_tools_and_a_schema_are_refused_together_in_the_protocols_names(state, fields, tools,
                                                                        schema):  # fmt: skip
    request = chat(tools=tool_spec([WEATHER], None, True), schema=SCHEMA, fields=fields)
    with pytest.raises(InvalidRequest) as refused:
        core.start(state, request)
    assert str(refused.value) == f"{tools} and {schema} cannot be combined"
    assert refused.value.param == tools


def test_tool_choice_none_is_a_plain_turn_that_may_take_a_schema(state):
    request = chat(tools=tool_spec([WEATHER], "none", True), schema=SCHEMA)
    core.check_combinations(request)  # no error


@pytest.mark.parametrize("guided", ["schema", "tools"])
def test_thinking_with_a_grammar_is_refused_naming_the_protocols_field(state, guided):
    extra = (
        {"schema": SCHEMA} if guided == "schema" else {"tools": tool_spec([WEATHER], None, True)}
    )
    request = chat(think=True, fields={"think": "thinking"}, **extra)
    with pytest.raises(InvalidRequest) as refused:
        core.start(state, request)
    assert refused.value.param == "thinking"
    assert str(refused.value).startswith("thinking cannot be combined with ")


def test_n_choices_are_submitted_together(state, backend):
    exchange = core.start(state, chat(n=3))
    assert len(backend.loaded[0].turns) == 3  # all submitted before any is read
    choices = exchange.finish()
    assert [c.content for c in choices] == ["Hello world"] * 3


def test_hang_up_cancels_the_turns_and_close_releases(state, backend):
    exchange = core.start(state, chat())
    exchange.hang_up()
    assert all(choice.turn.cancelled for choice in exchange.choices)
    exchange.close()
    assert backend.loaded[0].active == 0


def test_keep_alive_zero_unloads_when_the_exchange_closes(state, backend):
    core.start(state, chat(keep_alive=0)).finish()
    assert backend.loaded[0].stopped and state.runtime.loaded_models() == []


def test_count_tokens_renders_without_generating(state, backend):
    assert core.count_tokens(state, chat("Hello")) == len("<user>Hello<assistant>")
    assert backend.loaded[0].turns == []


def test_embeddings_go_through_the_core(state, backend):
    result = embedding.embed(state, EmbeddingRequest("vectors", ["a", "bcd"], dimensions=2))
    np.testing.assert_array_equal(result.vectors, [[1, 1], [3, 1]])
    assert result.prompt_tokens == 4 and result.load_duration_ns == 1
    assert backend.loaded[0].active == 0


def test_embeddings_refuse_a_chat_model_and_too_many_texts_before_loading(state, backend):
    with pytest.raises(InvalidRequest) as refused:
        embedding.embed(state, EmbeddingRequest("chat", ["a"]))
    assert "does not support embeddings" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        embedding.embed(state, EmbeddingRequest("vectors", ["a"] * 2049, param="requests"))
    assert refused.value.param == "requests"
    assert backend.loaded == []
