"""Logprobs through the server, each protocol's shape, against transformers' log-softmax.

tiny-llama is an fp32 bundle of the tiny llama checkpoint: greedy tokens and their
log probabilities must equal transformers' on the same prompt tokens.
"""

from __future__ import annotations

import json
import math

import openai
import pytest
import requests

pytestmark = pytest.mark.slow
PROMPT = "The sky is blue and"
STEPS = 6
TOP = 3
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, served_library):
    """Greedy steps of transformers on the prompt's tokens: (token id, logprob, top ids)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    bundle = served_library.get("tiny-llama").path
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32)
    steps = []
    with torch.no_grad():
        for _ in range(STEPS):
            row = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            chosen = int(row.argmax())
            top = [int(i) for i in torch.topk(row, TOP).indices]
            steps.append((tokenizer.decode([chosen], skip_special_tokens=False), float(row[chosen]),
                          [float(row[i]) for i in top]))  # fmt: skip
            ids.append(chosen)
    return steps


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=TOLERANCE)


def test_native_generate_logprobs_equal_transformers_streamed_and_not(server, expected):
    body = {"model": "tiny-llama", "prompt": PROMPT, "raw": True, "logprobs": True,
            "top_logprobs": TOP, "options": {"temperature": 0, "num_predict": STEPS,
                                             "repeat_penalty": 1.0}}  # fmt: skip
    whole = requests.post(f"{server.url}/api/generate", json={**body, "stream": False}).json()
    lines = requests.post(f"{server.url}/api/generate", json=body).text.splitlines()
    streamed = [item for line in lines for item in (json.loads(line)
                                                    .get("logprobs") or [])]  # fmt: skip
    for items in (whole["logprobs"], streamed):
        assert len(items) == STEPS
        for item, (token, logprob, top) in zip(items, expected, strict=True):
            assert item["token"] == token and _close(item["logprob"], logprob)
            assert item["bytes"] == list(token.encode("utf-8"))
            assert [t["logprob"] for t in item["top_logprobs"]] == pytest.approx(top, abs=TOLERANCE)


def test_chat_logprobs_match_between_openai_and_ollama_shapes(server):
    messages = [{"role": "user", "content": "Hi"}]
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = sdk.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=STEPS,
                                        temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    native = requests.post(f"{server.url}/api/chat", json={
        "model": "tiny-llama", "messages": messages, "stream": False, "logprobs": True,
        "top_logprobs": 2, "options": {"temperature": 0, "num_predict": STEPS}}).json()  # fmt: skip
    assert [i["token"] for i in native["logprobs"]] == [i.token for i in content]
    assert [i["logprob"] for i in native["logprobs"]] == pytest.approx(
        [i.logprob for i in content], abs=TOLERANCE
    )


def test_completions_logprobs_equal_the_native_ones(server):
    """/v1/completions (no repeat_penalty field: the model's default applies) and a raw
    /api/generate with the same options give the same tokens and log probabilities."""
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = sdk.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=STEPS,
                                   temperature=0, logprobs=TOP)  # fmt: skip
    logprobs = reply.choices[0].logprobs
    native = requests.post(f"{server.url}/api/generate", json={
        "model": "tiny-llama", "prompt": PROMPT, "raw": True, "stream": False,
        "logprobs": True, "top_logprobs": TOP,
        "options": {"temperature": 0, "num_predict": STEPS}}).json()["logprobs"]  # fmt: skip
    assert logprobs.tokens == [item["token"] for item in native]
    assert logprobs.token_logprobs == pytest.approx([i["logprob"] for i in native], abs=TOLERANCE)
    for alternatives, item in zip(logprobs.top_logprobs, native, strict=True):
        # partial UTF-8 tokens all read U+FFFD: one key in the legacy dict for several tokens
        whole = {
            t["token"]: t["logprob"] for t in item["top_logprobs"] if "\ufffd" not in t["token"]
        }
        assert {k: v for k, v in alternatives.items() if k in whole} == pytest.approx(
            whole, abs=TOLERANCE
        )
        assert set(whole) <= set(alternatives)
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert "".join(logprobs.tokens) == reply.choices[0].text
