"""Speculative decoding on a real tiny model (fp32 builder graph): prompt-lookup drafts are
verified in one forward pass, and greedy output is token for token that of decoding one token
at a time, alone or in a batch where some rows speculate and others do not; limits, logprobs
and conversation KV reuse hold."""

from __future__ import annotations

import numpy as np
import pytest

from ortserve.engine.scheduler import Job, Scheduler
from ortserve.engine.types import GenerationOptions
from ortserve.library import Library

pytestmark = pytest.mark.slow


def greedy(n: int, **more) -> GenerationOptions:
    return GenerationOptions(temperature=0, num_predict=n, repeat_penalty=1.0, num_ctx=1024,
                             **more)  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    from converters import convert

    library = Library(tmp_path_factory.mktemp("speculation") / "models")
    built = convert(tiny_checkpoint("qwen2"), "spec", precision="fp32", backend="builder",
                    library=library, progress=False)  # fmt: skip
    return built.path


def _repeating(seed: int, period: int, times: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(5, 500, period)] * times


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Texts that repeat (drafts come from them), and one that does not."""
    rng = np.random.default_rng(11)
    return [_repeating(1, 23, 4), _repeating(2, 9, 12), [int(t) for t in rng.integers(5, 500, 70)],
            _repeating(3, 40, 3)]  # fmt: skip


def scheduler(bundle, speculation: str, **settings) -> Scheduler:
    settings = {"kv_cache_entries": 0, **settings}
    running = Scheduler(bundle, "cpu", batch_size=8, lanes=1, name="t", speculation=speculation,
                        **settings)  # fmt: skip
    running.start()
    return running


def collect(job: Job) -> tuple[list[int], str, list, object]:
    """The job's tokens, finish reason, per-token logprobs and usage."""
    tokens, scores = [], []
    while True:
        kind, *payload = job.events.get(timeout=120)
        if kind == "token":
            tokens.append(payload[0])
            scores.append(payload[1] if len(payload) > 1 else None)
        elif kind == "done":
            return tokens, payload[0], scores, payload[1]
        else:
            raise payload[0]


def engine(running: Scheduler):
    (lane,) = running._lanes
    assert lane.kind == "continuous"
    return lane.engine


@pytest.fixture(scope="module")
def plain(bundle, prompts) -> list[list[int]]:
    """Each prompt's 40 greedy tokens decoded one token per step, one prompt at a time."""
    running = scheduler(bundle, "off")
    try:
        tokens = [collect(running.submit(p, greedy(40)))[0] for p in prompts]
        assert engine(running).drafted == 0
        return tokens
    finally:
        running.stop()


def test_speculation_keeps_greedy_tokens_and_accepts_drafts(bundle, prompts, plain):
    running = scheduler(bundle, "auto")
    try:
        for prompt, expected in zip(prompts, plain):
            assert collect(running.submit(prompt, greedy(40)))[0] == expected
        spec = engine(running)
        assert spec.accepted > 0 and spec.drafted > spec.accepted  # some kept, some not
    finally:
        running.stop()
    assert len({tuple(t) for t in plain}) == len(plain)  # the comparison can fail


def test_rows_that_speculate_share_steps_with_rows_that_do_not(bundle, prompts, plain):
    """All prompts at once: the repeating ones draft, the random one mostly does not; each
    row's tokens equal its solo run's."""
    running = scheduler(bundle, "auto")
    try:
        jobs = [running.submit(p, greedy(40)) for p in prompts]
        assert [collect(job)[0] for job in jobs] == plain
        assert engine(running).accepted > 0
    finally:
        running.stop()


@pytest.mark.parametrize("limit", [1, 2, 7])
def test_tokens_accepted_past_num_predict_are_cut(bundle, prompts, plain, limit):
    running = scheduler(bundle, "auto")
    try:
        tokens, reason, _, _ = collect(running.submit(prompts[1], greedy(limit)))
        assert (tokens, reason) == (plain[1][:limit], "length")
    finally:
        running.stop()


def test_logprobs_equal_with_and_without_speculation(bundle, prompts):
    options = greedy(32, logprobs=3)
    results = {}
    for mode in ("off", "auto"):
        running = scheduler(bundle, mode)
        try:
            results[mode] = collect(running.submit(prompts[1], options))
            drafted = engine(running).accepted
        finally:
            running.stop()
    assert drafted > 0
    (plain_tokens, _, plain_scores, _), (tokens, _, scores, _) = results["off"], results["auto"]
    assert tokens == plain_tokens and len(scores) == len(plain_scores) == 32
    for ours, theirs in zip(scores, plain_scores):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert ours.top_ids == theirs.top_ids
        assert ours.top_logprobs == pytest.approx(theirs.top_logprobs, abs=1e-4)


def test_a_continued_conversation_reuses_its_keys_with_speculation(bundle, prompts, plain):
    """The second turn extends the first turn's prompt and reply: its keys and values come
    from the kept turn (only the accepted tokens' were kept), and its tokens equal a fresh
    prefill's."""
    second = prompts[0] + plain[0] + _repeating(5, 12, 3)
    fresh = scheduler(bundle, "off")
    try:
        expected = collect(fresh.submit(second, greedy(30)))[0]
    finally:
        fresh.stop()
    running = scheduler(bundle, "auto", kv_cache_entries=4)
    try:
        assert collect(running.submit(prompts[0], greedy(40)))[0] == plain[0]
        tokens, _, _, usage = collect(running.submit(second, greedy(30)))
        assert tokens == expected
        assert usage.cached_prompt_tokens > len(prompts[0])
        assert engine(running).accepted > 0
    finally:
        running.stop()


def test_sampled_turns_speculate_and_a_seed_repeats(bundle, prompts):
    options = GenerationOptions(temperature=0.7, top_k=20, top_p=0.95, seed=5, num_predict=40,
                                repeat_penalty=1.0, num_ctx=1024)  # fmt: skip
    running = scheduler(bundle, "auto")
    try:
        first = collect(running.submit(prompts[1], options))[0]
        again = collect(running.submit(prompts[1], options))[0]
        assert first == again and 0 < len(first) <= 40
        assert engine(running).drafted > 0
    finally:
        running.stop()


def test_cancelling_a_speculating_row_leaves_the_others(bundle, prompts, plain):
    running = scheduler(bundle, "auto")
    try:
        doomed = running.submit(prompts[1], greedy(400))
        assert doomed.events.get(timeout=60)[0] == "token"
        others = [running.submit(p, greedy(40)) for p in (prompts[0], prompts[2])]
        running.cancel(doomed)
        assert [collect(job)[0] for job in others] == [plain[0], plain[2]]
        while (event := doomed.events.get(timeout=60))[0] == "token":
            pass
        assert event[1] == "cancelled"
    finally:
        running.stop()
