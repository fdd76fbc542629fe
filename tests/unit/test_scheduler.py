"""The scheduler's rules without a model: which lane takes a job, how og.Engine batches are
grouped, graph detection, the kept-turn store and the continuous engine's sampling."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from ortserve.engine.continuous import choose, graph_form, supports
from ortserve.engine.kvcache import KVStore, shared_prefix
from ortserve.engine.scheduler import Job, Lane, _bounded_padding
from ortserve.engine.types import GenerationOptions, Guidance

# ---- lanes and grouping ----------------------------------------------------------------------

PLAIN = GenerationOptions()
GUIDED = GenerationOptions(guidance=Guidance("regex", "a+"))
LOGPROBS = GenerationOptions(logprobs=2)
BOTH = GenerationOptions(guidance=Guidance("regex", "a+"), logprobs=2)


@pytest.mark.parametrize(
    ("kind", "takes"),
    [
        ("continuous", {"plain", "logprobs"}),
        ("guided", {"guided"}),
        ("engine", {"plain", "guided"}),
        ("logprobs", {"logprobs", "both"}),
        ("generator", {"plain", "guided", "logprobs", "both"}),
    ],
)
def test_which_lane_takes_which_job(kind, takes):
    lane = Lane(engine=None, buffer=None, capacity=4, kind=kind)
    jobs = {"plain": PLAIN, "guided": GUIDED, "logprobs": LOGPROBS, "both": BOTH}
    assert {name for name, options in jobs.items() if lane.takes(Job([1], options))} == takes


def test_a_static_lane_takes_no_one_while_its_batch_runs_a_continuous_one_does():
    static = Lane(engine=None, buffer=None, capacity=4, kind="engine")
    continuous = Lane(engine=None, buffer=None, capacity=4, kind="continuous")
    for lane in (static, continuous):
        lane.jobs[object()] = Job([1], PLAIN)
    assert (static.room(), continuous.room()) == (0, 3)


def _jobs(*lengths: int) -> list[Job]:
    return [Job(list(range(n)), PLAIN) for n in lengths]


def test_mixed_lengths_share_a_batch_while_the_padding_stays_bounded():
    group = _bounded_padding(_jobs(40, 60, 17, 90), limit=4)
    assert [len(j.tokens) for j in group] == [40, 60, 17, 90]
    # a 2000-token prompt would pad three short ones to 2000 each: it waits for another batch
    group = _bounded_padding(_jobs(20, 2000, 30, 25), limit=4)
    assert [len(j.tokens) for j in group] == [20, 30, 25]
    assert len(_bounded_padding(_jobs(*[10] * 8), limit=4)) == 4


# ---- graph detection --------------------------------------------------------------------------


def _bundle(tmp_path, *, position_ids: bool, share: bool, op: bytes):
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}  # fmt: skip
    if position_ids:
        inputs["position_ids"] = "position_ids"
    config = {"model": {"decoder": {"filename": "model.onnx", "inputs": inputs,
                                    "outputs": {"logits": "logits"}}},
              "search": {"past_present_share_buffer": share}}  # fmt: skip
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07" + op + b"\x00" * 64)
    return tmp_path


def test_graph_form_is_read_from_the_bundle(tmp_path):
    builder = _bundle(tmp_path, position_ids=False, share=True, op=b"GroupQueryAttention")
    assert graph_form(builder) == "builder" and supports(builder)
    for variant in [dict(position_ids=True, share=True, op=b"GroupQueryAttention"),
                    dict(position_ids=False, share=False, op=b"GroupQueryAttention"),
                    dict(position_ids=False, share=True, op=b"MultiHeadAttention")]:  # fmt: skip
        assert graph_form(_bundle(tmp_path, **variant)) == "optimum"
    assert graph_form(tmp_path / "missing") == "optimum"


@pytest.mark.parametrize(
    ("key", "value"),
    [("sliding_window", {"window_size": 128}),  # og rotates a windowed cache
     ("session_options", {"provider_options": [{"cuda": {}}]})],  # built for a GPU
)  # fmt: skip
def test_a_windowed_cache_or_a_gpu_build_is_not_run_continuously(tmp_path, key, value):
    bundle = _bundle(tmp_path, position_ids=False, share=True, op=b"GroupQueryAttention")
    config = json.loads((bundle / "genai_config.json").read_text())
    config["model"]["decoder"][key] = value
    (bundle / "genai_config.json").write_text(json.dumps(config))
    assert graph_form(bundle) == "builder" and not supports(bundle)


# ---- the kept-turn store ----------------------------------------------------------------------


def _layers(n: int, fill: float = 0.0) -> list[np.ndarray]:
    return [np.full((2, n, 4), fill, dtype=np.float32) for _ in range(4)]  # 128 bytes a token


def test_the_longest_shared_prefix_is_found():
    store = KVStore(8, 1 << 20)
    store.keep([1, 2, 3, 4, 5], _layers(5))
    store.keep([1, 2, 9, 9, 9, 9], _layers(6))
    entry, length = store.match([1, 2, 3, 4, 7, 8])
    assert list(entry.tokens) == [1, 2, 3, 4, 5] and length == 4
    assert store.match([8, 8])[1] == 0
    assert shared_prefix(np.array([1, 2]), np.array([1, 2, 3])) == 2


def test_a_later_turn_of_the_same_conversation_replaces_the_earlier_one():
    store = KVStore(8, 1 << 20)
    store.keep([1, 2, 3], _layers(3))
    store.keep([1, 2, 3, 4, 5, 6], _layers(6))
    assert [list(e.tokens) for e in store.entries()] == [[1, 2, 3, 4, 5, 6]]
    assert store.nbytes == 6 * 128


def test_entries_are_bounded_by_count_and_evicted_least_recently_used():
    store = KVStore(2, 1 << 20)
    store.keep([1, 1, 1], _layers(3))
    store.keep([2, 2, 2], _layers(3))
    store.match([1, 1, 1, 7])  # used: now the most recent
    store.keep([3, 3, 3], _layers(3))
    assert sorted(int(e.tokens[0]) for e in store.entries()) == [1, 3]


def test_a_short_shared_opening_is_neither_a_match_nor_a_use():
    store = KVStore(2, 1 << 20)
    store.keep([9, 9, 1, 1, 1], _layers(5))
    store.keep([9, 9, 2, 2, 2], _layers(5))
    assert store.match([9, 9, 5, 5], minimum=3) == (None, 0)
    store.keep([9, 9, 3, 3, 3], _layers(5))  # [9, 9, 1, ...] is still the oldest: it goes
    assert sorted(int(e.tokens[2]) for e in store.entries()) == [2, 3]


def test_entries_are_bounded_by_bytes():
    store = KVStore(100, 10 * 128)
    store.keep([1] * 6, _layers(6))
    store.keep([2] * 6, _layers(6))  # 12 tokens would exceed 10: the older one goes
    assert [int(e.tokens[0]) for e in store.entries()] == [2] and store.nbytes == 6 * 128
    assert store.keep([3] * 11, _layers(11)) is None  # larger than the whole store
    assert [int(e.tokens[0]) for e in store.entries()] == [2]


def test_a_store_of_no_entries_keeps_nothing():
    for store in (KVStore(0, 1 << 20), KVStore(4, 0)):
        assert store.keep([1, 2, 3], _layers(3)) is None and len(store) == 0


# ---- sampling ---------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 0.0], dtype=np.float32)


def test_greedy_is_the_argmax_and_the_penalty_applies_to_seen_tokens():
    assert choose(LOGITS, {"do_sample": False}, None, None) == 0
    penalised = {"do_sample": False, "repetition_penalty": 4.0}
    assert choose(LOGITS, penalised, np.array([0]), None) == 1  # 2.0 / 4 < 1.0
    assert LOGITS[0] == 2.0  # the raw logits are left alone (logprobs read them)


def test_sampling_follows_the_distribution_within_top_k_and_top_p():
    rng = np.random.default_rng(0)
    full = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    draws = collections.Counter(choose(LOGITS, full, None, rng) for _ in range(20000))
    expected = np.exp(LOGITS) / np.exp(LOGITS).sum()
    assert all(abs(draws[i] / 20000 - expected[i]) < 0.02 for i in range(5))
    top2 = {**full, "top_k": 2}
    assert {choose(LOGITS, top2, None, rng) for _ in range(500)} == {0, 1}
    nucleus = {**full, "top_p": 0.6}  # 0.56 alone is short of 0.6: the second one is in
    assert {choose(LOGITS, nucleus, None, rng) for _ in range(500)} == {0, 1}


def test_a_seed_repeats_the_draws():
    search = {"do_sample": True, "temperature": 1.5, "top_k": 5, "top_p": 1.0}

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [choose(LOGITS, search, None, rng) for _ in range(50)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


# ---- settings ---------------------------------------------------------------------------------


def test_batching_and_kv_cache_settings_are_read_and_checked():
    from ortserve.config import Settings, SettingsError

    settings = Settings.from_env({})
    assert (settings.batching, settings.kv_cache_entries, settings.kv_cache_size) == (
        "auto", 16, 1 << 30)  # fmt: skip
    env = {"ORTSERVE_BATCHING": "Static", "ORTSERVE_KV_CACHE_ENTRIES": "0",
           "ORTSERVE_KV_CACHE_SIZE": "512MB"}  # fmt: skip
    settings = Settings.from_env(env)
    assert (settings.batching, settings.kv_cache_entries, settings.kv_cache_size) == (
        "static", 0, 512 << 20)  # fmt: skip
    assert Settings.from_env({"ORTSERVE_KV_CACHE_SIZE": "2GiB"}).kv_cache_size == 2 << 30
    for variable, value in [("ORTSERVE_BATCHING", "dynamic"), ("ORTSERVE_KV_CACHE_SIZE", "lots"),
                            ("ORTSERVE_KV_CACHE_ENTRIES", "-1")]:  # fmt: skip
        with pytest.raises(SettingsError, match=variable):
            Settings.from_env({variable: value})


def test_compute_threads_default_to_the_physical_cores():
    from ortserve.config import Settings, SettingsError, physical_cores

    assert Settings.from_env({}).model_threads == physical_cores() >= 1
    assert Settings.from_env({"ORTSERVE_COMPUTE_THREADS": "3"}).model_threads == 3
    with pytest.raises(SettingsError, match="ORTSERVE_COMPUTE_THREADS"):
        Settings.from_env({"ORTSERVE_COMPUTE_THREADS": "many"})
