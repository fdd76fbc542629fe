"""LoRA adapters end to end: attach_adapters -> library.save -> `ortserve serve` -> /api/chat.

The adapted model must answer like transformers with the LoRA merged into its weights, the
base model must keep answering as before, and the adapted bundle must share the base's
weights (hard links) instead of copying them.
"""

from __future__ import annotations

import os

import ollama
import pytest

from ortserve.errors import InvalidRequest
from ortserve.library import Library
from ortserve.models.adapters import attach_adapters
from tests.integration.conftest import Server
from tests.support.lora import merged_reference, with_external_data, write_peft_adapter

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.0}
MESSAGES = [{"role": "user", "content": "Tell me about the library."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    """A library with fp32 llama + its PEFT-adapted twin, int4 qwen2 + an .onnx_adapter twin."""
    from converters import convert
    from converters.adapter import convert_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    library = Library(root / "models")
    llama_ckpt, qwen_ckpt = tiny_checkpoint("llama"), tiny_checkpoint("qwen2")
    inline = convert(llama_ckpt, "inline", precision="fp32", library=library, progress=False)
    llama = with_external_data(library, "llama", inline)
    library.delete("inline")
    peft = write_peft_adapter(llama_ckpt, root / "my-lora")
    fields = attach_adapters(library, llama, [("my-lora", peft)])
    library.save("llama-lora", {**llama.manifest, **fields})
    chat = convert(qwen_ckpt, "chat", precision="int4", library=library, progress=False)
    qwen_peft = write_peft_adapter(qwen_ckpt, root / "qwen-lora", seed=3)
    convert_peft_adapter(qwen_peft, root / "style.onnx_adapter")  # float32: the int4 graph's
    fields = attach_adapters(library, chat, [("style.onnx_adapter", root / "style.onnx_adapter")])
    library.save("chat-lora", {**chat.manifest, **fields})
    server = Server(library)
    yield {"library": library, "server": server, "llama": llama_ckpt, "peft": peft,
           "client": ollama.Client(host=server.url)}  # fmt: skip
    server.stop()


def reference_answer(checkpoint, peft_dir) -> str:
    """transformers' greedy answer to MESSAGES (LoRA merged, or the base with None)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    model = merged_reference(checkpoint, peft_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=GREEDY["num_predict"],
                             pad_token_id=0)  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def chat(client, model: str, **kwargs):
    return client.chat(model=model, messages=MESSAGES, options=GREEDY, stream=False, **kwargs)


def test_adapted_model_answers_like_the_merged_reference(setup):
    client = setup["client"]
    base_before = chat(client, "llama").message.content
    adapted = chat(client, "llama-lora")
    assert adapted.message.content == reference_answer(setup["llama"], setup["peft"])
    assert adapted.message.content != base_before
    assert base_before == reference_answer(setup["llama"], None)
    assert chat(client, "llama").message.content == base_before  # the base is unchanged
    assert adapted.done_reason in ("length", "stop") and 0 < adapted.eval_count <= 16


def test_streaming_usage_and_stop_strings_on_an_adapted_model(setup):
    client = setup["client"]
    whole = chat(client, "llama-lora")
    chunks = list(client.chat(model="llama-lora", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert chunks[-1].done and chunks[-1].done_reason == whole.done_reason
    assert chunks[-1].eval_count == whole.eval_count > 0
    assert whole.prompt_eval_count > 5
    text = whole.message.content
    stop = text[len(text) // 2 :][:3]  # a stop string that occurs in the greedy answer
    assert stop
    stopped = client.chat(model="llama-lora", messages=MESSAGES, stream=False,
                          options={**GREEDY, "stop": [stop]})  # fmt: skip
    assert stopped.done_reason == "stop"
    assert stopped.message.content == text[: text.index(stop)]


def test_concurrent_requests_on_an_adapted_model(setup):
    import concurrent.futures

    client = setup["client"]
    expected = chat(client, "llama-lora").message.content
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: chat(client, "llama-lora").message.content, range(6)))
    assert answers == [expected] * 6


def test_onnx_adapter_file_on_an_int4_model(setup):
    client = setup["client"]
    base = chat(client, "chat").message.content
    adapted = chat(client, "chat-lora").message.content
    assert adapted and adapted != base
    assert chat(client, "chat").message.content == base


def test_the_adapted_bundle_shares_the_base_weights(setup):
    library = setup["library"]
    base, adapted = library.get("llama"), library.get("llama-lora")
    assert base.path != adapted.path
    data, linked = base.path / "model.onnx.data", adapted.path / "model.onnx.data"
    assert os.stat(data).st_ino == os.stat(linked).st_ino and os.stat(data).st_nlink >= 2
    graph = os.stat(adapted.path / "model.onnx").st_size
    assert graph < os.stat(data).st_size  # only the rewritten graph is new
    assert [r.ok for r in library.verify()] == [True] * len(library.verify())
    (record,) = adapted.manifest["adapters"]
    assert record["name"] == "my-lora" and record["digest"].startswith("sha256:")
    assert library.blob_path(record["digest"]).is_file()
    assert library.prune() == []  # the adapted bundle and the adapter blob are in use


def test_ps_and_reload_when_the_adapter_changes(setup):
    client, library = setup["client"], setup["library"]
    first = chat(client, "llama-lora").message.content
    other = write_peft_adapter(setup["llama"], library.root.parent / "other", seed=9)
    base = library.get("llama")
    library.save("llama-lora", {**base.manifest, **attach_adapters(library, base, [("o", other)])})
    assert chat(client, "llama-lora").message.content == reference_answer(setup["llama"], other)
    assert chat(client, "llama-lora").message.content != first
    fields = attach_adapters(library, base, [("my-lora", setup["peft"])])  # put it back
    library.save("llama-lora", {**base.manifest, **fields})
    assert chat(client, "llama-lora").message.content == first


def test_bad_adapters_are_refused_clearly(setup, tmp_path):
    library = setup["library"]
    llama, chat_model = library.get("llama"), library.get("chat")
    (tmp_path / "notes.txt").write_text("no adapter here")
    with pytest.raises(InvalidRequest, match="no LoRA adapter in notes.txt"):
        attach_adapters(library, llama, [("notes.txt", tmp_path / "notes.txt")])
    qwen_peft = write_peft_adapter(setup["llama"], tmp_path / "llama-lora")
    (qwen_peft / "adapter_config.json").unlink()
    with pytest.raises(InvalidRequest, match="without adapter_config.json"):
        attach_adapters(library, llama, [("llama-lora", qwen_peft)])
    bigger = write_peft_adapter(setup["llama"], tmp_path / "wrong", targets=("q_proj",))
    _resize_q(bigger)
    with pytest.raises(InvalidRequest, match="has shape"):
        attach_adapters(library, chat_model, [("wrong", bigger)])
    adapted = library.get("llama-lora")
    other = write_peft_adapter(setup["llama"], tmp_path / "other", seed=5)
    with pytest.raises(InvalidRequest, match="adapters 'my-lora' and 'other' both adapt"):
        attach_adapters(library, adapted, [("other", other)])
    # the model's own adapter again (a Modelfile from `show`) is kept once, not refused
    same = attach_adapters(library, adapted, [("my-lora", setup["peft"])])
    assert same == {"bundle": adapted.digest, "adapters": adapted.manifest["adapters"]}
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidRequest, match="pickled PEFT weights"):
        attach_adapters(library, llama, [("adapter_model.bin", tmp_path / "adapter_model.bin")])


def _resize_q(peft_dir) -> None:
    """Make q_proj's lora_A expect 32 inputs: an adapter for some other model."""
    import torch
    from safetensors.torch import load_file, save_file

    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in list(tensors):
        if key.endswith("q_proj.lora_A.weight"):
            tensors[key] = torch.zeros(4, 32)
    save_file(tensors, str(path))


def test_ollama_create_with_uploaded_peft_adapter_files(setup):
    """Ollama's way: upload the adapter's files as blobs, then create with adapters={...}."""
    client, peft = setup["client"], setup["peft"]
    adapters = {name: client.create_blob(peft / name)
                for name in ("adapter_config.json", "adapter_model.safetensors")}  # fmt: skip
    progress = list(client.create(model="llama-lora-api", from_="llama", adapters=adapters,
                                  stream=True))  # fmt: skip
    assert progress[-1].status == "success"
    created = setup["library"].get("llama-lora-api")
    assert created.digest == setup["library"].get("llama-lora").digest  # one adapted bundle
    answer = chat(client, "llama-lora-api").message.content
    assert answer == chat(client, "llama-lora").message.content
    assert answer != chat(client, "llama").message.content
