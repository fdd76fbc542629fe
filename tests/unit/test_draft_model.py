"""A draft model's checks (engine/draft_model.py same_tokenizer; create's DRAFT checks) and
DRAFT in Modelfiles, on hand-made bundle files (no graph runs here: see
tests/integration/test_draft_model.py for the decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortserve.engine.draft_model import _common_prefix, same_tokenizer
from ortserve.errors import InvalidRequest
from ortserve.library.modelfile import ModelSpec, parse_modelfile, render_modelfile
from ortserve.models.create import create_model, prepare_create

VOCAB = {"<s>": 0, "</s>": 1, "hi": 2, "<unk>": 3}


def decoder_bundle(folder: Path, vocab: dict[str, int] = VOCAB, *, vocab_size: int = 4,
                   added: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """The files of a builder text decoder as continuous.supports reads them (its graph a
    stand-in that names GroupQueryAttention) and a real tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    decoder = {"filename": "model.onnx", "hidden_size": 8, "num_hidden_layers": 1,
               "num_key_value_heads": 2,
               "head_size": 4, "inputs": {"input_ids": "input_ids",
                                          "attention_mask": "attention_mask"},
               "outputs": {"logits": "logits"}}  # fmt: skip
    config = {"model": {"type": "qwen2", "context_length": 64, "vocab_size": vocab_size,
                        "eos_token_id": 1, "decoder": decoder},
              "search": {"past_present_share_buffer": True}}  # fmt: skip
    (folder / "genai_config.json").write_text(json.dumps(config))
    (folder / "model.onnx").write_bytes(b"stand-in GroupQueryAttention graph")
    tokenizer = Tokenizer(models.WordLevel(dict(vocab), "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in added])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 1 }}"}))
    return folder


def add_model(library, tmp_path: Path, name: str, **shape) -> Path:
    from ortserve.models.create import described

    folder = decoder_bundle(tmp_path / name, **shape)
    with library.staging() as staged:
        (staged / "b").mkdir()
        for f in folder.iterdir():
            (staged / "b" / f.name).write_bytes(f.read_bytes())
        return library.add(name, staged / "b", described(folder, name)).path


def test_same_tokenizer(tmp_path):
    target = decoder_bundle(tmp_path / "target")
    assert same_tokenizer(target, decoder_bundle(tmp_path / "same"))
    assert not same_tokenizer(target, decoder_bundle(tmp_path / "other", {**VOCAB, "hi": 4,
                                                                         "ho": 2}))  # fmt: skip
    assert not same_tokenizer(target, decoder_bundle(tmp_path / "added", added=("<x>",)))
    # every id must have a logit in the draft
    assert not same_tokenizer(target, decoder_bundle(tmp_path / "narrow", vocab_size=3))
    assert not same_tokenizer(target, tmp_path / "nowhere")


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert _common_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert _common_prefix([], [1]) == 0
    assert _common_prefix([5], [1]) == 0


def test_draft_and_parameter_draft_parse():
    assert parse_modelfile("FROM m\nDRAFT small\n", ".").draft == "small"
    spec = parse_modelfile('FROM m\nparameter DRAFT "small:q4"\nPARAMETER temperature 0\n', ".")
    assert spec.draft == "small:q4" and spec.lines["draft"] == 2
    assert spec.parameters == {"temperature": 0}  # not a request option


def test_create_records_the_draft_and_show_writes_it_back(library, tmp_path):
    add_model(library, tmp_path, "small")
    add_model(library, tmp_path, "big")
    info = create_model(library, "fast", parse_modelfile("FROM big\nDRAFT small\n", "."))
    assert info.manifest["draft"] == "small"
    text = render_modelfile(info)
    assert "DRAFT small\n" in text
    again = create_model(library, "again", parse_modelfile(text, "/"))
    assert again.manifest["draft"] == "small"
    # a model made from it keeps its draft unless its Modelfile sets another
    assert create_model(library, "child", ModelSpec(from_="fast")).manifest["draft"] == "small"


@pytest.mark.parametrize(
    "draft, message",
    [
        ("missing", 'no library model named "missing"'),
        ("../escape", "draft: "),
        ("/etc/passwd", "draft: "),
        ("base", "is not a model builder text decoder"),  # tests/support's stand-in bundle
        ("wide", "has another tokenizer than the model"),
    ],
)
def test_create_refuses_a_bad_draft(library, tmp_path, base, draft, message):
    add_model(library, tmp_path, "big")
    add_model(library, tmp_path, "wide", vocab={**VOCAB, "more": 4}, vocab_size=5)
    spec = parse_modelfile(f"FROM big\nDRAFT {draft}\n", ".")
    with pytest.raises(InvalidRequest) as err:
        prepare_create(library, "fast", spec)
    assert err.value.param == "draft" and err.value.status == 400
    assert message in err.value.message and err.value.message.startswith("Modelfile line 2: ")
    assert not library.exists("fast")


@pytest.fixture
def runtime(library):
    from tests.unit.test_create_api import RecordingRuntime

    return RecordingRuntime(library)


def test_api_create_takes_a_draft_and_refuses_a_bad_one(client, library, tmp_path):
    add_model(library, tmp_path, "small")
    add_model(library, tmp_path, "big")
    body = {"model": "fast", "from": "big", "draft": "small", "stream": False}
    assert client.post("/api/create", json=body).status_code == 200
    assert library.get("fast").manifest["draft"] == "small"
    for draft, status in (("nothing", 400), ("../../etc", 400), (7, 400)):
        response = client.post("/api/create", json={**body, "model": "bad", "draft": draft})
        assert response.status_code == status
        assert "draft" in response.get_json()["error"]
    assert not library.exists("bad")


def test_a_model_given_another_draft_is_loaded_again():
    from ortserve.engine.runtime import _same_model
    from ortserve.library.store import ModelInfo

    loaded = ModelInfo("m:latest", Path("/lib/bundles/sha256-a"), {"bundle": "sha256-a"})
    drafted = ModelInfo(loaded.name, loaded.path, {**loaded.manifest, "draft": "small"})
    assert _same_model(loaded, loaded) and _same_model(drafted, drafted)
    assert not _same_model(loaded, drafted)
