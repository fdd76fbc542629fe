"""Prompt-lookup drafting and speculative sampling's acceptance rule (engine/speculation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ortserve.engine import speculation
from ortserve.engine.continuous import choose
from ortserve.engine.speculation import DraftLength, PromptLookup, accept


def lookup(tokens: list[int]) -> PromptLookup:
    index = PromptLookup()
    index.extend(tokens)
    return index


def test_a_draft_continues_the_latest_earlier_occurrence_of_the_suffix():
    # "... 1 2 3 [4 5 6] ... 1 2" + last 3: the 3-gram (1, 2, 3) was followed by 4 5 6
    index = lookup([9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2])
    assert index.draft(3, 3) == [4, 5, 6]
    assert index.draft(3, 1) == [4]
    assert index.draft(3, 0) == []


def test_the_longest_suffix_wins_over_shorter_ones():
    # 3 alone was last followed by 0; the 2-gram (2, 3) by 4
    index = lookup([2, 3, 4, 9, 3, 0, 2])
    assert index.draft(3, 1) == [4]
    assert lookup([7, 3, 0, 5]).draft(3, 2) == [0, 5]  # only the 1-gram matches


def test_no_draft_without_an_earlier_occurrence():
    assert lookup([1, 2, 3]).draft(4, 5) == []
    assert PromptLookup().draft(4, 5) == []


def test_a_loop_continues_with_its_period():
    """A continuation that reaches the sequence's end repeats what it drafted."""
    index = lookup([5, 1, 2, 3, 1, 2])
    assert index.draft(3, 7) == [1, 2, 3, 1, 2, 3, 1]
    assert lookup([4, 4]).draft(4, 4) == [4, 4, 4, 4]


def test_extending_step_by_step_indexes_as_extending_at_once():
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 6, 200)]
    stepwise = PromptLookup()
    for start in range(0, len(tokens), 7):
        stepwise.extend(tokens[start : start + 7])
    whole = lookup(tokens)
    assert stepwise._after == whole._after
    for last in range(6):
        assert stepwise.draft(last, 5) == whole.draft(last, 5)


def test_the_draft_length_adapts_and_a_row_that_keeps_missing_pauses():
    state = DraftLength()
    assert state.wanted() == speculation.FIRST_DRAFT
    state.update(4, 4)
    assert state.k == 6
    for _ in range(5):
        state.update(state.k, state.k)
    assert state.k == speculation.MAX_DRAFT
    state.update(8, 3)
    assert state.k == speculation.MAX_DRAFT - 1
    while state.k > 1:
        state.update(state.k, 0)
    state.update(1, 0)  # the single draft missed: a pause of 1, then 2, 4, ...
    assert [state.wanted(), state.wanted()] == [0, 1]
    state.update(1, 0)
    assert [state.wanted(), state.wanted(), state.wanted()] == [0, 0, 1]
    state.update(1, 1)
    assert (state.k, state.backoff) == (3, 0)
    assert (state.proposed, state.accepted) > (0, 0)


@pytest.mark.parametrize("draft", [0, 2, 4, 7])
def test_the_acceptance_rule_keeps_the_target_distribution(draft):
    """Draws with a one-hot draft follow p itself: chi-square on 40k draws per case, the
    draft likely (0), unlikely (4), middling (2) and outside the support (7)."""
    ids = np.array([0, 1, 2, 3, 4])
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    rng = np.random.default_rng(1234 + draft)
    n = 40_000
    counts = np.bincount([accept(ids, probs, draft, rng) for _ in range(n)], minlength=8)[:5]
    assert counts.sum() == n
    result = stats.chisquare(counts, probs * n)
    assert result.pvalue > 1e-3, (counts, result)


def test_the_rule_is_not_the_proposal():
    """The rule can fail: always keeping the draft would put all the mass on it."""
    ids, probs = np.array([0, 1, 2]), np.array([0.6, 0.3, 0.1])
    rng = np.random.default_rng(7)
    counts = np.bincount([accept(ids, probs, 2, rng) for _ in range(20_000)], minlength=3)
    assert 0.08 < counts[2] / 20_000 < 0.12
    assert accept(np.array([3]), np.array([1.0]), 3, rng) == 3  # a certain draft is kept


def test_choose_at_a_drafted_position():
    logits = np.array([0.0, 3.0, 1.0, 2.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    greedy = {"do_sample": False}
    assert choose(logits, greedy, None, None, draft=3) == 1  # greedy ignores the draft
    sampled = {"do_sample": True, "temperature": 1.0, "top_k": 2, "top_p": 1.0}
    picks = {choose(logits, sampled, None, rng, draft=3) for _ in range(200)}
    assert picks == {1, 3}  # top-k 2 keeps 1 and 3; the draft among them is kept sometimes
    assert {choose(logits, sampled, None, rng, draft=0) for _ in range(50)} <= {1, 3}


def test_a_rows_own_draft_pass_runs_in_a_batch_only_where_it_pays():
    """A shared step of 8 rows in 0.1 s makes 80 tokens/s; a row's own pass of 0.05 s that
    keeps 2 tokens makes 40/s: skipped, until EXPLORE shared steps went without one. Beside
    1 other row (20 tokens/s) the same pass pays; a new row starts from the lane's figure."""
    rates, row = speculation.PassRates(), speculation.DraftLength()
    assert rates.pays(row)  # nothing measured yet
    rates.shared(8, 0.1)
    rates.own(row, 2, 0.05)
    tries = []
    for _ in range(speculation.PassRates.EXPLORE):
        rates.shared(8, 0.1)
        tries.append(rates.pays(row))
    assert tries == [False] * (speculation.PassRates.EXPLORE - 1) + [True]
    assert not rates.pays(speculation.DraftLength()) or rates.idle_steps >= rates.EXPLORE
    pair = speculation.PassRates()
    pair.shared(2, 0.1)
    pair.own(row, 2, 0.05)
    assert pair.pays(row) and pair.pays(speculation.DraftLength())
