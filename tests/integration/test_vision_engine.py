"""Generation from pictures through the real Runtime: the tiny random Qwen2.5-VL converted to
og's multimodal bundle (fp32), compared token for token with og's own pipeline and with
transformers on a drawn picture; bad pictures, placeholders and contexts are 400s."""

from __future__ import annotations

import io
import threading

import pytest

from converters import convert, vision
from ortserve.config import Settings
from ortserve.engine.runtime import Runtime
from ortserve.engine.types import Finished, GenerationOptions, TextChunk
from ortserve.errors import InvalidRequest
from ortserve.library import Library

pytestmark = pytest.mark.slow
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# logprobs=0 only to read the token ids back from the chunks (the lane is the same)
GREEDY = GenerationOptions(temperature=0, num_predict=16, repeat_penalty=1.0, num_ctx=512,
                           logprobs=0)  # fmt: skip


def chat(text: str, pictures: int = 1) -> str:
    """A ChatML user turn with `pictures` placeholders before its text, as serving writes it."""
    return (f"<|im_start|>user\n{PLACEHOLDER * pictures}{text}<|im_end|>\n"
            "<|im_start|>assistant\n")  # fmt: skip


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, tiny_vl, tiny_checkpoint):
    """A Runtime over tiny-vl:fp32 and a text model (tiny qwen2, fp32)."""
    library = Library(tmp_path_factory.mktemp("vision-engine") / "models")
    convert(tiny_vl, "tiny-vl", "fp32", library=library, progress=False)
    convert(tiny_checkpoint("qwen2"), "text", "fp32", library=library, progress=False)
    runtime = Runtime(Settings(models=library.root), library)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="module")
def model(runtime):
    loaded = runtime.acquire("tiny-vl")
    yield loaded
    runtime.release(loaded)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("pictures")
    return [
        vision.make_image(folder / "wide.png"),
        vision.make_image(folder / "tall.png", (56, 140)),
    ]


def run(model, prompt: str, images=(), options=GREEDY) -> tuple[list[int], Finished]:
    """The turn's generated ids and its Finished."""
    events = list(model.generate(model.encode(prompt), options, images=images))
    ids = [lp.token_id for e in events if isinstance(e, TextChunk) for lp in e.logprobs]
    assert isinstance(events[-1], Finished)
    return ids, events[-1]


def og_direct(bundle, prompt: str, pictures: list | None, new_tokens: int) -> list[int]:
    """og's own pipeline (processor + Generator), stopping at EOS as a served turn does."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    processor = model.create_multimodal_processor()
    images = og.Images.open(*(str(p) for p in pictures)) if pictures else None
    inputs = processor(prompt, images=images)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=inputs["input_ids"].as_numpy().shape[1] + new_tokens,
                              do_sample=False)  # fmt: skip
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def until_eos(tokens: list[int], eos: int = 2) -> list[int]:
    """A served turn's ids: to the first EOS, which it does not emit."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_a_picture_generates_what_og_and_transformers_do(model, pictures, tiny_vl):
    prompt = chat("Describe the picture in one line.")
    ids, finished = run(model, prompt, [pictures[0].read_bytes()])
    assert len(ids) == 16  # random weights: no EOS this early (or the comparison is shorter)
    assert ids == until_eos(og_direct(model.info.path, prompt, pictures[:1], 16))
    assert ids == vision.reference_run(tiny_vl, pictures[0], 16, prompt)["tokens"]
    # the expanded prompt: 12 image tokens (112x84 pixels: 8x6 patches, merged 2x2)
    assert finished.usage.prompt_tokens == len(model.encode(prompt)) - 1 + 12
    assert finished.usage.generated_tokens == 16 and finished.reason == "length"


def test_two_pictures_in_order_and_the_order_matters(model, pictures, tiny_vl):
    prompt = chat("Compare them.", pictures=2)
    data = [p.read_bytes() for p in pictures]
    ids, finished = run(model, prompt, data)
    assert ids == vision.reference_run(tiny_vl, pictures, 16, prompt)["tokens"]
    assert finished.usage.prompt_tokens == len(model.encode(prompt)) - 2 + 12 + 10
    swapped, _ = run(model, prompt, data[::-1])
    assert swapped != ids


def test_the_picture_changes_the_answer(model, pictures):
    prompt = chat("Describe the picture in one line.")
    from PIL import Image

    flipped = io.BytesIO()
    Image.open(pictures[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, "PNG")
    assert (
        run(model, prompt, [pictures[0].read_bytes()])[0]
        != run(model, prompt, [flipped.getvalue()])[0]
    )


def test_jpeg_webp_and_gif_are_read_and_a_transparent_png_lies_on_white(model, pictures):
    """og reads PNG and JPEG only (and exits the process on other bytes): the engine hands it
    Pillow's pixels, so other formats work, and the same pixels give the same answer."""
    from PIL import Image

    prompt = chat("Describe the picture in one line.")
    picture = Image.open(pictures[0]).convert("RGB")
    expected, _ = run(model, prompt, [pictures[0].read_bytes()])
    for form in ("WEBP", "GIF", "JPEG"):
        data = io.BytesIO()
        picture.save(data, form, **({"lossless": True} if form == "WEBP" else {}))
        ids, finished = run(model, prompt, [data.getvalue()])
        assert finished.usage.prompt_tokens == len(model.encode(prompt)) - 1 + 12, form
        if form == "WEBP":  # lossless: the same pixels
            assert ids == expected
    see_through = picture.convert("RGBA")
    see_through.putalpha(0)
    white = Image.new("RGB", picture.size, (255, 255, 255))
    encoded = [io.BytesIO(), io.BytesIO()]
    see_through.save(encoded[0], "PNG")
    white.save(encoded[1], "PNG")
    assert (
        run(model, prompt, [encoded[0].getvalue()])[0]
        == run(model, prompt, [encoded[1].getvalue()])[0]
    )


def test_a_text_turn_on_a_vision_model(model, tiny_vl):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    prompt = chat("Say something.", pictures=0)
    ids, finished = run(model, prompt)
    assert finished.usage.prompt_tokens == len(model.encode(prompt))
    assert ids == until_eos(og_direct(model.info.path, prompt, None, 16))
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vl, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl)
    tokens = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = reference.eval().generate(tokens, do_sample=False, max_new_tokens=16, pad_token_id=0)
    assert ids == until_eos(out[0, tokens.shape[1] :].tolist())


def test_placeholders_and_pictures_must_pair(model, pictures):
    data = pictures[0].read_bytes()
    for prompt, images in ((chat("two?", 1), [data, data]), (chat("none?", 1), []),
                           (chat("one?", 0), [data])):  # fmt: skip
        with pytest.raises(InvalidRequest, match="image placeholders") as caught:
            model.generate(model.encode(prompt), GREEDY, images=images)
        assert caught.value.param == "images" and caught.value.status == 400


def test_bytes_that_are_no_picture_are_a_400_and_the_server_lives_on(model, pictures):
    prompt = chat("What is it?")
    truncated = pictures[0].read_bytes()[:200]
    for data in (b"GIF89a" + b"x" * 50, b"\xff\xd8\xff" + b"x" * 50, b"", truncated):
        with pytest.raises(InvalidRequest, match=r"images\[0\]") as caught:
            model.generate(model.encode(prompt), GREEDY, images=[data])
        assert caught.value.param == "images"
    assert len(run(model, prompt, [pictures[0].read_bytes()])[0]) == 16


def test_a_prompt_that_fits_only_without_its_image_tokens_is_a_400(model, pictures):
    prompt = chat("Describe the picture in one line.")
    length = len(model.encode(prompt))  # 12 image tokens more once expanded
    options = GenerationOptions(temperature=0, num_ctx=length + 5)
    turn = model.generate(model.encode(prompt), options, images=[pictures[0].read_bytes()])
    with pytest.raises(InvalidRequest, match="images") as caught:
        list(turn)
    assert caught.value.param == "images" and caught.value.code == "context_length_exceeded"
    # the expanded prompt's room bounds the output: it ends at the context, never past it
    options = GenerationOptions(temperature=0, num_ctx=length + 11 + 3, repeat_penalty=1.0)
    _, finished = run(model, prompt, [pictures[0].read_bytes()], options)
    assert finished.usage.prompt_tokens + finished.usage.generated_tokens <= options.num_ctx


def test_a_cancelled_turn_ends_and_frees_the_lane(model, pictures):
    prompt = chat("Describe the picture at length.")
    options = GenerationOptions(temperature=0, num_predict=-1, num_ctx=1024)
    turn = model.generate(model.encode(prompt), options, images=[pictures[0].read_bytes()])
    events = iter(turn)
    next(event for event in events if isinstance(event, TextChunk))
    turn.cancel()
    finished = [event for event in events if isinstance(event, Finished)]
    assert finished[0].reason == "cancelled" and finished[0].usage.generated_tokens < 900
    assert model.pending() == 0
    assert len(run(model, prompt, [pictures[0].read_bytes()])[0]) == 16


def test_turns_run_one_at_a_time_and_each_gets_its_own_answer(model, pictures):
    """Concurrent turns on the one lane: each answer is what it is alone."""
    prompts = [chat("First?"), chat("Second?"), chat("Third?", 0)]
    images = [[pictures[0].read_bytes()], [pictures[1].read_bytes()], []]
    alone = [run(model, p, i)[0] for p, i in zip(prompts, images)]
    together: dict[int, list[int]] = {}

    def work(k):
        together[k] = run(model, prompts[k], images[k])[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [together[k] for k in range(3)] == alone
    assert model.scheduler.running() == 0 and len(model.scheduler._lanes) == 1


def test_the_model_names_its_placeholder(model):
    assert model.image_placeholder == PLACEHOLDER
    assert "vision" in model.capabilities


def test_a_text_model_refuses_images(runtime, pictures):
    text = runtime.acquire("text")
    try:
        assert text.image_placeholder is None
        with pytest.raises(InvalidRequest, match="images") as caught:
            text.generate(text.encode("hello"), GREEDY, images=[pictures[0].read_bytes()])
        assert caught.value.param == "images"
        ids, _ = run(text, "hello")  # and without images it generates as before
        assert ids
    finally:
        runtime.release(text)


def test_sampling_options_reach_the_vision_turn(model, pictures):
    """Sampling differs from greedy; num_predict bounds the turn."""
    prompt = chat("Describe the picture in one line.")
    data = [pictures[0].read_bytes()]
    greedy, _ = run(model, prompt, data)
    sampled = GenerationOptions(temperature=1.5, top_k=0, top_p=1.0, num_predict=16,
                                num_ctx=512, logprobs=0, seed=1)  # fmt: skip
    assert run(model, prompt, data, sampled)[0] != greedy
    short = GenerationOptions(temperature=0, num_predict=3, num_ctx=512, logprobs=0,
                              repeat_penalty=1.0)  # fmt: skip
    ids, finished = run(model, prompt, data, short)
    assert ids == greedy[:3] and finished.reason == "length"
    assert finished.usage.generated_tokens == 3


def test_a_guided_turn_with_a_picture_keeps_to_its_grammar(model, pictures):
    """Structured output and tools constrain a vision turn as any other (og's llguidance on
    the Generator)."""
    import re

    from ortserve.engine.types import Guidance

    options = GenerationOptions(temperature=0, num_predict=20, num_ctx=512, repeat_penalty=1.0,
                                guidance=Guidance("regex", "[a-z]{3} [0-9]{2}"))  # fmt: skip
    turn = model.generate(model.encode(chat("What?")), options, images=[pictures[0].read_bytes()])
    events = list(turn)
    text = "".join(event.text for event in events if isinstance(event, TextChunk))
    assert re.fullmatch("[a-z]{3} [0-9]{2}", text) and events[-1].reason == "stop"


def test_the_rendered_ids_reach_og_even_when_their_text_tokenizes_otherwise(model, pictures):
    """og's processor takes text: ids that do not tokenize back from their text (a word
    split in two) still reach the model as rendered, image tokens expanded among them."""
    ids = model.encode(chat("Describe the picture in one line."))
    split = next(
        (k, pieces)
        for k, token in enumerate(ids)
        if len(text := model.tokenizer.decode([token])) >= 3
        and len(pieces := model.encode(text[0]) + model.encode(text[1:])) == 2
    )
    k, pieces = split
    rendered = ids[:k] + pieces + ids[k + 1 :]
    assert model.encode(model.tokenizer.decode(rendered)) != rendered
    events = list(model.generate(rendered, GREEDY, images=[pictures[0].read_bytes()]))
    assert events[-1].usage.prompt_tokens == len(rendered) - 1 + 12
