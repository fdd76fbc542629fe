"""Pictures before og sees them (engine/images.py) and a bundle's image placeholder
(library/bundle.image_placeholder). tests/integration/test_vision_engine.py runs them."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ortserve.engine.images import as_png
from ortserve.errors import InvalidRequest
from ortserve.library.bundle import image_placeholder


def encoded(image: Image.Image, form: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, form, **options)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_every_format_becomes_an_rgb_png_of_the_same_pixels():
    picture = Image.linear_gradient("L").convert("RGB").resize((40, 30))
    for form, options in (("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                          ("TIFF", {})):  # fmt: skip
        (png,) = as_png([encoded(picture, form, **options)])
        out = decoded(png)
        assert out.mode == "RGB" and out.tobytes() == picture.tobytes(), form
    for form in ("JPEG", "GIF"):  # lossy or paletted: the size and mode survive
        (png,) = as_png([encoded(picture, form)])
        assert decoded(png).mode == "RGB" and decoded(png).size == (40, 30)


def test_transparency_lies_on_white_as_transformers_does():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    half = Image.new("LA", (4, 4), (0, 128))
    (a, b) = as_png([encoded(clear, "PNG"), encoded(half, "PNG")])
    assert decoded(a).getpixel((0, 0)) == (255, 255, 255)
    assert decoded(b).getpixel((0, 0)) == (127, 127, 127)  # black at half over white


def test_pictures_keep_their_order():
    red, blue = Image.new("RGB", (2, 2), "red"), Image.new("RGB", (3, 3), "blue")
    out = as_png([encoded(red, "PNG"), encoded(blue, "JPEG")])
    assert [decoded(p).size for p in out] == [(2, 2), (3, 3)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF89a" + b"x" * 50,
        b"\xff\xd8\xff" + b"x" * 50,
        b"RIFF\0\0\0\0WEBPxxxx",
        encoded(Image.new("RGB", (64, 64), "red"), "PNG")[:100],
    ],  # fmt: skip
    ids=["empty", "gif-header", "jpeg-header", "webp-header", "truncated-png"],
)
def test_bytes_no_decoder_reads_are_a_400_naming_the_picture(data):
    """og would exit the process on most of these (libjpeg's error handler)."""
    good = encoded(Image.new("RGB", (2, 2)), "PNG")
    with pytest.raises(InvalidRequest, match=r"images\[1\]") as caught:
        as_png([good, data])
    assert caught.value.param == "images" and caught.value.status == 400


def write_bundle(folder, model: dict, config: dict | None = None) -> None:
    added = [{"id": 512, "content": "<|vision_start|>"}, {"id": 513, "content": "<|vision_end|>"},
             {"id": 514, "content": "<|image_pad|>"}]  # fmt: skip
    (folder / "genai_config.json").write_text(json.dumps({"model": model}))
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def test_the_placeholder_comes_from_the_bundle(tmp_path):
    qwen = {"type": "qwen2_5_vl", "vision": {}, "vision_start_token_id": 512,
            "image_token_id": 514}  # fmt: skip
    write_bundle(tmp_path, qwen, {"vision_end_token_id": 513})
    assert image_placeholder(tmp_path) == "<|vision_start|><|image_pad|><|vision_end|>"
    (tmp_path / "config.json").unlink()  # a pulled bundle without config.json
    assert image_placeholder(tmp_path) == "<|vision_start|><|image_pad|><|vision_end|>"


def test_no_placeholder_without_a_vision_stage_or_the_ids(tmp_path):
    write_bundle(tmp_path, {"type": "qwen2", "vision_start_token_id": 512, "image_token_id": 514})
    assert image_placeholder(tmp_path) is None
    write_bundle(tmp_path, {"type": "phi3v", "vision": {}})  # another family's scheme
    assert image_placeholder(tmp_path) is None
