"""Hugging Face checkpoint -> ONNX GenAI bundle in the ortserve library.

from converters import convert
info = convert("path/to/checkpoint", "mymodel:int4", precision="int4")  # backend="auto"
info.name, info.path
"""

from converters.checkpoint import supported_architectures
from converters.convert import BACKENDS, ConvertOptions, convert
from converters.quantize import PRECISIONS
from ortserve.library import ModelInfo

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "ConvertOptions",
    "ModelInfo",
    "convert",
    "supported_architectures",
]
