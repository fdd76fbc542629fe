"""Images in requests: read from each protocol's field, bounded in bytes, pixels and count
before anything loads, and handed on as encoded bytes (the engine decodes them).

Every protocol builds one ImageReader per request and reads each image through it, naming
the request field; the limits are written here, once. A picture is checked from its header
only (pillow reads the format and the size without decoding the pixels), so a decompression
bomb costs nothing here; the engine decodes it (engine/images.py) once its pixels are known
to be within the cap.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ortserve.errors import InvalidRequest

# The defaults of ORTSERVE_MAX_IMAGE_BYTES and ORTSERVE_MAX_IMAGES (config.py), and the
# pixel cap. One image's encoded bytes: OpenAI's limit per image (Anthropic's is 5 MB); JSON
# bodies stop at api/validation.MAX_BODY_BYTES (32 MiB) anyway, and a fetched URL stops here.
MAX_IMAGE_BYTES = 20 << 20
# One image's pixels: 8K UHD (7680x4320, about 33 million; 100 MB once decoded as RGB). The
# model's processor shrinks a picture to its own max_pixels; this bounds the decode before.
MAX_IMAGE_PIXELS = 7680 * 4320
# Images in one request (every message, every prompt): each costs a vision-encoder pass and
# up to ~1300 context tokens on Qwen2.5-VL's default processor.
MAX_IMAGES = 8


@dataclass(frozen=True)
class ImageLimits:
    """What one request's images may be: the server's settings, or the defaults above."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_images: int = MAX_IMAGES
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def of(cls, settings: Any) -> ImageLimits:
        return cls(settings.max_image_bytes, settings.max_images)


DEFAULT_LIMITS = ImageLimits()
# A fetched URL (ORTSERVE_FETCH_IMAGES=1): the whole download, connect included, in seconds.
FETCH_TIMEOUT = 10.0
# What clients may send (the engine hands og every picture as an RGB PNG).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)
_CHUNK = 64 << 10


@dataclass
class ImageReader:
    """The images of one request, in the order read; refuses past MAX_IMAGES."""

    fetch: bool = False  # http(s) URLs allowed (ORTSERVE_FETCH_IMAGES)
    limits: ImageLimits = DEFAULT_LIMITS
    params: list[str] = field(default_factory=list)  # the field of each image read

    @classmethod
    def of(cls, settings: Any) -> ImageReader:
        """The reader the server's settings allow: fetching, and the limits."""
        return cls(settings.fetch_images, ImageLimits.of(settings))

    @property
    def first(self) -> str | None:
        """The field of the first image: what a refusal of all images names."""
        return self.params[0] if self.params else None

    def base64(self, data: Any, param: str, *, proto: bool = False) -> bytes:
        """A base64 string (Ollama's images, Anthropic's and Gemini's data). `proto`: as
        protobuf's JSON reads bytes (Gemini): the URL-safe alphabet and no padding too."""
        self._count(param)
        return checked(decode_base64(data, param, proto=proto, limits=self.limits), param,
                       self.limits)  # fmt: skip

    def url(self, url: Any, param: str) -> bytes:
        """A data URL, or an http(s) URL when fetching is on (OpenAI's image_url)."""
        self._count(param)
        if not isinstance(url, str):
            raise InvalidRequest(f"{param}: expected a URL string", param=param)
        if url.startswith("data:"):
            return checked(_data_url(url, param, self.limits), param, self.limits)
        if url.startswith(("http://", "https://")):
            if not self.fetch:
                raise InvalidRequest(f"{param}: image URLs are not fetched by this server; send "
                                     "the image as a data URL (data:image/png;base64,...) or "
                                     "set ORTSERVE_FETCH_IMAGES=1 on the server", param=param)  # fmt: skip
            return checked(fetch(url, param, limits=self.limits), param, self.limits)
        raise InvalidRequest(f"{param}: expected a data URL (data:image/png;base64,...) or an "
                             "http(s) URL", param=param)  # fmt: skip

    def _count(self, param: str) -> None:
        if len(self.params) >= self.limits.max_images:
            raise InvalidRequest(f"{param}: too many images: at most {self.limits.max_images} "
                                 "per request", param=param)  # fmt: skip
        self.params.append(param)


def decode_base64(data: Any, param: str, *, proto: bool = False,
                  limits: ImageLimits = DEFAULT_LIMITS) -> bytes:  # fmt: skip
    """Strict base64 (whitespace allowed, as in wrapped text), bounded before decoding;
    `proto`: URL-safe or unpadded too (google-genai sends URL-safe base64)."""
    if not isinstance(data, str):
        raise InvalidRequest(f"{param}: expected a base64 string", param=param)
    if len(data) // 4 * 3 > limits.max_bytes + 3 * 1024:  # newlines of wrapped text allowed
        raise _too_large(param, limits)
    text = "".join(data.split())
    if proto:
        text = text.replace("-", "+").replace("_", "/")
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param}: not base64", param=param) from None


def checked(raw: bytes, param: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The image's bytes once their size, format and pixels are within bounds (header only)."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > limits.max_bytes:
        raise _too_large(param, limits)
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as image:
            _check_pixels(*image.size, param, limits)
            image.verify()  # chunk checksums (PNG), structure: cheap, no pixel decoding
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, None, limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        why = "not an image" if isinstance(exc, UnidentifiedImageError) else "a broken image"
        raise InvalidRequest(f"{param}: {why} (PNG, JPEG, WebP, GIF or BMP)",
                             param=param) from None  # fmt: skip
    return raw


def _check_pixels(width: int, height: int, param: str, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise _too_many_pixels(param, (width, height), limits)
    if width < 1 or height < 1:
        raise InvalidRequest(f"{param}: an image of no pixels", param=param)


def _data_url(url: str, param: str, limits: ImageLimits) -> bytes:
    """data:[<type>][;base64],<data>: image types only, base64 only."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequest(f"{param}: not a data URL", param=param)
    kind = match["type"] or ""
    if kind and not kind.lower().startswith("image/"):
        raise InvalidRequest(f"{param}: a data URL of {kind}, not an image", param=param)
    if "base64" not in match["params"].lower().split(";"):
        raise InvalidRequest(f"{param}: a data URL must be base64 (data:image/png;base64,...)",
                             param=param)  # fmt: skip
    return decode_base64(url[match.end() :], param, limits=limits)


def fetch(url: str, param: str, timeout: float | None = None,
          limits: ImageLimits = DEFAULT_LIMITS) -> bytes:  # fmt: skip
    """The body at `url`, read within the byte limit and `timeout` (FETCH_TIMEOUT) seconds
    in all: a server that trickles bytes is cut off at the deadline, not per read."""
    import requests

    timeout = FETCH_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise InvalidRequest(f"{param}: fetching the image gave HTTP "
                                     f"{response.status_code}", param=param)  # fmt: skip
            if int(response.headers.get("Content-Length") or 0) > limits.max_bytes:
                raise _too_large(param, limits)
            body = bytearray()
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise _too_large(param, limits)
                if time.monotonic() > deadline:
                    raise requests.Timeout()
    except requests.RequestException as exc:  # a read timeout mid-body is a ConnectionError
        if isinstance(exc, requests.Timeout) or time.monotonic() >= deadline:
            raise InvalidRequest(f"{param}: fetching the image took more than {timeout:g} s",
                                 param=param) from None  # fmt: skip
        raise InvalidRequest(f"{param}: fetching the image failed: {type(exc).__name__}",
                             param=param) from None  # fmt: skip
    return bytes(body)


def _too_large(param: str, limits: ImageLimits) -> InvalidRequest:
    return InvalidRequest(f"{param}: image too large: more than {limits.max_bytes:,} bytes "
                          "(ORTSERVE_MAX_IMAGE_BYTES)", param=param)  # fmt: skip


def _too_many_pixels(param: str, size: tuple[int, int] | None,
                     limits: ImageLimits) -> InvalidRequest:  # fmt: skip
    shown = f" ({size[0]}x{size[1]})" if size else ""
    return InvalidRequest(f"{param}: image has too many pixels{shown}: at most "
                          f"{limits.max_pixels:,}", param=param)  # fmt: skip


# ---- images in stored conversations (the Responses API's previous_response_id) --------------


def portable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose images are base64 text: what a JSON store can hold."""
    return [_mapped(m, lambda b: base64.b64encode(b).decode("ascii")) for m in messages]


def restored(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """portable()'s messages with their images as bytes again."""
    return [_mapped(m, base64.b64decode) for m in messages]


def _mapped(message: dict[str, Any], convert) -> dict[str, Any]:
    images = message.get("images")
    if not images:
        return message
    return {**message, "images": [convert(image) for image in images]}


def count(prompts: list) -> int:
    """The images of every prompt of a request (ChatPrompt messages' and TextPrompt's)."""
    total = 0
    for prompt in prompts:
        total += len(getattr(prompt, "images", ()) or ())
        for message in getattr(prompt, "messages", ()) or ():
            total += len(message.get("images") or ())
    return total
