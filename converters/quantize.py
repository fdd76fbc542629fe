"""Weight precision: int4/int8 weight-only (MatMulNBits), fp16, or fp32 as exported."""

from __future__ import annotations

import os
from pathlib import Path

PRECISIONS = ("int4", "int8", "fp16", "fp32")
DATA_SUFFIX = ".data"


def apply_precision(
    src: Path, dst: Path, precision: str, *, block_size: int = 32, kind: str = "decoder"
) -> None:
    """Write src (an fp32 ONNX model) to dst at `precision`, weights in dst + '.data'."""
    import onnx

    if precision == "fp32":
        _move_model(src, dst)
        return
    model = onnx.load(str(src))
    if precision == "fp16":
        model = _to_fp16(model, keep_io_types=kind == "encoder")
    else:
        model = _to_nbits(model, bits=4 if precision == "int4" else 8, block_size=block_size)
    _save(model, dst)


def _to_nbits(model, *, bits: int, block_size: int):
    import logging
    import warnings

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Its warnings are noise here: the opset/IR upgrade it announces is checked by the verify
    # step (the bundle must load and agree with transformers), and all-zero blocks divide by
    # a zero scale that np.where then discards.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"onnxruntime\.quantization")
    # accuracy_level=4 (int8 activations) is the fast CPU kernel; symmetric matches the
    # ORT GenAI model builder's default. At 4 bits the embedding table (Gather) is quantized
    # too (GatherBlockQuantized, which has no 8-bit form): in small models it is a quarter of
    # the weights.
    op_types = ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    return quantizer.model.model


def _to_fp16(model, *, keep_io_types: bool):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=True)


def _save(model, dst: Path) -> None:
    import onnx

    data = dst.name + DATA_SUFFIX
    onnx.save_model(model, str(dst), save_as_external_data=True, location=data, size_threshold=0)


def _move_model(src: Path, dst: Path) -> None:
    """Move an exported model and any external-data files beside it."""
    for path in src.parent.iterdir():
        if path.name.startswith(src.name) and path.name != src.name:
            os.replace(path, dst.parent / path.name)
    os.replace(src, dst)
