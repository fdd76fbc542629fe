"""int8 products for the continuous loop's decoder: its int4 projections run on MLAS's QGEMM.

A builder bundle's int4 weights run through MatMulNBits, whose CPU kernels compute with
AVX512-VNNI at best: a 1000-row prefill chunk of the Qwen2.5-0.5B shape's MLP runs at ~285
GOPS, no faster than fp32. MLAS's int8 QGEMM (uint8 x int8) runs the same product
on AMX tiles where the CPU has them, ~11x faster for prefill chunks and ~2.6x for 8-row steps
(benchmarks/matmul_paths.py). At one row the int4 kernel stays ahead: it reads half the bytes.

So where it is asked for, the loop's session (the bundle stays as it is) replaces each
MatMulNBits but the LM head with int8 products: the weights derived from the int4 ones (each
column dequantized from its 4-bit blocks and requantized with one scale, its largest
magnitude / 127: the int4 model's values up to half an int8 step), each row of activations
divided by its largest magnitude, then DynamicQuantizeMatMul (uint8 activations with one
scale for the tensor, which after that division, and a column of 1 and one of -1, is one
scale per row whatever rows share the pass: per token; MLAS's packed QGEMM against the int8
weight, and the column scales), then each row multiplied back.
Per token matters: one scale per tensor without the division cost 20% of next tokens on
demo-chat, per row 7-8%, about what rounding the weights alone costs. The LM head keeps its
int4 kernel: the loop runs it on a few positions only. The int8 weights are written once per
bundle into the library's cache folder (models/cache/int8/<bundle>/), beside hard links to
the bundle's own data files, so the session memory-maps everything from one folder and frees
what it packed.

ORTSERVE_CPU_INT8: `auto` (the default: on where the CPU has AMX-INT8), `on` or `off`.
Measured on this 2-core Xeon with AMX, Qwen2.5-0.5B shape: a 1024-token prompt's prefill
~3.3 -> ~1.2 s, 8 rows decoding 170 -> 216 tok/s, one row 46 -> 38 tok/s in-process (int8
weights are twice the bytes a token reads), +~40 MB RSS.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ortserve.engine")


def amx_available() -> bool:
    """Whether this CPU has AMX int8 tiles (Linux: /proc/cpuinfo; elsewhere not detected)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return "amx_int8" in flags.split()


def wanted(setting: str) -> bool:
    return setting == "on" or (setting == "auto" and amx_available())


def rewrite(model: Any, folder: Path, cache: Path, keep: set[str] = frozenset()) -> bool:
    """Replace `model`'s 4-bit MatMulNBits nodes (but those producing `keep`) in place.

    `folder` holds the model's external data; `cache` (this bundle's own folder, made here)
    receives the int8 weights once (`int8.data`, written whole then renamed: a crash leaves
    no half file) and a hard link to each data file of the bundle, so that the session reads
    all its weights from one folder, memory-mapped, and frees them once packed. True when
    something was replaced: the session's external-data folder is then `cache`."""
    from onnx import helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    plan = []  # (node, attrs)
    for node in graph.node:
        if node.op_type != "MatMulNBits" or set(node.output) & keep:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits", 4) != 4 or len([i for i in node.input if i]) != 3:
            continue  # zero points, bias or g_idx: left to MatMulNBits
        if not all(name in initializers for name in node.input[1:3]):
            continue
        plan.append((node, attrs))
    sizes = [(attrs["K"] + 2) * attrs["N"] + 4 * attrs["N"] for _, attrs in plan]
    data = cache / "int8.data"
    try:
        if not plan or not _linked(graph, folder, cache):
            return False
        if not data.is_file() or data.stat().st_size != sum(sizes):
            _write(data, plan, initializers, folder)
    except OSError as exc:  # a read-only or full disk: the graph runs as it is
        log.warning("int8 weights could not be written to %s (%s): int4 products", cache, exc)
        return False
    offset, replaced, products = 0, set(), []
    for node, attrs in plan:
        k, n = attrs["K"], attrs["N"]
        weight_name, scale_name = f"{node.input[1]}/int8", f"{node.input[2]}/int8_columns"
        rows = k + 2  # the two zero rows under the range columns (_product)
        graph.initializer.append(_external(weight_name, "int8", (rows, n), offset))
        graph.initializer.append(_external(scale_name, "float32", (n,), offset + rows * n))
        offset += rows * n + 4 * n
        replaced.update(node.input[1:3])
        products.append((node, _product(node, weight_name, scale_name)))
    for node, nodes in products:  # each node's place taken by its own subgraph, in order
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset_in, made in enumerate(nodes):
            graph.node.insert(at + offset_in, made)
    graph.initializer.extend(_constants())
    still_read = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return True


_K = "/ortserve/int8"  # the shared constants' prefix


def _constants() -> list:
    from onnx import numpy_helper

    values = {"axes": np.array([-1], np.int64), "tiny": np.array(1e-12, np.float32),
              "one_more": np.array([0, 1], np.int64), "1": np.array(1, np.float32),
              "-1": np.array(-1, np.float32)}  # fmt: skip
    return [numpy_helper.from_array(value, f"{_K}/{name}") for name, value in values.items()]


def _product(node: Any, weight: str, column_scale: str) -> list:
    """x @ W as int8 products, activations quantized per row: each row divided by its
    largest magnitude (so that every row spans [-1, 1]), a column of 1 and one of -1 added
    (the weight has two zero rows under them: the product is unchanged), then
    DynamicQuantizeMatMul, then each row multiplied back.

    DynamicQuantizeMatMul quantizes its input with one uint8 scale for the whole tensor, from
    its least and largest values; after the division and the two columns these are -1 and 1
    for every tensor, so each row is quantized alike whatever rows share the pass: a row's
    products do not depend on the other turns in the batch, nor on how many positions a
    speculating row verifies. (Without the columns, an all-positive row alone got a finer
    scale than in a batch.) MLAS's packed QGEMM (uint8 x int8) runs the product, scaled by
    the column scales.

    Eight nodes. The first version quantized each row itself (Div, Round, Add, Cast,
    MatMulInteger, Cast, two Muls: twelve nodes), as exact and ~12% slower for a prefill."""
    from onnx import helper

    x, (y,), p = node.input[0], node.output, f"{node.name}/int8"

    def op(kind: str, inputs: list[str], output: str, domain: str = "", **attrs: Any):
        return helper.make_node(kind, inputs, [output], domain=domain or None,
                                name=f"{p}/{kind}_{output.rsplit('/', 1)[-1]}", **attrs)  # fmt: skip

    return [
        op("Abs", [x], f"{p}/abs"),
        op("ReduceMax", [f"{p}/abs", f"{_K}/axes"], f"{p}/raw_largest", keepdims=1),
        op("Max", [f"{p}/raw_largest", f"{_K}/tiny"], f"{p}/largest"),  # an all-zero row
        op("Div", [x, f"{p}/largest"], f"{p}/normalized"),
        op("Pad", [f"{p}/normalized", f"{_K}/one_more", f"{_K}/1", f"{_K}/axes"], f"{p}/up_to_1"),
        op("Pad", [f"{p}/up_to_1", f"{_K}/one_more", f"{_K}/-1", f"{_K}/axes"], f"{p}/ranged"),
        op(
            "DynamicQuantizeMatMul",
            [f"{p}/ranged", weight, column_scale],
            f"{p}/product",
            domain="com.microsoft",
        ),  # fmt: skip
        helper.make_node("Mul", [f"{p}/product", f"{p}/largest"], [y], name=f"{p}/Mul_out"),
    ]


def _linked(graph: Any, folder: Path, cache: Path) -> bool:
    """Hard links in `cache` to the bundle's data files (False where none can be made:
    another file system; the graph then runs as it is)."""
    from onnx import TensorProto

    cache.mkdir(parents=True, exist_ok=True)
    locations = {
        entry.value
        for init in graph.initializer
        if init.data_location == TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    for location in locations:
        source, link = folder / location, cache / location
        if Path(location).is_absolute() or ".." in Path(location).parts:
            return False  # never trusted: bundles name files beside their graph
        if link.exists() and os.path.samefile(source, link):
            continue
        try:
            link.unlink(missing_ok=True)
            os.link(source, link)
        except OSError:
            return False
    return True


def _write(data: Path, plan: list, initializers: dict, folder: Path) -> None:
    temporary = data.with_name(f".{data.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as out:
            for node, attrs in plan:
                blocks, scales = (_array(initializers[name], folder) for name in node.input[1:3])
                weight, column_scale = _int8_columns(blocks, scales, attrs["K"], attrs["N"])
                out.write(weight.tobytes())
                out.write(column_scale.tobytes())
        os.replace(temporary, data)
    finally:
        temporary.unlink(missing_ok=True)


def _int8_columns(
    blocks: np.ndarray, scales: np.ndarray, k: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' [N, blocks, block/2] nibbles (low first, offset 8) and [N, blocks] scales
    -> int8 weight [K + 2, N] (two zero rows last) and one scale per column [N] (float32)."""
    blocks = blocks.reshape(n, -1, blocks.shape[-1])
    low = (blocks & 0x0F).astype(np.int8) - 8
    high = (blocks >> 4).astype(np.int8) - 8
    nibbles = np.stack((low, high), axis=-1).reshape(n, blocks.shape[1], -1)
    values = nibbles.astype(np.float32) * scales.reshape(n, -1, 1).astype(np.float32)
    values = values.reshape(n, -1)[:, :k]
    column_scale = np.abs(values).max(axis=1) / 127.0
    column_scale[column_scale == 0] = 1.0
    weight = np.clip(np.rint(values / column_scale[:, None]), -127, 127).astype(np.int8)
    zero_rows = np.zeros((2, n), dtype=np.int8)  # under _product's two range columns
    return np.concatenate([weight.T, zero_rows]), column_scale.astype(np.float32)


def _array(tensor: Any, folder: Path) -> np.ndarray:
    """An initializer's values, read from its external data file by offset when it has one."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    with open(folder / info["location"], "rb") as data:
        data.seek(int(info.get("offset", 0)))
        raw = data.read(count * np.dtype(dtype).itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))


def _external(name: str, dtype: str, shape: tuple[int, ...], offset: int) -> Any:
    """A declaration of an initializer stored in int8.data at `offset`."""
    from onnx import TensorProto, helper

    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensor.dims.extend(shape)
    tensor.data_location = TensorProto.EXTERNAL
    length = int(np.prod(shape)) * np.dtype(dtype).itemsize
    for key, value in (("location", "int8.data"), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
