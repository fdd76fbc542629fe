"""Attention within a picture both ways: the decoder rewrite that Gemma 3's prompt needs.

Gemma 3 lets the soft tokens of one picture attend to each other in both directions (transformers
builds that mask from `token_type_ids`), while the model builder's decoder runs every layer's
attention through GroupQueryAttention, which is causal by construction on the CPU (an
`attention_bias` only adds to the scores it keeps). The two agree on text, not on a picture.

This rewrite keeps the builder's decoder and replaces each GroupQueryAttention node by what
computes the same thing with a mask of our own:

- the decoder takes `input_ids` beside `inputs_embeds` (og 0.18 feeds a multimodal decoder the
  step's ids when its graph asks for them, as it does for Gemma 4);
- one boolean mask per kind of layer, built once per step from `input_ids` and `attention_mask`:
  causal (within the sliding window on local layers, as transformers counts it: a key attends
  when `query - key < window`), or the query and the key are soft tokens of the same picture in
  this step's tokens; keys the attention mask hides never attend;
- per layer: RotaryEmbedding (com.microsoft) on the queries and keys at the step's positions,
  with the layer's own cos/sin caches, then ONNX's Attention (opset 23) with the layer's heads,
  scale and soft cap, the mask, and the past keys/values, which returns the present ones.

Attention (23) returns the past and the step concatenated, so the bundle's KV cache no longer
shares one buffer between past and present (`past_present_share_buffer` false in
genai_config.json); og then grows the cache itself.

A picture's tokens always arrive within one step (og's prompt is one step), so a key of an
earlier step is never a soft token of the query's picture: causality already lets it attend.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

_PREFIX = "/model/image_attention"
_ATTENTION_OPSET = 23


def rewrite(decoder: Path, image_token_id: int, sliding_window: int | None) -> int:
    """Rewrite decoder (an ONNX file whose weights may live in an external data file beside it,
    left untouched) in place. Returns the number of attention nodes replaced."""
    model = onnx.load(str(decoder), load_external_data=False)
    graph = model.graph
    layers = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    if not layers:
        raise ValueError(f"{decoder.name} has no GroupQueryAttention node to replace")
    if "input_ids" not in {value.name for value in graph.input}:
        graph.input.append(
            helper.make_tensor_value_info(
                "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            )
        )
    nodes = _mask_nodes(image_token_id, sliding_window)
    for index, gqa in enumerate(layers):
        nodes += _attention_nodes(index, gqa, sliding_window)
    kept = [node for node in graph.node if node.op_type != "GroupQueryAttention"]
    del graph.node[:]
    graph.node.extend(_in_order(kept + nodes, graph))
    _prune(graph)
    _use_opset(model, _ATTENTION_OPSET)
    onnx.save(model, str(decoder))
    return len(layers)


# ---- the masks, once per step --------------------------------------------------------------------


def _mask_nodes(image_token_id: int, sliding_window: int | None) -> list[onnx.NodeProto]:
    """`{_PREFIX}/global_mask` (and `/local_mask`): bool [batch, 1, step, total]."""
    p = _PREFIX
    nodes = [
        _const(f"{p}/zero", 0),
        _const(f"{p}/one", 1),
        _const(f"{p}/axis0", [0]),
        _const(f"{p}/axis1", [1]),
        _const(f"{p}/axes12", [1, 2]),
        _const(f"{p}/image_token", image_token_id),
        # step length S, total length T, past length P = T - S
        helper.make_node("Shape", ["input_ids"], [f"{p}/ids_shape"], start=1, end=2),
        helper.make_node("Squeeze", [f"{p}/ids_shape", f"{p}/axis0"], [f"{p}/step"]),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/mask_shape"], start=1, end=2),
        helper.make_node("Squeeze", [f"{p}/mask_shape", f"{p}/axis0"], [f"{p}/total"]),
        helper.make_node("Sub", [f"{p}/total", f"{p}/step"], [f"{p}/past"]),
        # positions: queries P..T-1 [S], keys 0..T-1 [T]
        helper.make_node("Range", [f"{p}/past", f"{p}/total", f"{p}/one"], [f"{p}/query_pos"]),
        helper.make_node("Range", [f"{p}/zero", f"{p}/total", f"{p}/one"], [f"{p}/key_pos"]),
        helper.make_node("Unsqueeze", [f"{p}/query_pos", f"{p}/axis1"], [f"{p}/query_col"]),
        helper.make_node("Unsqueeze", [f"{p}/query_pos", f"{p}/axis0"], [f"{p}/position_ids"]),
        helper.make_node("Sub", [f"{p}/query_col", f"{p}/key_pos"], [f"{p}/distance"]),
        helper.make_node("GreaterOrEqual", [f"{p}/distance", f"{p}/zero"], [f"{p}/causal"]),
        # soft tokens of one picture: a run of image tokens, numbered 1, 2, ... in the step
        helper.make_node("Equal", ["input_ids", f"{p}/image_token"], [f"{p}/is_image"]),
        helper.make_node("Cast", [f"{p}/is_image"], [f"{p}/image_int"], to=TensorProto.INT64),
        helper.make_node("Pad", [f"{p}/image_int", f"{p}/pad_before"], [f"{p}/image_shifted"]),
        _const(f"{p}/pad_before", [0, 1, 0, -1]),
        helper.make_node("Sub", [f"{p}/image_int", f"{p}/image_shifted"], [f"{p}/change"]),
        helper.make_node("Equal", [f"{p}/change", f"{p}/one"], [f"{p}/starts"]),
        helper.make_node("Cast", [f"{p}/starts"], [f"{p}/starts_int"], to=TensorProto.INT64),
        helper.make_node("CumSum", [f"{p}/starts_int", f"{p}/one"], [f"{p}/run"]),
        helper.make_node("Mul", [f"{p}/run", f"{p}/image_int"], [f"{p}/picture"]),  # 0: text
        # keys: past tokens are text here (never of this step's pictures)
        helper.make_node("Shape", ["input_ids"], [f"{p}/batch_dim"], start=0, end=1),
        helper.make_node("Unsqueeze", [f"{p}/past", f"{p}/axis0"], [f"{p}/past_dim"]),
        helper.make_node(
            "Concat", [f"{p}/batch_dim", f"{p}/past_dim"], [f"{p}/past_shape"], axis=0
        ),  # fmt: skip
        helper.make_node(
            "ConstantOfShape",
            [f"{p}/past_shape"],
            [f"{p}/past_pictures"],
            value=helper.make_tensor("v", TensorProto.INT64, [1], [0]),
        ),  # fmt: skip
        helper.make_node(
            "Concat", [f"{p}/past_pictures", f"{p}/picture"], [f"{p}/key_picture"], axis=1
        ),  # fmt: skip
        helper.make_node("Unsqueeze", [f"{p}/picture", f"{p}/axes12_last"], [f"{p}/q_picture"]),
        _const(f"{p}/axes12_last", [1, 3]),
        helper.make_node("Unsqueeze", [f"{p}/key_picture", f"{p}/axes12"], [f"{p}/k_picture"]),
        helper.make_node("Equal", [f"{p}/q_picture", f"{p}/k_picture"], [f"{p}/same_run"]),
        helper.make_node("Greater", [f"{p}/q_picture", f"{p}/zero"], [f"{p}/q_is_image"]),
        helper.make_node("And", [f"{p}/same_run", f"{p}/q_is_image"], [f"{p}/same_picture"]),
        # keys the attention mask hides: [batch, 1, 1, T]
        helper.make_node("Cast", ["attention_mask"], [f"{p}/key_valid_2d"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", [f"{p}/key_valid_2d", f"{p}/axes12"], [f"{p}/key_valid"]),
        *_allowed("global", f"{p}/causal"),
    ]
    if sliding_window:
        nodes += [
            _const(f"{p}/window", sliding_window),
            helper.make_node("Less", [f"{p}/distance", f"{p}/window"], [f"{p}/in_window"]),
            helper.make_node("And", [f"{p}/causal", f"{p}/in_window"], [f"{p}/local_causal"]),
            *_allowed("local", f"{p}/local_causal"),
        ]
    return nodes


def _allowed(kind: str, causal: str) -> list[onnx.NodeProto]:
    p = _PREFIX
    return [
        helper.make_node("Or", [causal, f"{p}/same_picture"], [f"{p}/{kind}_either"]),
        helper.make_node("And", [f"{p}/{kind}_either", f"{p}/key_valid"], [f"{p}/{kind}_mask"]),
    ]


# ---- one layer ---------------------------------------------------------------------------------


def _attention_nodes(
    index: int, gqa: onnx.NodeProto, sliding_window: int | None
) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
    if not attrs.get("do_rotary"):
        raise ValueError("expected GroupQueryAttention with do_rotary (the CPU builder's)")
    query, key, value, past_key, past_value = gqa.input[:5]
    cos, sin = gqa.input[7], gqa.input[8]
    local = attrs.get("local_window_size", -1) > 0
    mask = f"{_PREFIX}/{'local' if local and sliding_window else 'global'}_mask"
    p = f"{_PREFIX}/layers.{index}"
    rotary = {"domain": "com.microsoft", "interleaved": attrs.get("rotary_interleaved", 0)}
    heads = {"q_num_heads": attrs["num_heads"], "kv_num_heads": attrs["kv_num_heads"]}
    if attrs.get("scale"):
        heads["scale"] = attrs["scale"]
    if attrs.get("softcap"):
        heads["softcap"] = attrs["softcap"]
    output, present_key, present_value = gqa.output[:3]
    return [
        helper.make_node(
            "RotaryEmbedding",
            [query, f"{_PREFIX}/position_ids", cos, sin],
            [f"{p}/q_rot"],
            num_heads=attrs["num_heads"],
            **rotary,
        ),  # fmt: skip
        helper.make_node(
            "RotaryEmbedding",
            [key, f"{_PREFIX}/position_ids", cos, sin],
            [f"{p}/k_rot"],
            num_heads=attrs["kv_num_heads"],
            **rotary,
        ),  # fmt: skip
        helper.make_node(
            "Attention",
            [f"{p}/q_rot", f"{p}/k_rot", value, mask, past_key, past_value],
            [output, present_key, present_value],
            is_causal=0,
            **heads,
        ),
    ]


# ---- graph plumbing ----------------------------------------------------------------------------


def _const(name: str, value: int | list[int]) -> onnx.NodeProto:
    dims = [] if isinstance(value, int) else [len(value)]
    values = [value] if isinstance(value, int) else value
    tensor = helper.make_tensor(name, TensorProto.INT64, dims, values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _in_order(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Topological order (ONNX requires each node after its inputs' producers)."""
    ready = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    ready.add("")
    ordered, waiting = [], list(nodes)
    while waiting:
        progressed = [node for node in waiting if all(name in ready for name in node.input)]
        if not progressed:
            missing = {n for node in waiting for n in node.input if n not in ready}
            raise ValueError(f"the rewritten graph has inputs nothing produces: {sorted(missing)}")
        for node in progressed:
            ordered.append(node)
            ready.update(node.output)
        waiting = [node for node in waiting if node not in progressed]
    return ordered


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes whose outputs nothing reads (GroupQueryAttention's seqlens_k and total
    length subgraph)."""
    while True:
        needed = {value.name for value in graph.output}
        needed |= {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(out in needed for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _use_opset(model: onnx.ModelProto, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)
