"""demo-chat's data, template and tokenizer: what its training relies on."""

from __future__ import annotations

import random
import re

import pytest

from converters.demo_model import conversations, tokenizer
from converters.demo_model.conversations import HELDOUT, TRAIN
from converters.demo_model.evaluate import heldout
from converters.demo_model.train import Recipe, build_tokenizer, encode
from ortserve.engine.prompts import ChatTemplate


@pytest.fixture(scope="module")
def training() -> list[conversations.Sample]:
    return conversations.dataset(0, 1500)


@pytest.fixture(scope="module")
def trained_tokenizer(training):
    """The BPE as the recipe trains it (on fewer conversations: the same code path)."""
    return build_tokenizer(training, Recipe())


def test_the_same_seed_draws_the_same_conversations():
    first, again = conversations.dataset(7, 50), conversations.dataset(7, 50)
    assert [s.messages for s in first] == [s.messages for s in again]
    assert [s.messages for s in first] != [s.messages for s in conversations.dataset(8, 50)]


def test_the_second_stage_drills_sums_in_columns_beside_fresh_conversations(trained_tokenizer):
    from converters.demo_model.train import drill_rows

    rows = drill_rows(trained_tokenizer, Recipe(drill_sums=60, drill_conversations=20), print)
    text = " ".join(trained_tokenizer.decode([t for t in row[0].tolist() if t >= 0],
                                             skip_special_tokens=False) for row in rows)  # fmt: skip
    assert text.count("<think>\nUnits: ") >= 60 and rows.shape[1:] == (4, Recipe.row_tokens)


def test_no_wording_is_both_trained_and_held_out():
    tables = [v for k, v in vars(conversations).items()
              if k.endswith("WORDINGS") and isinstance(v, tuple)]  # fmt: skip
    tables += list(conversations.CALC_WORDINGS.values())
    assert len(tables) > 8
    for train, held in tables:
        assert train and held and not set(train) & set(held)


def test_the_server_renders_every_turn_as_training_does(training):
    """Training renders prompts itself (converters may not import the engine): the server's
    renderer must give the same text, or the model is served prompts it never saw."""
    served = ChatTemplate(tokenizer.CHAT_TEMPLATE)
    for sample in training[:300]:
        for think in (False, True):
            ours = tokenizer.render_prompt(sample.request, sample.tools, think)
            assert served.render(sample.request, tools=sample.tools, enable_thinking=think) == ours


def test_history_renders_as_the_model_wrote_it(training):
    """Each turn's prompt extends the conversation so far: what the model wrote is in the
    history token for token, so one sequence trains every turn."""
    for sample in training[:300]:
        encode(_FakeTokenizer(), sample)  # asserts each prompt extends the turns before it


class _FakeTokenizer:
    class _Encoding:
        def __init__(self, text: str):
            self.ids = [ord(c) for c in text]

    def encode(self, text: str):
        return self._Encoding(text)


def test_tokenizing_in_pieces_is_tokenizing_the_whole(training, trained_tokenizer):
    """Training tokenizes prompts and answers apart; the server tokenizes a whole history."""
    for sample in training[:300]:
        pieces = encode(trained_tokenizer, sample).ids
        text = tokenizer.render_prompt(sample.request, sample.tools, sample.think)
        whole = trained_tokenizer.encode(text + sample.answer + tokenizer.END).ids
        assert pieces == whole


def test_numbers_are_split_into_digits(trained_tokenizer):
    tokens = trained_tokenizer.encode("47 + 38 = 85").tokens
    assert [t for t in tokens if t.strip("Ġ").isdigit()] == ["4", "7", "3", "8", "8", "5"]


def test_markup_tokens_are_single_tokens_kept_in_decoded_text(trained_tokenizer):
    """<think> and <tool_call> survive skip_special_tokens: the server's parsers need them."""
    for markup in tokenizer.MARKUP:
        assert len(trained_tokenizer.encode(markup).ids) == 1
    ids = trained_tokenizer.encode(
        "<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    ).ids
    text = trained_tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call>"


def _questions(samples) -> set[str]:
    return {m["content"] for s in samples for m in s.messages if m["role"] == "user"}


def test_held_out_questions_never_occur_in_training(training):
    """The evaluation's questions are new: none appears in training, word for word."""
    seen = _questions(training)
    asked = [s.request[-1]["content"] for _, s in heldout(per_family=20)
             if s.request[-1]["role"] == "user"]  # fmt: skip
    assert asked and not seen & set(asked)


def test_held_out_arithmetic_pairs_and_cities_are_not_trained(training):
    rng = random.Random(3)
    held = {conversations.arithmetic_problem(rng, HELDOUT)[:3] for _ in range(200)}
    trained = {conversations.arithmetic_problem(rng, TRAIN)[:3] for _ in range(2000)}
    assert held and not held & trained
    pattern = re.compile(r"(\d+) ?([+-]) ?(\d+)")
    for sample in training:
        for message in sample.messages:
            if message["role"] == "user" and sample.family == "arithmetic":
                for a, op, b in pattern.findall(message["content"]):
                    assert (int(a), op, int(b)) not in held


def test_held_out_json_key_sets_are_never_trained(training):
    trained = {tuple(s.expect["value"]) for s in training if s.family == "json"}
    for kind, key_sets in conversations.HELDOUT_KEYS.items():
        assert not trained & set(key_sets), kind


def test_every_name_in_the_model_s_world_is_one_token(trained_tokenizer):
    """Copying a city from a question into a tool call is then copying one token (run N in
    docs/demo.md: tool choice 47% -> 67%, tool results quoted 67% -> 87%)."""
    from converters.demo_model import facts

    words = sorted({w for name in facts.names() for w in name.split() if w.isalpha()})
    assert "Zurich" in words and "Ouagadougou" not in words
    for word in words:
        for text in (f" {word}", word, f" {word.lower()}"):
            assert len(trained_tokenizer.encode(text).ids) == 1, text
        ids = trained_tokenizer.encode(f'{{"city":"{word}"}}').ids
        assert trained_tokenizer.token_to_id(word) in ids, word
