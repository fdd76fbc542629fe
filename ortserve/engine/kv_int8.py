"""int8 keys and values for the continuous loop's decoder (ORTSERVE_KV_CACHE_TYPE=q8).

onnxruntime's CPU GroupQueryAttention keeps its cache in int8 when asked to
(`kv_cache_bit_width` 8, `k_quant_type`/`v_quant_type`, `k_scale`/`v_scale` inputs): it
writes each new key as round(key / scale), saturated to [-128, 127], and reads the cache back
through the same scales, also with past and present bound to one buffer and rows of any
length in a batch (the loop's way). The scales are inputs, not computed by the op, so they
are calibrated here, once per bundle: the graph as it is (float32 cache) runs over a fixed
text rendered as a conversation (~900 tokens), and each cache channel's scale is its largest
magnitude there, times a margin, / 127 (PER_CHANNEL: one scale per head and channel,
kv_heads * head_size of them per layer).

Keys are cached after their rotary embedding, which turns each pair of channels (i, i +
half) by an angle that grows with the position: a channel's range at the calibration text's
first positions says little of its range at position 4000. The pair's length does not
change with the angle, so both channels of a pair take the pair's largest length.

The scales are written to the library's cache folder (models/cache/kv_int8/<bundle>/
scales.npz, whole then renamed), and later loads read them. Where anything fails (no scales
can be computed or written, the op refuses the form), a warning, and the cache stays float32.

Measured (docs/performance.md): a quarter of the bytes per token; on demo-chat int4 96% of
next tokens as with the float32 cache, logits cosine 0.9997; on the Qwen2.5-0.5B shape a
lone decode step 25% faster at 4096 tokens of context, but prompts slower (1000 tokens 1.2x,
4000 tokens 1.6x the time): the kernel's attention of a many-token chunk over an int8 past
runs 2-4x slower than over float32. A memory option, not a speed one.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ortserve.engine")

# Room above the calibration text's largest magnitudes. Measured on demo-chat (int4), next
# tokens and logits against the float32 cache: 1.25 0.959 / 0.99965 (min 0.988), 1.5 0.973 /
# 0.99978, 2 0.959 / 0.99980 (min 0.996), 2.5 0.966 / 0.99970; scales taken from the scored
# text itself (no margin needed) do no better than 2.
MARGIN = 2.0
_SCALES = "scales.npz"
_CHUNK = 64  # calibration tokens per pass (a pass's logits: [chunk, vocabulary] float32)
_LIMIT = 1024  # calibration tokens at most
_PREFIX = "/ortserve/kv_int8"

# Ordinary English and code, rendered as a conversation (each paragraph a message) with the
# model's chat template: its special tokens are where a chat model's keys and values reach
# their largest (the plain text alone left 0.3-0.8% of demo-chat's values clipped and cost
# 0.929 / 0.9954 next tokens / logits cosine, against 0.959 / 0.99965 at the same margin).
# Changing it changes the scales of bundles calibrated from now on (not those kept).
CALIBRATION_TEXT = """\
The harbour town woke slowly. Fishing boats came in with the tide, and the market opened
before the sun had cleared the hills. Maria counted the crates twice, wrote the numbers in
her notebook and asked the driver whether the road to the city was open again after the
storm. He said it was, but that the bridge near the old mill still had only one lane.

Question: what is the difference between a list and a tuple in Python?
Answer: a list can be changed after it is made (items added, removed or replaced), while a
tuple cannot. Tuples are often used for fixed records, such as a point (x, y), and can be
keys of a dictionary because they are hashable.

def moving_average(values, window):
    \"\"\"The average of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages

SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id =
customers.id WHERE orders.created_at >= '2024-01-01' GROUP BY name ORDER BY orders DESC;

Dear team, the release planned for Thursday moves to Monday: two tests still fail on the
Windows machines, and we would rather ship a week late than ship a bug. Thanks, Sam.
The results: 17 of 20 runs passed (85%), the median time was 3.4 seconds, and memory stayed
under 1.2 GB. Next steps: 1) fix the path handling, 2) rerun the suite, 3) update the notes.
"""


@dataclass
class Target:
    """Where a bundle's scales are kept, and what a calibration pass feeds."""

    folder: Path  # models/cache/kv_int8/<bundle>
    ids: str  # the input_ids input's name
    mask: str  # the attention_mask input's name
    head_size: int
    bundle: Path  # its tokenizer.json and chat template
    context_length: int


@dataclass
class Cache:
    """One GroupQueryAttention node's cache: its graph input and output names."""

    node: Any
    past_key: str
    past_value: str
    kv_heads: int
    rotary: tuple[int, bool] | None  # (rotated channels / 2, interleaved), None: no rotary


def rewrite(model: Any, graph: Path, options: Any, target: Target) -> bool:
    """Give every GroupQueryAttention of `model` an int8 cache, in place, with scales
    calibrated on `graph` (the same model, run as it is with `options`) or read from
    target.folder. True when done; False, with a warning where it failed, leaves `model`
    as it was."""
    caches = _caches(model)
    if not caches:
        log.warning(
            "int8 KV cache not used for %s (its attention is not the model builder's "
            "GroupQueryAttention over float32 caches): float32 cache",
            graph.parent.name,
        )
        return False
    try:
        if not _kernel_accepts(caches[0], target.head_size):
            raise RuntimeError("onnxruntime's GroupQueryAttention refuses an int8 cache")
        scales = _read(target.folder / _SCALES, caches, target.head_size)
        if scales is None:
            scales = _calibrate(graph, options, caches, target)
            _write(target.folder / _SCALES, scales)
    except Exception as exc:  # onnxruntime's own errors too: the float32 cache still works
        log.warning("int8 KV cache not used for %s (%s): float32 cache", graph.parent.name, exc)
        return False
    _apply(model, caches, scales)
    return True


def _caches(model: Any) -> list[Cache]:
    """The graph's attention caches, or [] where they are not the plain form (each past a
    graph input, each present a graph output, both read and written by that node only)."""
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    initializers = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    caches = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        names = [*node.input[3:5], *node.output[1:3]]
        if len(names) != 4 or not all(names) or "kv_cache_bit_width" in attrs:
            return []
        if any(name for name in node.input[12:14]):
            return []  # scales of its own already
        if not all(n in inputs for n in names[:2]) or not all(n in outputs for n in names[2:]):
            return []
        if any(readers.get(n, 0) != 1 for n in names[:2]) or any(n in readers for n in names[2:]):
            return []
        if any(inputs[n].type.tensor_type.elem_type != TensorProto.FLOAT for n in names[:2]):
            return []  # float32 caches only (the CPU builder's)
        rotary = None
        if attrs.get("do_rotary") and len(node.input) > 7 and node.input[7] in initializers:
            half = int(initializers[node.input[7]].dims[-1])  # cos_cache: [positions, rot / 2]
            rotary = (half, bool(attrs.get("rotary_interleaved", 0)))
        caches.append(Cache(node, names[0], names[1], int(attrs["kv_num_heads"]), rotary))
    return caches


def channel_scales(
    keys: np.ndarray,
    values: np.ndarray,
    rotary: tuple[int, bool] | None,
    margin: float = MARGIN,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scales [kv_heads * head_size] of one layer's keys and values
    [kv_heads, tokens, head_size] (float32): each channel's largest magnitude (a rotated
    key pair's largest length), times `margin`, / 127. A channel the text left near zero
    takes 1% of its layer's largest, so that it still holds what later text puts there."""
    key_range = np.abs(keys).max(axis=1)  # [kv_heads, head_size]
    if rotary is not None:
        key_range = _pair_lengths(keys, key_range, *rotary)
    value_range = np.abs(values).max(axis=1)
    return _scales(key_range, margin), _scales(value_range, margin)


def _pair_lengths(keys: np.ndarray, ranges: np.ndarray, half: int, interleaved: bool):
    """`ranges` with each rotated pair's channels set to the pair's largest length."""
    ranges = ranges.copy()
    if interleaved:  # pairs (2i, 2i + 1)
        first, second = np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)
    else:  # pairs (i, i + half)
        first, second = np.arange(half), np.arange(half, 2 * half)
    lengths = np.sqrt(keys[..., first] ** 2 + keys[..., second] ** 2).max(axis=1)
    ranges[:, first] = ranges[:, second] = lengths
    return ranges


def _scales(ranges: np.ndarray, margin: float) -> np.ndarray:
    floor = max(float(ranges.max()) * 0.01, 1e-6)
    return (np.maximum(ranges, floor) * margin / 127.0).astype(np.float32).reshape(-1)


def _calibrate(graph: Path, options: Any, caches: list[Cache], target: Target) -> dict:
    """Scales per cache input name, from one run of the graph as it is over the text."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(target.bundle / "tokenizer.json"))
    tokens = tokenizer.encode(calibration_text(target.bundle)).ids
    tokens = tokens[: min(_LIMIT, target.context_length)]
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    arrays = _observe(session, caches, target, tokens)
    scales = {}
    for cache, (keys, values) in zip(caches, arrays):
        k, v = channel_scales(keys[0], values[0], cache.rotary)
        scales[cache.past_key], scales[cache.past_value] = k, v
    log.info("%s: int8 KV cache scales calibrated on %d tokens", graph.parent.name, len(tokens))
    return scales


def calibration_text(bundle: Path) -> str:
    """CALIBRATION_TEXT as a conversation in the bundle's chat template (as it is where the
    bundle has none, or its template fails)."""
    from ortserve.engine.prompts import ChatTemplate

    paragraphs = [p.strip() for p in CALIBRATION_TEXT.split("\n\n")]
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(paragraphs)
    ]
    try:
        template = ChatTemplate.from_bundle(bundle)
        if template is not None:
            return template.render(messages, add_generation_prompt=False)
    except Exception as exc:  # a template of its own kind: the text alone still calibrates
        log.info("%s: chat template not used for calibration (%s)", bundle.name, exc)
    return CALIBRATION_TEXT


def _observe(session: Any, caches: list[Cache], target: Target, tokens: list[int]) -> list:
    """Each layer's cached keys and values [1, kv_heads, tokens, head_size] after the text
    (fed in chunks, past and present bound to one buffer, as the loop feeds a prefill)."""
    import onnxruntime as ort

    types = {i.name: i.type for i in session.get_inputs()}
    ids_type = np.int32 if types[target.ids] == "tensor(int32)" else np.int64
    mask_type = np.int32 if types[target.mask] == "tensor(int32)" else np.int64
    n = len(tokens)
    arrays = [
        tuple(np.zeros((1, c.kv_heads, n, target.head_size), np.float32) for _ in "kv")
        for c in caches
    ]
    binding = session.io_binding()
    for cache, pair in zip(caches, arrays):
        for past, present, array in zip(
            (cache.past_key, cache.past_value), cache.node.output[1:3], pair
        ):
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
    presents = {name for c in caches for name in c.node.output[1:3]}
    others = [o.name for o in session.get_outputs() if o.name not in presents]  # the logits
    for start in range(0, n, _CHUNK):
        chunk = np.asarray([tokens[start : start + _CHUNK]], dtype=ids_type)
        binding.bind_cpu_input(target.ids, chunk)
        binding.bind_cpu_input(target.mask, np.ones((1, start + chunk.shape[1]), mask_type))
        for name in others:  # bound again each pass: the last chunk's shape differs
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
    return arrays


def _read(path: Path, caches: list[Cache], head_size: int) -> dict | None:
    """The scales kept for this bundle, or None (none yet, or not of this graph's shape)."""
    try:
        with np.load(path) as data:
            scales = {name: data[name].astype(np.float32) for name in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # none, or a damaged one
        return None
    for cache in caches:
        for name in (cache.past_key, cache.past_value):
            scale = scales.get(name)
            if scale is None or scale.shape != (cache.kv_heads * head_size,):
                return None
            if not np.all(np.isfinite(scale) & (scale > 0)):
                return None
    return scales


def _write(path: Path, scales: dict) -> None:
    """Whole then renamed: a crash leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as out:
            np.savez(out, **scales)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _kernel_accepts(cache: Cache, head_size: int) -> bool:
    """Whether this onnxruntime runs the int8 form on the CPU: one node of the model's head
    counts, a shared int8 buffer, two tokens (a few milliseconds)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in cache.node.attribute}
    heads, kv_heads = int(attrs["num_heads"]), cache.kv_heads
    width = (heads + 2 * kv_heads) * head_size
    scale = numpy_helper.from_array(np.full(kv_heads * head_size, 0.05, np.float32), "scale")
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "k", "v", "lengths", "total", "", "", "", "", "", "scale", "scale"],
        ["out", "k_out", "v_out"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
        **_INT8_ATTRIBUTES,
    )
    cache_type = ["batch", kv_heads, "length", head_size]
    model = helper.make_model(
        helper.make_graph(
            [node],
            "check",
            [
                helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 2, width]),
                helper.make_tensor_value_info("k", TensorProto.INT8, cache_type),
                helper.make_tensor_value_info("v", TensorProto.INT8, cache_type),
                helper.make_tensor_value_info("lengths", TensorProto.INT32, [1]),
                helper.make_tensor_value_info("total", TensorProto.INT32, []),
            ],
            [
                helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("k_out", TensorProto.INT8, cache_type),
                helper.make_tensor_value_info("v_out", TensorProto.INT8, cache_type),
            ],
            [scale],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    keys, values = (np.zeros((1, kv_heads, 4, head_size), np.int8) for _ in "kv")
    binding = session.io_binding()
    for name, array in (("k", keys), ("v", values)):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(f"{name}_out", value)
    qkv = np.linspace(-1, 1, 2 * width, dtype=np.float32).reshape(1, 2, width)
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("lengths", np.asarray([1], np.int32))
    binding.bind_cpu_input("total", np.asarray(2, np.int32))
    binding.bind_output("out", "cpu")
    session.run_with_iobinding(binding)
    # the first token's keys, quantized in place (a kernel that ignored the form writes none)
    written = keys[0, :, 0]
    expected = qkv[0, 0, heads * head_size : (heads + kv_heads) * head_size]
    return bool(np.array_equal(written.reshape(-1), np.clip(np.rint(expected / 0.05), -128, 127)))


_INT8_ATTRIBUTES = {
    "k_quant_type": "PER_CHANNEL",
    "v_quant_type": "PER_CHANNEL",
    "kv_cache_bit_width": 8,
}


def _apply(model: Any, caches: list[Cache], scales: dict) -> None:
    """The int8 attributes and scale initializers on each node; its cache input and output
    declared int8 (the session's cache types, so BatchCache allocates int8 arrays)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = set()
    for layer, cache in enumerate(caches):
        node = cache.node
        while len(node.input) < 14:  # k_scale and v_scale are its 13th and 14th inputs
            node.input.append("")
        k_name, v_name = f"{_PREFIX}/{layer}/k_scale", f"{_PREFIX}/{layer}/v_scale"
        node.input[12], node.input[13] = k_name, v_name
        graph.initializer.append(numpy_helper.from_array(scales[cache.past_key], k_name))
        graph.initializer.append(numpy_helper.from_array(scales[cache.past_value], v_name))
        node.attribute.extend(helper.make_attribute(k, v) for k, v in _INT8_ATTRIBUTES.items())
        names.update((cache.past_key, cache.past_value, *node.output[1:3]))
    for value in (*graph.input, *graph.output):
        if value.name in names:
            value.type.tensor_type.elem_type = TensorProto.INT8
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)
