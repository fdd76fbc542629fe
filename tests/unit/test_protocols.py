"""The protocol registry (api/protocol.py): app, security, openapi and the cluster read it."""

from __future__ import annotations

import pytest

from ortserve.api import create_app, protocol
from ortserve.api.openapi import routes
from ortserve.config import Settings
from ortserve.errors import ServerBusy


def test_every_blueprint_of_the_app_comes_from_a_protocol(tmp_path):
    app = create_app(Settings(models=tmp_path))
    names = {p.blueprint.name for p in protocol.protocols()}
    assert set(app.blueprints) == names
    assert {"native", "openai", "responses", "anthropic", "ops"} <= names


@pytest.mark.parametrize(
    ("path", "name"),
    [("/api/chat", "native"), ("/v1/chat/completions", "openai"), ("/v1/files/x", "openai"),
     ("/v1/responses/resp_1", "responses"), ("/v1/messages/count_tokens", "anthropic"),
     ("/healthz", None), ("/v1x", None)],
)  # fmt: skip
def test_the_most_specific_owner_shapes_a_paths_errors(path, name):
    owner = protocol.owner(path)
    assert (owner.name if owner else None) == name


def test_error_bodies_take_the_owners_shape():
    assert protocol.error_body("/api/x", 400, "bad", "invalid_request_error") == {"error": "bad"}
    openai = protocol.error_body("/v1/x", 400, "bad", "invalid_request_error", "model")
    assert openai["error"]["param"] == "model"
    assert protocol.error_body("/v1/messages", 404, "no", "not_found_error")["type"] == "error"


def test_generation_paths_are_exact_or_patterns():
    assert protocol.generates("/v1/messages")
    assert not protocol.generates("/v1/messages/count_tokens")
    assert protocol.generates("/api/embed") and not protocol.generates("/api/tags")


def test_every_protocol_that_owns_paths_can_render_its_errors():
    for p in protocol.protocols():
        if p.owns:
            assert p.error_body is not None and p.error_schema, p.name
            body = p.error_body(503, "busy", "server_busy", None, None)
            assert "busy" in str(body)
        if p.stream_error is not None:
            assert p.stream_error(ServerBusy("busy")).endswith("\n\n")


def test_the_openapi_table_is_every_protocols_rows():
    assert routes() == tuple(r for p in protocol.protocols() for r in p.routes)
