"""Logprobs from the real logits: an fp32 tiny bundle against transformers' log-softmax."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from ortserve.config import Settings
from ortserve.engine.runtime import Runtime
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.library import Library
from ortserve.models.adapters import attach_adapters
from tests.support.lora import merged_reference, with_external_data, write_peft_adapter

pytestmark = pytest.mark.slow
PROMPT = [5, 17, 33, 100, 7, 250, 31, 64]
GREEDY = GenerationOptions(
    temperature=0, logprobs=5, num_predict=8, repeat_penalty=1.0, num_ctx=512
)
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    """A runtime over an fp32 tiny llama ("llama") and its LoRA-adapted twin ("llama-lora")."""
    from converters import convert

    root = tmp_path_factory.mktemp("logprobs")
    library = Library(root / "models")
    checkpoint = tiny_checkpoint("llama")
    inline = convert(checkpoint, "inline", precision="fp32", library=library, progress=False)
    llama = with_external_data(library, "llama", inline)
    library.delete("inline")
    peft = write_peft_adapter(checkpoint, root / "lora")
    library.save(
        "llama-lora", {**llama.manifest, **attach_adapters(library, llama, [("lora", peft)])}
    )
    runtime = Runtime(Settings(models=library.root), library)
    yield {"runtime": runtime, "checkpoint": checkpoint, "peft": peft}
    runtime.shutdown()


def run(runtime, name: str, options: GenerationOptions, prompt=PROMPT):
    """(text, TokenLogprobs, Finished) of one turn."""
    loaded = runtime.acquire(name)
    try:
        chunks, finished = [], None
        for event in loaded.generate(prompt, options):
            if isinstance(event, TextChunk):
                chunks.append(event)
            else:
                finished = event
        return "".join(c.text for c in chunks), [lp for c in chunks for lp in c.logprobs], finished
    finally:
        runtime.release(loaded)


def reference(model, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax at every position of `ids`, in float64 (one forward pass)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def assert_matches(items, model, prompt=PROMPT, *, greedy=True):
    """Each token's logprob and top 5 equal transformers' at the step that produced it."""
    ids = [item.token_id for item in items]
    rows = reference(model, prompt + ids)[len(prompt) - 1 : -1]
    for item, row in zip(items, rows, strict=True):
        if greedy:
            assert item.token_id == int(row.argmax())
        assert abs(item.logprob - row[item.token_id]) < TOLERANCE
        assert len(item.top) == 5
        best = np.sort(row)[::-1][:5]  # values, so a near tie may swap ids but not values
        assert np.allclose([alt.logprob for alt in item.top], best, atol=TOLERANCE)
        for alt in item.top:
            assert abs(alt.logprob - row[alt.token_id]) < TOLERANCE


def test_greedy_logprobs_equal_transformers(setup):
    text, items, finished = run(setup["runtime"], "llama", GREEDY)
    assert isinstance(finished, Finished)
    assert len(items) == finished.usage.generated_tokens > 0
    assert_matches(items, merged_reference(setup["checkpoint"], None))
    assert items[0].top[0].token_id == items[0].token_id  # greedy: the chosen is the top one
    assert b"".join(bytes(item.utf8) for item in items).decode("utf-8", "replace") == text


def test_logprobs_come_from_the_raw_logits_whatever_the_sampling(setup):
    # sampling with penalties: the chosen tokens vary, their logprobs stay the model's own
    options = GenerationOptions(temperature=1.5, top_k=20, top_p=0.9, repeat_penalty=1.5,
                                logprobs=5, num_predict=12, num_ctx=512)  # fmt: skip
    _, items, _ = run(setup["runtime"], "llama", options)
    assert any(item.token_id != item.top[0].token_id for item in items)  # not the argmax
    assert_matches(items, merged_reference(setup["checkpoint"], None), greedy=False)


def test_an_adapter_model_gives_the_adapted_logprobs(setup):
    _, items, _ = run(setup["runtime"], "llama-lora", GREEDY)
    assert_matches(items, merged_reference(setup["checkpoint"], setup["peft"]))
    _, base, _ = run(setup["runtime"], "llama", GREEDY)
    assert [i.logprob for i in items] != [i.logprob for i in base]


def test_zero_top_and_no_logprobs(setup):
    text, items, _ = run(setup["runtime"], "llama", GenerationOptions(
        temperature=0, logprobs=0, num_predict=8, repeat_penalty=1.0, num_ctx=512))  # fmt: skip
    assert items and all(item.top == () for item in items)
    plain_text, plain, _ = run(setup["runtime"], "llama", GenerationOptions(
        temperature=0, num_predict=8, repeat_penalty=1.0, num_ctx=512))  # fmt: skip
    assert plain == [] and plain_text == text  # the og.Engine lane says the same


def test_plain_and_logprob_turns_run_side_by_side(setup):
    runtime = setup["runtime"]
    long_plain = GenerationOptions(temperature=0, num_predict=64, repeat_penalty=1.0, num_ctx=512)
    solo_plain = run(runtime, "llama", long_plain)[0]
    solo_scored = run(runtime, "llama", GREEDY, prompt=PROMPT[:5])[1]
    results: dict[str, tuple] = {}
    jobs = {"plain": ("llama", long_plain, PROMPT),
            "scored-1": ("llama", GREEDY, PROMPT[:5]), "scored-2": ("llama", GREEDY, PROMPT[:5]),
            "adapted": ("llama-lora", GREEDY, PROMPT)}  # fmt: skip

    def work(key):
        name, options, prompt = jobs[key]
        results[key] = run(runtime, name, options, prompt)

    threads = [threading.Thread(target=work, args=(key,)) for key in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == set(jobs)
    assert results["plain"][0] == solo_plain and results["plain"][1] == []
    for key in ("scored-1", "scored-2"):
        assert [(i.token_id, i.logprob) for i in results[key][1]] == [
            (i.token_id, i.logprob) for i in solo_scored
        ]
    assert results["adapted"][1]


def test_a_cancelled_logprob_turn_frees_its_slot(setup):
    runtime = setup["runtime"]
    loaded = runtime.acquire("llama")
    try:
        long = GenerationOptions(temperature=0, logprobs=3, num_predict=400, num_ctx=512)
        turn = loaded.generate(PROMPT, long)
        seen = 0
        for event in turn:
            seen += len(getattr(event, "logprobs", ()))
            if seen >= 3:
                break  # the consumer goes away: the turn is cancelled
        turn.cancel()
        for _ in range(200):
            if loaded.scheduler.pending() == 0:
                break
            threading.Event().wait(0.05)
        assert loaded.scheduler.pending() == 0
    finally:
        runtime.release(loaded)
    _, items, finished = run(runtime, "llama", GREEDY)
    assert finished.reason == "length" and len(items) == 8


def test_a_failing_logprob_turn_fails_alone(setup):
    from ortserve.engine.guided import guidance_for
    from ortserve.errors import OrtServeError

    # llguidance cannot build this grammar: the turn's Generator fails, its lane mates do not
    poison = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    runtime = setup["runtime"]
    loaded = runtime.acquire("llama")
    try:
        bad = loaded.generate(PROMPT, replace(GREEDY, guidance=guidance_for(poison)))
        good = loaded.generate(PROMPT, replace(GREEDY, num_predict=32))
        with pytest.raises(OrtServeError) as info:
            list(bad)
        assert info.value.message.startswith("generation failed: ")
        events = list(good)
        assert events[-1].usage.generated_tokens == 32
        assert sum(len(e.logprobs) for e in events if isinstance(e, TextChunk)) == 32
    finally:
        runtime.release(loaded)
    assert len(run(runtime, "llama", GREEDY)[1]) == 8
