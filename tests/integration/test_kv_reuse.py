"""KV reuse across requests (design decision 5) on a real fp32 builder bundle: a continued
conversation prefills only its new tokens and answers exactly as a fresh prefill does; kept
turns are bounded by count and bytes and evicted least recently used first."""

from __future__ import annotations

import pytest

from ortserve.config import Settings
from ortserve.engine.runtime import Runtime
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.library import Library

pytestmark = pytest.mark.slow
GREEDY = GenerationOptions(temperature=0, num_predict=24, repeat_penalty=1.0, num_ctx=1024)
SYSTEM = "You are a careful assistant who answers questions about rivers and mountains. " * 6
QUESTIONS = ["Tell me about rivers.", "And the mountains beside them?", "Which is older?"]


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_checkpoint) -> Library:
    """An fp32 tiny qwen2 (ChatML template) built by the model builder."""
    from converters import convert

    library = Library(tmp_path_factory.mktemp("kv-reuse") / "models")
    convert(tiny_checkpoint("qwen2"), "chat", precision="fp32", backend="builder",
            library=library, progress=False)  # fmt: skip
    return library


@pytest.fixture
def runtimes(library):
    """Runtimes over the same model: {"kept": with KV reuse, "fresh": without}."""
    made = {
        "kept": Runtime(Settings(models=library.root, kv_cache_entries=4), library),
        "fresh": Runtime(Settings(models=library.root, kv_cache_entries=0), library),
    }
    yield made
    for runtime in made.values():
        runtime.shutdown()


def ask(runtime: Runtime, messages: list[dict]) -> tuple[str, Finished, int]:
    """(answer text, Finished, prompt tokens) of one chat turn, as the chat endpoints run it."""
    loaded = runtime.acquire("chat")
    try:
        tokens = loaded.encode(loaded.template.render(messages))
        chunks, finished = [], None
        for item in loaded.generate(tokens, GREEDY):
            if isinstance(item, TextChunk):
                chunks.append(item.text)
            else:
                finished = item
        return "".join(chunks), finished, len(tokens)
    finally:
        runtime.release(loaded)


def conversation(system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}]


def test_a_continued_conversation_answers_as_a_fresh_prefill(runtimes):
    messages, previous = conversation(), 0
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        text, finished, length = ask(runtimes["kept"], messages)
        fresh_text, fresh, _ = ask(runtimes["fresh"], messages)
        assert (text, finished.reason) == (fresh_text, fresh.reason)
        assert fresh.usage.cached_prompt_tokens == 0
        # the previous turn's whole prompt at least: its answer is rendered from the text
        assert finished.usage.cached_prompt_tokens >= previous
        assert finished.usage.prompt_tokens == length
        messages.append({"role": "assistant", "content": text})
        previous = length
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert previous > 300 and len(set(answers)) > 1  # the comparison can fail


def finish(job) -> tuple[list[int], object]:
    """A scheduler job's tokens and usage."""
    tokens = []
    while True:
        kind, *payload = job.events.get(timeout=120)
        if kind == "token":
            tokens.append(payload[0])
        elif kind == "done":
            return tokens, payload[1]
        else:
            raise payload[0]


def test_an_exact_extension_reuses_every_kept_token(runtimes):
    """The ChatML case at token level: the next prompt is the previous prompt, the answer's
    ids and the new tokens; everything the row computed is reused (the last sampled token
    was never fed, so it is prefilled with the new ones)."""
    loaded = runtimes["kept"].acquire("chat")
    fresh = runtimes["fresh"].acquire("chat")
    try:
        prompt = loaded.encode(loaded.template.render(conversation() + [
            {"role": "user", "content": QUESTIONS[0]}]))  # fmt: skip
        answer, _ = finish(loaded.scheduler.submit(prompt, GREEDY))
        follow = prompt + answer + loaded.encode("<|im_end|>\n<|im_start|>user\nMore?")
        tokens, usage = finish(loaded.scheduler.submit(follow, GREEDY))
        assert usage.cached_prompt_tokens == len(prompt) + len(answer) - 1
        again, usage = finish(fresh.scheduler.submit(follow, GREEDY))
        assert tokens == again and usage.cached_prompt_tokens == 0
        assert loaded.scheduler.kv_store.entries()[-1].tokens.tolist()[: len(follow)] == follow
    finally:
        runtimes["kept"].release(loaded)
        runtimes["fresh"].release(fresh)


def test_kept_turns_are_bounded_by_count_and_evicted_least_recently_used(library):
    runtime = Runtime(Settings(models=library.root, kv_cache_entries=2), library)
    try:
        firsts = {}
        for name in ("a", "b", "c"):
            messages = conversation(f"Conversation {name}. " + SYSTEM)
            messages.append({"role": "user", "content": QUESTIONS[0]})
            text, _, length = ask(runtime, messages)
            firsts[name] = (messages + [{"role": "assistant", "content": text},
                                        {"role": "user", "content": QUESTIONS[1]}], length)  # fmt: skip
        store = runtime.loaded("chat").scheduler.kv_store
        assert len(store) == 2
        _, evicted, _ = ask(runtime, firsts["a"][0])  # the oldest: gone
        assert evicted.usage.cached_prompt_tokens < firsts["a"][1] // 2
        _, kept, _ = ask(runtime, firsts["c"][0])
        assert kept.usage.cached_prompt_tokens >= firsts["c"][1]
    finally:
        runtime.shutdown()


def test_kept_turns_are_bounded_by_bytes(library):
    runtime = Runtime(Settings(models=library.root, kv_cache_size=200_000), library)
    try:
        for name in ("a", "b", "c", "d"):
            messages = conversation(f"Conversation {name}. " + SYSTEM)
            ask(runtime, messages + [{"role": "user", "content": QUESTIONS[0]}])
        store = runtime.loaded("chat").scheduler.kv_store
        # 2 layers x (key, value) x 2 heads x 16 x 4 bytes = 512 bytes a token: ~390 tokens
        assert 0 < store.nbytes <= 200_000 and len(store) == 1
    finally:
        runtime.shutdown()
