"""Speculative decoding with a draft model on real tiny models (fp32 builder graphs of the same
tokenizer): greedy output is token for token that of decoding one token at a time, alone and
in a batch, whether the drafts are mostly kept (the target drafting for itself) or mostly not
(a model of other weights); sampled turns run and a seed repeats."""

from __future__ import annotations

import numpy as np
import pytest

from ortserve.engine.draft_model import DraftModel, same_tokenizer
from ortserve.engine.scheduler import Job, Scheduler
from ortserve.engine.types import GenerationOptions
from ortserve.library import Library
from tests.integration.test_speculation import _repeating, collect, engine, greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_checkpoint) -> Library:
    from converters import convert

    library = Library(tmp_path_factory.mktemp("draft") / "models")
    for architecture, name in (("qwen2", "target"), ("llama", "other")):
        convert(tiny_checkpoint(architecture), name, precision="fp32", backend="builder",
                library=library, progress=False)  # fmt: skip
    return library


@pytest.fixture(scope="module")
def target(library):
    return library.get("target").path


@pytest.fixture(scope="module")
def other(library):
    return library.get("other").path


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Texts of different lengths, repeating and not."""
    rng = np.random.default_rng(7)
    return [_repeating(1, 23, 4), [int(t) for t in rng.integers(5, 500, 70)],
            _repeating(3, 40, 3), [int(t) for t in rng.integers(5, 500, 11)]]  # fmt: skip


def scheduler(bundle, speculation: str = "auto", draft=None) -> Scheduler:
    running = Scheduler(bundle, "cpu", batch_size=8, lanes=1, name="t", speculation=speculation,
                        kv_cache_entries=0, draft=draft)  # fmt: skip
    running.start()
    return running


@pytest.fixture(scope="module")
def plain(target, prompts) -> list[list[int]]:
    """Each prompt's 40 greedy tokens, one token per step, one prompt at a time."""
    running = scheduler(target, "off")
    try:
        return [collect(running.submit(p, greedy(40)))[0] for p in prompts]
    finally:
        running.stop()


def test_the_tiny_models_share_a_tokenizer(target, other, library, minilm_dir):
    assert same_tokenizer(target, other) and same_tokenizer(other, target)
    assert not same_tokenizer(target, minilm_dir)


@pytest.mark.parametrize("draft", ["target", "other"])
def test_greedy_tokens_with_a_draft_model_alone(library, target, prompts, plain, draft):
    running = scheduler(target, draft=library.get(draft).path)
    try:
        lane = engine(running)
        assert lane.draft is not None
        for prompt, expected in zip(prompts, plain):
            assert collect(running.submit(prompt, greedy(40)))[0] == expected
        drafted, accepted = lane.drafted, lane.accepted
    finally:
        running.stop()
    assert drafted > 0
    if draft == "target":  # its own greedy tokens: nearly every draft is kept
        assert accepted >= 0.9 * drafted
    else:
        assert accepted < 0.9 * drafted
    assert len({tuple(t) for t in plain}) == len(plain)  # the comparison can fail


@pytest.mark.parametrize("draft", ["target", "other"])
def test_greedy_tokens_with_a_draft_model_in_a_batch(library, target, prompts, plain, draft):
    """All prompts at once (different lengths, sharing steps): each row's tokens are its
    solo run's, and every row's draft cache is freed when it leaves."""
    running = scheduler(target, draft=library.get(draft).path)
    try:
        jobs = [running.submit(p, greedy(40)) for p in prompts]
        assert [collect(job)[0] for job in jobs] == plain
        lane = engine(running)
        assert lane.drafted > 0
        if draft == "target":
            assert lane.accepted > 0
        assert not lane.rows
    finally:
        running.stop()


def test_sampled_turns_with_a_draft_model_end_and_a_seed_repeats(library, target, prompts):
    options = GenerationOptions(temperature=0.8, top_k=40, top_p=0.95, seed=3, num_predict=40,
                                repeat_penalty=1.0, num_ctx=1024)  # fmt: skip
    running = scheduler(target, draft=target)
    try:
        first = collect(running.submit(prompts[0], options))
        again = collect(running.submit(prompts[0], options))
        jobs: list[Job] = [running.submit(p, options) for p in prompts]
        together = [collect(job) for job in jobs]
        assert engine(running).drafted > 0
    finally:
        running.stop()
    assert first[0] == again[0] and 0 < len(first[0]) <= 40
    assert first[1] in ("stop", "length")
    assert all(0 < len(tokens) <= 40 and reason in ("stop", "length")
               for tokens, reason, _, _ in together)  # fmt: skip


def test_a_cancelled_row_frees_its_draft_and_the_others_go_on(target, prompts, plain):
    running = scheduler(target, draft=target)
    try:
        doomed = running.submit(prompts[0], greedy(400))
        assert doomed.events.get(timeout=60)[0] == "token"
        others = [running.submit(p, greedy(40)) for p in (prompts[1], prompts[2])]
        running.cancel(doomed)
        assert [collect(job)[0] for job in others] == [plain[1], plain[2]]
        while (event := doomed.events.get(timeout=60))[0] == "token":
            pass
        assert event[1] == "cancelled"
    finally:
        running.stop()


def test_speculation_off_loads_no_draft_model(target):
    running = scheduler(target, "off", draft=target)
    try:
        assert engine(running).draft is None
    finally:
        running.stop()


def test_a_draft_that_cannot_load_leaves_prompt_lookup(target, minilm_dir):
    running = scheduler(target, draft=minilm_dir)  # an encoder: not a builder decoder
    try:
        assert engine(running).draft is None
        assert collect(running.submit([5, 6, 7], greedy(4)))[1] == "length"
    finally:
        running.stop()
    with pytest.raises(ValueError, match="builder text decoder"):
        DraftModel.load(minilm_dir)


def test_tokens_per_pass_with_a_self_draft(target, prompts):
    """A lone turn drafting with its own model: several tokens per target pass."""
    running = scheduler(target, draft=target)
    try:
        tokens = collect(running.submit(prompts[1], greedy(64)))[0]
        lane = engine(running)
    finally:
        running.stop()
    passes = len(tokens) - lane.accepted  # every pass gives one token beyond its kept drafts
    assert len(tokens) / passes > 2


# ---- served ------------------------------------------------------------------------------------

GREEDY = {"temperature": 0, "num_predict": 48, "repeat_penalty": 1.0}
PROMPT = "the cat sat on the mat, the cat sat on the mat, the cat"


def post(url: str, body: dict) -> tuple[int, dict]:
    import httpx

    response = httpx.post(url, json=body, timeout=120)
    return response.status_code, response.json()


def generate(server, model: str) -> str:
    status, body = post(f"{server.url}/api/generate", {"model": model, "prompt": PROMPT,
                                                       "stream": False, "options": GREEDY})  # fmt: skip
    assert status == 200, body
    return body["response"]


def test_a_served_draft_model_keeps_the_greedy_answer(server, make_server):
    """tiny-llama (fp32) with tiny-chat (int4, the same tokenizer) as ORTSERVE_DRAFT_MODEL;
    all-minilm (another tokenizer) only warns."""
    plain = generate(server, "tiny-llama")
    drafted = make_server(ORTSERVE_DRAFT_MODEL="tiny-chat")
    assert generate(drafted, "tiny-llama") == plain
    other = make_server(ORTSERVE_DRAFT_MODEL="all-minilm")
    assert generate(other, "tiny-llama") == plain
    drafted.stop(), other.stop()  # their whole output
    assert "tiny-llama:latest: speculative decoding with draft model" in drafted.output()
    assert "draft model all-minilm not used: its tokenizer differs" in other.output()


def test_a_created_model_with_a_draft(server, served_library):
    plain = generate(server, "tiny-llama")
    body = {"model": "d-fast", "from": "tiny-llama", "draft": "tiny-chat", "stream": False}
    assert post(f"{server.url}/api/create", body)[0] == 200
    assert served_library.get("d-fast").manifest["draft"] == "tiny-chat"
    assert generate(server, "d-fast") == plain
    status, shown = post(f"{server.url}/api/show", {"model": "d-fast"})
    assert status == 200 and "DRAFT tiny-chat\n" in shown["modelfile"]
    for draft in ("all-minilm", "no-such-model"):
        status, error = post(f"{server.url}/api/create", {**body, "model": "d-bad",
                                                           "draft": draft})  # fmt: skip
        assert status == 400 and "draft" in error["error"], error
