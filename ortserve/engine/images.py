"""Pictures for og's multimodal processor: decoded by Pillow, handed over as plain RGB PNGs.

og 0.18's image decoder (onnxruntime-extensions) reads PNG and JPEG only, and sends every
other format to libjpeg, whose error handler EXITS THE PROCESS: a GIF, a WebP or a corrupt
JPEG would take the whole server down (measured: "Not a JPEG file: starts with 0x47 0x49",
exit status 1). So og never sees a client's bytes: Pillow decodes them here, on the request
thread, and a picture it cannot read is a 400 naming `images`. What og gets is the same
pixels as a lossless PNG, in RGB: transparent pictures are laid over white first, as
transformers' image processors do (`convert_to_rgb`), so the model sees what it was trained on.
The size of the bytes and the pixel count are bounded by serving before they get here.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from ortserve.errors import InvalidRequest


def as_png(images: Sequence[bytes]) -> tuple[bytes, ...]:
    """Each picture as an RGB PNG; InvalidRequest (param images) for one Pillow cannot read."""
    return tuple(_one(data, index) for index, data in enumerate(images))


def _one(data: bytes, index: int) -> bytes:
    from PIL import Image, UnidentifiedImageError

    out = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # the whole picture now: a truncated file fails here, not in og
            # lossless and fast to write: og decodes it again at once
            _rgb(image).save(out, format="PNG", compress_level=1)
    except Exception as exc:  # whatever way a decoder fails on these bytes, they are the request's
        why = "not an image format it knows" if isinstance(exc, UnidentifiedImageError) else exc
        raise InvalidRequest(f"images[{index}] cannot be read as a picture (PNG, JPEG, WebP, "
                             f"GIF, BMP, ...): {why}", param="images") from exc  # fmt: skip
    return out.getvalue()


def _rgb(image):
    """RGB pixels; transparency over white (transformers' convert_to_rgb), first GIF frame."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
