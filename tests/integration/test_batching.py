"""Batching on real tiny models: rows of any prompt length share forward passes and give the
tokens each prompt gets alone (fp32), late arrivals join a running batch, a cancelled or
failing turn leaves the others alone; og.Engine lanes keep one prompt length per batch only
for graphs that need it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ortserve.engine.scheduler import Job, Scheduler
from ortserve.engine.types import GenerationOptions
from ortserve.library import Library
from tests.support.decoding import run_turns

pytestmark = pytest.mark.slow
LENGTHS = (17, 40, 95, 230, 3, 600)  # ragged on purpose, one longer than a prefill chunk


def greedy(n: int) -> GenerationOptions:
    return GenerationOptions(temperature=0, num_predict=n, repeat_penalty=1.0, num_ctx=1024)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint) -> dict:
    """fp32 tiny qwen2 from the model builder; fp32 tiny llama from optimum."""
    from converters import convert

    library = Library(tmp_path_factory.mktemp("batching") / "models")
    builder = convert(tiny_checkpoint("qwen2"), "builder", precision="fp32", backend="builder",
                      library=library, progress=False)  # fmt: skip
    optimum = convert(tiny_checkpoint("llama"), "optimum", precision="fp32", backend="optimum",
                      library=library, progress=False)  # fmt: skip
    return {"builder": builder.path, "optimum": optimum.path}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [[int(t) for t in rng.integers(5, 500, n)] for n in LENGTHS]


def scheduler(bundle, **settings) -> Scheduler:
    running = Scheduler(bundle, "cpu", batch_size=8, lanes=1, name="t",
                        kv_cache_entries=0, **settings)  # fmt: skip
    running.start()
    return running


def collect(job: Job) -> tuple[list[int], str]:
    """The job's tokens and finish reason (raises what an error event carries)."""
    tokens = []
    while True:
        kind, *payload = job.events.get(timeout=120)
        if kind == "token":
            tokens.append(payload[0])
        elif kind == "done":
            return tokens, payload[0]
        else:
            raise payload[0]


@pytest.fixture(scope="module")
def alone(bundles, prompts) -> list[list[int]]:
    """Each prompt's 24 greedy tokens from og.Engine, one request at a time."""
    static = scheduler(bundles["builder"], batching="static")
    try:
        return [collect(static.submit(p, greedy(24)))[0] for p in prompts]
    finally:
        static.stop()


def test_the_builder_graph_runs_continuously(bundles):
    running = scheduler(bundles["builder"])
    optimum = scheduler(bundles["optimum"])
    try:
        assert (running.graph, [lane.kind for lane in running._lanes]) == (
            "builder", ["continuous"])  # fmt: skip
        assert optimum.graph == "optimum" and {lane.kind for lane in optimum._lanes} == {"engine"}
    finally:
        running.stop()
        optimum.stop()


@pytest.mark.parametrize("batching", ["auto", "static"])
def test_forward_passes_use_the_threads_they_are_given(bundles, prompts, alone, batching):
    """ORTSERVE_COMPUTE_THREADS reaches the continuous loop's session and og's (overlaid);
    the tokens stay the same."""
    running = scheduler(bundles["builder"], threads=1, batching=batching)
    try:
        lane = running._lanes[0]
        if batching == "auto":
            options = lane.engine.graph.session.get_session_options()
            assert options.intra_op_num_threads == 1
        assert collect(running.submit(prompts[0], greedy(24)))[0] == alone[0]
    finally:
        running.stop()


def test_mixed_lengths_in_one_batch_equal_each_alone(bundles, prompts, alone):
    running = scheduler(bundles["builder"])
    try:
        jobs = [running.submit(p, greedy(24)) for p in prompts]
        assert [collect(job)[0] for job in jobs] == alone
        assert len({tuple(t) for t in alone}) == len(alone)  # the check can fail
    finally:
        running.stop()


def test_the_cache_is_sized_once_for_a_burst_and_freed_when_idle(bundles, prompts, alone):
    """Turns arriving together get one allocation sized to their rows and prompts (not rows
    doubled, not regrown chunk by chunk), every layer a view of it, gone when idle."""
    from ortserve.engine.continuous import ContinuousEngine, DecoderGraph
    from ortserve.engine.kvcache import KVStore

    engine = ContinuousEngine(DecoderGraph.load(bundles["builder"], 1), 8, KVStore(0, 0), "off")
    buffers, reserve = [], engine.cache.reserve

    def recording(rows: int, length: int) -> None:
        reserve(rows, length)
        if not buffers or buffers[-1] is not engine.cache.buffer:
            buffers.append(engine.cache.buffer)

    engine.cache.reserve = recording

    def arrays_are_views_of_the_buffer() -> None:
        assert all(np.shares_memory(a, engine.cache.buffer) for a in engine.cache.arrays)

    assert run_turns(engine, prompts, 24, arrays_are_views_of_the_buffer) == alone
    room = -(-(max(LENGTHS) + 1) // 256) * 256  # the longest prompt and its first token
    assert [(b.shape[1], b.shape[3]) for b in buffers] == [(len(prompts), room)]
    assert engine.cache.buffer is None and engine.cache.nbytes == 0


def test_an_unpruned_graph_gives_the_same_tokens(bundles, prompts, alone, monkeypatch):
    """Without the onnx package the LM head runs on every prompt position: the logits the
    loop reads are then the last of each chunk's."""
    from ortserve.engine import continuous

    monkeypatch.setattr(continuous, "_last_token_logits", lambda model, logits: False)
    running = scheduler(bundles["builder"])
    try:
        assert not running._lanes[0].engine.graph.last_only
        jobs = [running.submit(p, greedy(24)) for p in prompts]
        assert [collect(job)[0] for job in jobs] == alone
    finally:
        running.stop()


def test_late_arrivals_join_a_running_batch(bundles, prompts, alone):
    running = scheduler(bundles["builder"])
    try:
        long = running.submit(prompts[1], greedy(400))
        first = long.events.get(timeout=60)  # it is generating
        late = [running.submit(p, greedy(24)) for p in prompts[2:5]]
        results = [collect(job)[0] for job in late]
        assert not long.finished  # they did not wait for the long turn to end
        tokens, reason = collect(long)
        assert results == alone[2:5]
        assert [first[1], *tokens][:24] == alone[1] and reason == "length"
    finally:
        running.stop()


def test_a_cancelled_turn_leaves_the_batch_and_the_others_go_on(bundles, prompts, alone):
    running = scheduler(bundles["builder"])
    try:
        doomed = running.submit(prompts[5], greedy(400))  # first in: it holds row 0
        jobs = [running.submit(p, greedy(24)) for p in prompts[:4]]
        first = jobs[-1].events.get(timeout=60)  # the last one decodes: every row is taken
        running.cancel(doomed)  # its row is taken out mid-batch; the last row moves in
        assert collect(doomed)[1] == "cancelled"
        tokens = [collect(job)[0] for job in jobs]
        tokens[-1].insert(0, first[1])
        assert tokens == alone[:4]
    finally:
        running.stop()


def test_a_failing_turn_fails_alone(bundles, prompts, alone):
    running = scheduler(bundles["builder"])
    try:
        good = [running.submit(p, greedy(24)) for p in prompts[:2]]
        bad = running.submit([5, 6, 10**6], greedy(8))  # no such token: its prefill fails
        with pytest.raises(Exception, match="generation failed"):
            collect(bad)
        assert [collect(job)[0] for job in good] == alone[:2]
        assert collect(running.submit(prompts[2], greedy(24)))[0] == alone[2]
    finally:
        running.stop()


def _blocked_batch(bundle, prompts: list[list[int]]) -> list[tuple[Job, list[int]]]:
    """Jobs that arrive while one og.Engine lane is busy, so they wait and start together,
    with their tokens."""
    static = scheduler(bundle, batching="static")
    try:
        blocker = static.submit(prompts[0], greedy(64))
        blocker.events.get(timeout=60)
        jobs = [static.submit(p, greedy(24)) for p in prompts]
        done = [(job, collect(job)[0]) for job in jobs]
        collect(blocker)
        return done
    finally:
        static.stop()


def test_og_engine_lanes_batch_mixed_lengths_on_a_builder_graph(bundles, prompts, alone):
    mixed = [0, 1, 2, 4]  # 17, 40, 95 and 3 tokens: padded to 95, within the padding bound
    done = _blocked_batch(bundles["builder"], [prompts[i] for i in mixed])
    jobs = [job for job, _ in done]
    started_together = max(job.begun_at for job in jobs) < min(j.first_token_at for j in jobs)
    assert started_together  # one batch: all began before any of them had a token
    assert [tokens for _, tokens in done] == [alone[i] for i in mixed]


def test_og_engine_lanes_keep_one_length_per_batch_on_an_optimum_graph(bundles):
    same, other = [5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10, 11, 12]
    (first, tokens), (longer, _), (second, again) = _blocked_batch(
        bundles["optimum"], [same, other, same]
    )
    assert second.begun_at < first.first_token_at  # the equal lengths shared a batch
    assert longer.begun_at > first.first_token_at  # the other length waited for the next
    assert tokens == again


def test_concurrent_submitters_all_finish(bundles, prompts, alone):
    """Many request threads at once against one continuous lane of 8 rows (16 turns)."""
    running = scheduler(bundles["builder"])
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        results[i] = collect(running.submit(prompts[i % 4], greedy(24)))[0]

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert [results[i] for i in range(16)] == [alone[i % 4] for i in range(16)]
    finally:
        running.stop()
