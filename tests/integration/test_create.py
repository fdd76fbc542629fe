"""`ollama.create` and `ortserve create -f` against a real server: values change generation.

The tiny models write random text, so what is compared is observable and exact: token
counts (eval_count, prompt_eval_count against the prompt built from the values we set),
where a stop string cuts, and equality of greedy outputs. Every model made here
has a name starting with "c-", so other tests' models are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request

import ollama
import pytest
from tokenizers import Tokenizer

from ortserve.engine.prompts import ChatTemplate, build_chat_prompt
from ortserve.library import Library
from ortserve.library.store import INDEX_FILE
from tests.support.cli import ortserve as run_ortserve

pytestmark = pytest.mark.slow

SYSTEM = "You are a pirate captain who answers every question in rhyme."
EXAMPLES = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A captain of the sea, that be me."},
]


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url)


def ortserve(library: Library, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORTSERVE_MODELS": str(library.root)}
    return run_ortserve(*args, check=check, env=env)


def expected_prompt_tokens(library: Library, base: str, system, examples, question) -> int:
    """Tokens of the chat prompt built from the values the test set (not the manifest's)."""
    bundle = library.get(base).path
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))

    def count(text):
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    messages = [*examples, {"role": "user", "content": question}]
    _, tokens = build_chat_prompt(ChatTemplate.from_bundle(bundle), messages, system=system,
                                  tools=None, count_tokens=count, num_ctx=1 << 20)  # fmt: skip
    return tokens


def bundles(library: Library) -> list[str]:
    return sorted(p.name for p in library.bundles_dir.iterdir())


def model_fields(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("name", "created", "modified")}


def test_ollama_create_system_parameters_and_messages_change_generation(client, served_library):
    before = bundles(served_library)
    statuses = list(client.create(model="c-pirate", from_="tiny-chat", system=SYSTEM,
                                  parameters={"num_predict": 3, "temperature": 0},
                                  messages=EXAMPLES, stream=True))  # fmt: skip
    assert [s.status for s in statuses][-2:] == ["writing manifest", "success"]
    assert statuses[0].status.startswith("using existing layer sha256:")
    # the new model shares tiny-chat's bundle: no weights copied
    assert bundles(served_library) == before
    assert served_library.get("c-pirate").digest == served_library.get("tiny-chat").digest

    reply = client.chat(model="c-pirate", messages=[{"role": "user", "content": "Hello"}])
    assert reply.eval_count == 3 and reply.done_reason == "length"  # PARAMETER num_predict
    assert reply.prompt_eval_count == expected_prompt_tokens(
        served_library, "tiny-chat", SYSTEM, EXAMPLES, "Hello"
    )  # SYSTEM and MESSAGE are in the prompt
    plain = client.chat(model="tiny-chat", messages=[{"role": "user", "content": "Hello"}],
                        options={"num_predict": 3})  # fmt: skip
    assert plain.prompt_eval_count == expected_prompt_tokens(
        served_library, "tiny-chat", None, [], "Hello"
    )
    assert reply.prompt_eval_count > plain.prompt_eval_count

    # temperature 0 from the model: the same as asking the base for greedy decoding with the
    # same system prompt and examples
    greedy = client.chat(model="tiny-chat", options={"temperature": 0, "num_predict": 3},
                         messages=[{"role": "system", "content": SYSTEM}, *EXAMPLES,
                                   {"role": "user", "content": "Hello"}])  # fmt: skip
    assert reply.message.content == greedy.message.content
    # /api/show reports the values (the ollama package's ShowResponse has no `system`)
    shown = post_json(f"{client._client.base_url}/api/show", {"model": "c-pirate"})
    assert shown["system"] == SYSTEM and shown["messages"] == EXAMPLES
    assert "num_predict                    3" in shown["parameters"]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def test_parameter_stop_cuts_the_output(client, served_library):
    greedy = {"temperature": 0, "num_predict": 24}
    full = client.generate(model="tiny-chat", prompt="Tell me a story", options=greedy).response
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0
    client.create(model="c-stop", from_="tiny-chat", parameters={**greedy, "stop": [stop]})
    cut = client.generate(model="c-stop", prompt="Tell me a story")
    assert cut.done_reason == "stop"
    assert cut.response == full[: full.index(stop)]


def test_parameter_temperature_0_is_greedy_and_num_ctx_limits(client):
    """seed is stored and passed on, but og 0.18's engine does not honour it (engine.md)."""
    client.create(model="c-greedy", from_="tiny-chat",
                  parameters={"temperature": 0, "num_predict": 16, "seed": 42})  # fmt: skip
    first = client.generate(model="c-greedy", prompt="Once upon a time").response
    second = client.generate(model="c-greedy", prompt="Once upon a time").response
    asked = client.generate(model="tiny-chat", prompt="Once upon a time",
                            options={"temperature": 0, "num_predict": 16})  # fmt: skip
    assert first == second == asked.response

    client.create(model="c-small-ctx", from_="tiny-chat", parameters={"num_ctx": 16})
    long_prompt = "tell me a very long story about the sea " * 4
    assert client.generate(model="tiny-chat", prompt=long_prompt,
                           options={"num_predict": 1}).eval_count == 1  # fmt: skip
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="c-small-ctx", prompt=long_prompt, options={"num_predict": 1})
    assert err.value.status_code == 400
    assert "exceed the context length of 16" in err.value.error


def test_ortserve_create_from_a_modelfile(served_library, server, client, tmp_path):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(
        "# a pirate\nfrom tiny-chat\n"
        f'SYSTEM """{SYSTEM}"""\n'
        "PARAMETER num_predict 2\nparameter temperature 0\n"
        f"MESSAGE user {EXAMPLES[0]['content']}\n"
        f'Message assistant "{EXAMPLES[1]["content"]}"\n'
    )
    out = ortserve(served_library, "create", "c-cli", "-f", str(modelfile))
    assert out.stdout.splitlines()[-2:] == ["writing manifest", "success"]
    info = served_library.get("c-cli")
    assert info.digest == served_library.get("tiny-chat").digest
    assert info.manifest["system"] == SYSTEM and info.manifest["messages"] == EXAMPLES
    reply = client.chat(model="c-cli", messages=[{"role": "user", "content": "Hello"}])
    assert reply.eval_count == 2
    assert reply.prompt_eval_count == expected_prompt_tokens(
        served_library, "tiny-chat", SYSTEM, EXAMPLES, "Hello"
    )


def test_show_modelfile_round_trips(served_library, client, tmp_path):
    client.create(model="c-round", from_="tiny-chat", system='Say "arr".\nTwice.',
                  parameters={"stop": ["<|im_end|>", "\n\n"], "num_predict": 7, "top_k": 5},
                  messages=EXAMPLES, license=["MIT", "and more"])  # fmt: skip
    before = bundles(served_library)
    original = served_library.get("c-round").manifest
    text = ortserve(served_library, "show", "c-round", "--modelfile").stdout
    assert client.show("c-round").modelfile == text
    (tmp_path / "Modelfile").write_text(text)
    ortserve(served_library, "create", "c-round-copy", "-f", str(tmp_path / "Modelfile"))
    copy = served_library.get("c-round-copy").manifest
    assert model_fields(copy) == model_fields(original)
    ortserve(served_library, "create", "c-round", "-f", str(tmp_path / "Modelfile"))
    assert model_fields(served_library.get("c-round").manifest) == model_fields(original)
    assert bundles(served_library) == before


def test_modelfile_errors_point_at_the_line(served_library, tmp_path):
    cases = {
        "FROM tiny-chat\nSYSTEM hi\nFORM x\n": 'Modelfile line 3: unknown instruction "FORM"',
        "FROM tiny-chat\nPARAMETER temperature hot\n": "Modelfile line 2: invalid value for "
        'parameter "temperature": "hot" is not a number',
        "# x\nFROM no-such-model\n": "Modelfile line 2: FROM no-such-model: no library model",
        "FROM tiny-chat\nTEMPLATE {{ x \n": "Modelfile line 2: template: invalid chat template",
    }
    for text, message in cases.items():
        (tmp_path / "Modelfile").write_text(text)
        result = ortserve(served_library, "create", "c-bad", "-f", str(tmp_path / "Modelfile"),
                          check=False)  # fmt: skip
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"Error: {message}"), result.stderr
    assert not served_library.exists("c-bad")


def test_recreating_a_loaded_model_takes_effect(client, served_library):
    client.create(model="c-live", from_="tiny-chat", system="Short.")
    first = client.chat(model="c-live", messages=[{"role": "user", "content": "Hi"}],
                        options={"num_predict": 1})  # fmt: skip
    client.create(model="c-live", from_="tiny-chat", system=SYSTEM)
    second = client.chat(model="c-live", messages=[{"role": "user", "content": "Hi"}],
                         options={"num_predict": 1})  # fmt: skip
    assert first.prompt_eval_count == expected_prompt_tokens(
        served_library, "tiny-chat", "Short.", [], "Hi"
    )
    assert second.prompt_eval_count == expected_prompt_tokens(
        served_library, "tiny-chat", SYSTEM, [], "Hi"
    )


def test_recreating_with_the_cli_reaches_a_running_server(client, served_library, tmp_path):
    """The server reads the manifest per request: a CLI create needs no reload or restart."""
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM tiny-chat\nSYSTEM Short.\nPARAMETER num_predict 3\n")
    ortserve(served_library, "create", "c-cli-live", "-f", str(modelfile))
    first = client.chat(model="c-cli-live", messages=[{"role": "user", "content": "Hi"}])
    modelfile.write_text(f'FROM tiny-chat\nSYSTEM """{SYSTEM}"""\nPARAMETER num_predict 1\n')
    ortserve(served_library, "create", "c-cli-live", "-f", str(modelfile))
    second = client.chat(model="c-cli-live", messages=[{"role": "user", "content": "Hi"}])
    assert (first.eval_count, second.eval_count) == (3, 1)
    assert second.prompt_eval_count == expected_prompt_tokens(
        served_library, "tiny-chat", SYSTEM, [], "Hi"
    )


def test_blob_upload_and_create_from_files(client, server, served_library, tmp_path):
    bundle = served_library.get("tiny-chat").path
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != INDEX_FILE):
        files[path.relative_to(bundle).as_posix()] = client.create_blob(path)
    for digest in files.values():
        request = urllib.request.Request(f"{server.url}/api/blobs/{digest}", method="HEAD")
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
    client.create(model="c-files", files=files, system="Uploaded.")
    info = served_library.get("c-files")
    # the same files make the same bundle: found by digest, not stored twice
    assert info.digest == served_library.get("tiny-chat").digest
    reply = client.generate(model="c-files", prompt="Hi", options={"num_predict": 2})
    assert reply.eval_count == 2


def test_blob_with_a_wrong_digest_is_refused(server, served_library):
    data = b"not what the digest says"
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    request = urllib.request.Request(f"{server.url}/api/blobs/{wrong}", data=data, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400
    body = json.loads(err.value.read())
    assert body["error"].startswith(f"digest mismatch: expected {wrong}, got sha256:")
    assert not served_library.has_blob(wrong)
    assert not any(p.name.startswith(".partial") for p in served_library.blobs_dir.iterdir())


def test_quantize_an_fp32_model(client, served_library):
    before = set(bundles(served_library))
    statuses = [s.status for s in client.create(model="c-llama-q4", from_="tiny-llama",
                                                quantize="q4_K_M", stream=True)]  # fmt: skip
    assert "quantizing fp32 model to int4" in statuses and statuses[-1] == "success"
    info = served_library.get("c-llama-q4")
    assert info.digest not in before and info.details["quantization"] == "int4"
    assert info.size < served_library.get("tiny-llama").size
    # greedy: a sampled turn of the random model may draw its end token within 4 tokens
    reply = client.generate(
        model="c-llama-q4", prompt="Hi", options={"num_predict": 4, "temperature": 0}
    )
    assert reply.eval_count == 4
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="c-bad", from_="c-llama-q4", quantize="int8")
    assert err.value.status_code == 400 and "already quantized (int4)" in err.value.error


def test_create_from_a_checkpoint_directory_converts(tiny_checkpoint, library, tmp_path):
    checkpoint = tiny_checkpoint("qwen2")
    (tmp_path / "Modelfile").write_text(f"FROM {checkpoint}\nSYSTEM Converted.\n")
    out = ortserve(library, "create", "c-converted", "-f", str(tmp_path / "Modelfile"),
                   "--quantize", "int8")  # fmt: skip
    assert "converting model (int8)" in out.stdout and out.stdout.endswith("success\n")
    info = library.get("c-converted")
    assert info.details["quantization"] == "int8" and info.manifest["system"] == "Converted."
    assert info.manifest["source"]["source"] == str(checkpoint)
    assert (info.path / "genai_config.json").is_file()
    assert [m.name for m in library.list()] == ["c-converted:latest"]
