"""LoRA adapters for converted bundles: graph inputs for the LoRA weights, PEFT -> .onnx_adapter.

onnxruntime-genai applies an adapter by feeding its tensors to the session as inputs, by
name (og.Adapters -> OrtLoraAdapter -> RunOptions). Converted bundles have no such inputs,
so `add_lora_inputs` rewrites each projection of each layer

    y = MatMul(x, W)            ->    y = MatMul(x, W) + MatMul(MatMul(x, A), B)

with A [in, rank] and B [rank, out] as graph inputs that are also initializers: empty
tensors (rank 0) by default, so a session that feeds nothing (no adapter active, or
og.Engine, which cannot activate adapters) computes exactly the base model, and an active
adapter overrides them. The names follow the ORT GenAI model builder:
`model.layers.{i}.attn.q_proj.lora_A.MatMul.weight`, `...mlp.down_proj.lora_B.MatMul.weight`.

The model builder's graphs compute several projections in one node: `qkv_proj` feeds
GroupQueryAttention [q | k | v], `gate_up_proj` a Split into gate and up. Such a node gets
one LoRA branch per projection, concatenated in the node's own order,

    y = MatMulNBits(x, W_qkv) + Concat(x A_q B_q, x A_k B_k, x A_v B_v)

so adapters name q_proj, k_proj, v_proj, gate_proj and up_proj as the builder's own LoRA
graphs do, whatever the fusion. A PEFT adapter of a packed module (phi3's qkv_proj,
gate_up_proj) is split the same way: its A shared, its B cut by the projections' widths.

`convert_peft_adapter` turns a PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors) into an .onnx_adapter file with those names: A and B transposed
to the graph's MatMul layout, B scaled by lora_alpha / r (or / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ortserve.errors import InvalidRequest

log = logging.getLogger("ortserve.convert")

# optimum names a projection's node after the module path: /model/layers.3/self_attn/q_proj/MatMul
# (MatMul_Q4 / MatMul_Q8 once quantized to MatMulNBits). The model builder writes /attn/.
_NODE = re.compile(r"^/model/layers\.(\d+)/(self_attn|attn|mlp)/(\w+_proj)/MatMul(_Q\d+)?$")
# The builder's Split of gate_up_proj names its outputs /model/layers.3/mlp/gate_proj/MatMul/output_0.
_PART_OUTPUT = re.compile(r"^/model/layers\.\d+/\w+/(\w+_proj)/")
# Packed modules and the projections they hold, in order.
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# PEFT saves base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (no adapter name).
_PEFT_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn|attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$"
)
_LORA_INPUT = re.compile(
    r"^(model\.layers\.\d+\.(?:attn|mlp)\.\w+_proj)\.lora_([AB])\.MatMul\.weight$"
)
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@dataclass(frozen=True)
class LoraTarget:
    """One adaptable projection of the graph: its module name, shape and activation type."""

    module: str  # model.layers.0.attn.q_proj
    in_features: int
    out_features: int
    dtype: str  # numpy dtype name of the activations: float32 or float16

    @property
    def a_name(self) -> str:
        return f"{self.module}.lora_A.MatMul.weight"

    @property
    def b_name(self) -> str:
        return f"{self.module}.lora_B.MatMul.weight"


def module_name(layer: str | int, block: str, projection: str) -> str:
    """The graph's module name: self_attn is written attn, as the model builder does."""
    return f"model.layers.{layer}.{'mlp' if block == 'mlp' else 'attn'}.{projection}"


# ---- graph surgery --------------------------------------------------------------------------


def add_lora_inputs(src: Path, dst: Path) -> list[LoraTarget]:
    """Write src (an ONNX decoder) to dst with LoRA inputs on every projection.

    Only the graph is rewritten: external-data references are kept as they are (relative
    paths), so dst's directory must hold the same data files (hard links) as src's. A graph
    that keeps its weights inside the .onnx file is written whole (a copy of the weights).
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    if lora_targets(model):
        raise InvalidRequest(f"{src.name} already has LoRA inputs", param="adapters")
    targets = _rewrite(model.graph)
    if not targets:
        raise InvalidRequest(
            "the base model's graph has no projections ortserve can adapt "
            "(expected nodes named /model/layers.N/self_attn/q_proj/MatMul as optimum exports)",
            param="adapters",
        )
    onnx.save_model(model, str(dst))
    return targets


def lora_targets(model) -> list[LoraTarget]:
    """The LoRA inputs a graph (onnx.ModelProto, or a path) already has."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = {i.name: i.type.tensor_type for i in model.graph.input}
    targets = []
    for name, tensor in shapes.items():
        match = _LORA_INPUT.match(name)
        if not match or match.group(2) != "A":
            continue
        module = match.group(1)
        b = shapes.get(f"{module}.lora_B.MatMul.weight")
        if b is None:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        targets.append(LoraTarget(module, _dim(tensor, 0), _dim(b, 1), dtype))
    return targets


def _rewrite(graph) -> list[LoraTarget]:
    """Add the LoRA branches after every projection node; return what was adapted."""
    initializers = {t.name: t for t in graph.initializer}
    layout = _GraphLayout(graph)
    nodes, targets = [], []
    for node in graph.node:
        nodes.append(node)
        match = _NODE.match(node.name)
        if not match or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        target = _target(node, match, initializers)
        if target is None:
            log.warning("not adapting %s: its weight is not an initializer", node.name)
            continue
        parts = layout.parts(node, match, target)
        nodes.extend(_lora_branches(graph, node, parts, prefix=node.name.rsplit("/", 1)[0]))
        targets.extend(parts)
    del graph.node[:]
    graph.node.extend(nodes)
    return targets


class _GraphLayout:
    """What a graph says about its fused projection nodes: their consumers and head counts."""

    def __init__(self, graph):
        from onnx import helper

        self.consumers: dict[str, list] = {}
        self.heads: dict[str, tuple[int, int]] = {}  # layer -> (num_heads, kv_num_heads)
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            # packed QKV: GroupQueryAttention's key and value inputs are empty
            if node.op_type == "GroupQueryAttention" and not any(node.input[1:3]):
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                layer = re.match(r"^/model/layers\.(\d+)/", node.name)
                if layer:
                    self.heads[layer.group(1)] = (attrs["num_heads"], attrs["kv_num_heads"])

    def parts(self, node, match: re.Match, whole: LoraTarget) -> list[LoraTarget]:
        """The projections a node computes: itself, or the parts of a builder fusion."""
        layer, block, projection, _ = match.groups()
        widths: list[tuple[str, int]] = []
        if projection == "qkv_proj" and layer in self.heads:
            widths = _qkv_widths(whole.out_features, *self.heads[layer])
        elif projection == "gate_up_proj":
            widths = self._split_widths(node.output[0], whole.out_features)
        if not widths:
            return [whole]
        return [LoraTarget(module_name(layer, block, name), whole.in_features, width, whole.dtype)
                for name, width in widths]  # fmt: skip

    def _split_widths(self, output: str, total: int) -> list[tuple[str, int]]:
        """gate_up_proj -> Split(gate_proj, up_proj), equal halves, as the builder fuses them."""
        for consumer in self.consumers.get(output, []):
            if consumer.op_type != "Split":
                continue
            names = [m.group(1) for m in map(_PART_OUTPUT.match, consumer.output) if m]
            if tuple(names) == _PACKED["gate_up_proj"] and total % 2 == 0:
                return [(name, total // 2) for name in names]
        return []


def _qkv_widths(total: int, heads: int, kv_heads: int) -> list[tuple[str, int]]:
    """[q | k | v] widths of a packed QKV projection feeding GroupQueryAttention."""
    head_size, rest = divmod(total, heads + 2 * kv_heads)
    if rest:
        return []
    return [("q_proj", heads * head_size), ("k_proj", kv_heads * head_size),
            ("v_proj", kv_heads * head_size)]  # fmt: skip


def _target(node, match: re.Match, initializers: dict) -> LoraTarget | None:
    from onnx import helper

    layer, block, projection, _ = match.groups()
    if node.op_type == "MatMul":
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            return None
        (k, n), elem = weight.dims, weight.data_type
    else:  # MatMulNBits: K and N are attributes; the scales carry the activation type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scales = initializers.get(node.input[2])
        if scales is None:
            return None
        k, n, elem = attrs["K"], attrs["N"], scales.data_type
    dtype = helper.tensor_dtype_to_np_dtype(elem).name
    return LoraTarget(module_name(layer, block, projection), int(k), int(n), dtype)


def _lora_branches(graph, node, parts: list[LoraTarget], prefix: str) -> list:
    """Nodes adding the LoRA branch of each part (concatenated) to `node`'s output."""
    from onnx import helper

    output = node.output[0]
    base = f"{prefix}/base_output_0"
    node.output[0] = base
    nodes, deltas = [], []
    for part in parts:
        # a part's nodes are named after its own projection: /model/layers.0/attn/q_proj/lora_A
        where = f"{prefix.rsplit('/', 1)[0]}/{part.module.rsplit('.', 1)[1]}"
        nodes += _lora_branch(graph, node.input[0], part, where)
        deltas.append(nodes[-1].output[0])
    if len(deltas) > 1:
        delta = f"{prefix}/lora/Concat/output_0"
        nodes.append(helper.make_node("Concat", deltas, [delta], name=f"{prefix}/lora/Concat",
                                      axis=-1))  # fmt: skip
        deltas = [delta]
    nodes.append(helper.make_node("Add", [base, deltas[0]], [output], name=f"{prefix}/lora/Add"))
    return nodes


def _lora_branch(graph, x: str, target: LoraTarget, prefix: str) -> list:
    """Inputs A, B (empty by default) and x -> MatMul(A) -> MatMul(B)."""
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(target.dtype))
    rank = f"{target.module}.lora_rank"
    graph.input.append(
        helper.make_tensor_value_info(target.a_name, elem, [target.in_features, rank])
    )
    graph.input.append(
        helper.make_tensor_value_info(target.b_name, elem, [rank, target.out_features])
    )
    empty_a = np.zeros((target.in_features, 0), dtype=target.dtype)
    empty_b = np.zeros((0, target.out_features), dtype=target.dtype)
    graph.initializer.append(numpy_helper.from_array(empty_a, target.a_name))
    graph.initializer.append(numpy_helper.from_array(empty_b, target.b_name))
    down, up = f"{prefix}/lora_A/MatMul/output_0", f"{prefix}/lora_B/MatMul/output_0"
    return [
        helper.make_node("MatMul", [x, target.a_name], [down], name=f"{prefix}/lora_A/MatMul"),
        helper.make_node("MatMul", [down, target.b_name], [up], name=f"{prefix}/lora_B/MatMul"),
    ]


def external_data_files(model_path: Path) -> list[str]:
    """Relative paths of the external-data files a graph's initializers point at."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(entry.value)
    return sorted(files)


def _dim(tensor_type, index: int) -> int:
    return int(tensor_type.shape.dim[index].dim_value)


# ---- adapters ---------------------------------------------------------------------------------


def convert_peft_adapter(
    peft_dir: Path,
    out_file: Path,
    *,
    targets: list[LoraTarget] | None = None,
    config_file: Path | None = None,
    weights_file: Path | None = None,
) -> dict[str, tuple[int, ...]]:
    """PEFT LoRA adapter -> .onnx_adapter at out_file; return {input name: shape}.

    The two files may be given separately (config_file, weights_file) instead of a
    directory. With `targets` (the adapted graph's), every tensor is checked against the
    graph and written in its activation type; without, as float32.
    """
    config_file = config_file or Path(peft_dir) / "adapter_config.json"
    weights_file = weights_file or Path(peft_dir) / "adapter_model.safetensors"
    config = read_peft_config(config_file)
    tensors = read_safetensors(weights_file)
    params = peft_to_graph(tensors, config)
    if targets is not None:
        params = unpack_modules(params, targets)
        params = {name: value.astype(dtype) for name, (value, dtype) in
                  _match_targets(params, targets).items()}  # fmt: skip
    write_onnx_adapter(params, out_file)
    return {name: tuple(value.shape) for name, value in params.items()}


def read_peft_config(path: Path) -> dict:
    """adapter_config.json, checked for what ortserve can apply (plain LoRA on linears)."""
    if not Path(path).is_file():
        raise InvalidRequest(f"adapter_config.json not found: {path}", param="adapters")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read adapter_config.json: {exc}", param="adapters") from exc
    if not isinstance(config, dict):
        raise InvalidRequest("adapter_config.json is not a JSON object", param="adapters")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise InvalidRequest(f"PEFT type {kind!r} is not supported, only LORA", param="adapters")
    if config.get("use_dora"):
        raise InvalidRequest("DoRA adapters (use_dora) are not supported", param="adapters")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise InvalidRequest(f"adapter_config.json: {key} must be a positive number",
                                 param="adapters")  # fmt: skip
    return config


def peft_to_graph(tensors: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """PEFT tensors -> graph inputs: A^T [in, r] and (scale * B)^T [r, out], float32."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise InvalidRequest(
                f"adapter tensor {key!r} is not a LoRA weight of a layer projection "
                "(embedding LoRA, DoRA and modules_to_save are not supported)",
                param="adapters",
            )
        layer, block, projection, which = match.groups()
        pairs.setdefault(module_name(layer, block, projection), {})[which] = value
    params = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidRequest(f"adapter has lora_A without lora_B (or the reverse) for {module}",
                                 param="adapters")  # fmt: skip
        a, b = pair["A"].astype(np.float32), pair["B"].astype(np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidRequest(
                f"adapter shapes for {module} do not form a LoRA pair: lora_A {a.shape}, "
                f"lora_B {b.shape}",
                param="adapters",
            )
        scale = _scale(config, module, rank=a.shape[0])
        params[f"{module}.lora_A.MatMul.weight"] = np.ascontiguousarray(a.T)
        params[f"{module}.lora_B.MatMul.weight"] = np.ascontiguousarray((b * scale).T)
    if not params:
        raise InvalidRequest("the adapter holds no LoRA weights", param="adapters")
    return params


def unpack_modules(params: dict[str, np.ndarray], targets: list[LoraTarget]) -> dict:
    """A packed module's tensors (qkv_proj, gate_up_proj) as its projections', where the graph
    adapts those: A shared by each, B [rank, out] cut by their widths (the builder's split)."""
    known = {target.module: target for target in targets}
    out = {}
    for name, value in params.items():
        module, which = name.split(".lora_", 1)
        prefix, projection = module.rsplit(".", 1)
        parts = [f"{prefix}.{p}" for p in _PACKED.get(projection, ())]
        if module in known or not parts or not all(p in known for p in parts):
            out[name] = value
            continue
        start = 0
        for part in parts:
            width = known[part].out_features
            # A [in, rank] is the same input projection for every part; B's columns are theirs
            out[f"{part}.lora_{which}"] = (
                value if which.startswith("A") else value[:, start : start + width]
            )
            start += width
        if which.startswith("B") and start != value.shape[1]:
            raise InvalidRequest(
                f"adapter tensor {name} has {value.shape[1]} outputs, the base model's "
                f"{', '.join(p.rsplit('.', 1)[1] for p in parts)} have {start}",
                param="adapters",
            )
    return out


def _scale(config: dict, module: str, rank: int) -> float:
    """lora_alpha / r as PEFT computes it, with alpha_pattern and rsLoRA."""
    alpha = float(config["lora_alpha"])
    peft_module = module.replace(".attn.", ".self_attn.")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", peft_module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _match_targets(params: dict[str, np.ndarray], targets: list[LoraTarget]) -> dict:
    """Check every tensor against the graph's inputs; pair each with its activation dtype."""
    by_name = {}
    for target in targets:
        by_name[target.a_name] = (target, 0, target.in_features)
        by_name[target.b_name] = (target, 1, target.out_features)
    checked = {}
    for name, value in params.items():
        if name not in by_name:
            raise InvalidRequest(
                f"adapter tensor {name} has no matching projection in the base model",
                param="adapters",
            )
        target, axis, size = by_name[name]
        if value.ndim != 2 or value.shape[axis] != size:
            raise InvalidRequest(
                f"adapter tensor {name} has shape {list(value.shape)}, the base model needs "
                f"{'[' + str(size) + ', rank]' if axis == 0 else '[rank, ' + str(size) + ']'}",
                param="adapters",
            )
        checked[name] = (value, target.dtype)
    return checked


def check_onnx_adapter(path: Path, targets: list[LoraTarget]) -> dict[str, tuple[int, ...]]:
    """Check an .onnx_adapter file against the adapted graph; return {input name: shape}."""
    params = read_onnx_adapter(path)
    checked = _match_targets(params, targets)
    for name, (value, dtype) in checked.items():
        if value.dtype != np.dtype(dtype):
            raise InvalidRequest(
                f"adapter tensor {name} is {value.dtype}, the base model computes in {dtype}",
                param="adapters",
            )
    modules = {name.rsplit(".lora_", 1)[0] for name in params}
    for module in modules:
        a = params.get(f"{module}.lora_A.MatMul.weight")
        b = params.get(f"{module}.lora_B.MatMul.weight")
        if a is None or b is None or a.shape[1] != b.shape[0]:
            raise InvalidRequest(f"adapter tensors for {module} do not form a LoRA pair",
                                 param="adapters")  # fmt: skip
    return {name: tuple(value.shape) for name, value in params.items()}


def read_onnx_adapter(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an .onnx_adapter file, as numpy arrays."""
    import onnxruntime as ort

    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ORT raises its own RuntimeError types on a bad file
        raise InvalidRequest(f"not an .onnx_adapter file: {exc}", param="adapters") from exc
    return {name: np.array(value.numpy()) for name, value in adapter.get_parameters().items()}


def write_onnx_adapter(params: dict[str, np.ndarray], out_file: Path) -> None:
    """Write tensors as an ONNX Runtime adapter file (the format og.Adapters loads)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(
        {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for name, v in params.items()
        }
    )
    adapter.export_adapter(str(out_file))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as float arrays, bf16 included (numpy has no bf16).

    The format is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"adapter weights not found: {path.name}", param="adapters")
    data = path.read_bytes()
    try:
        (length,) = np.frombuffer(data[:8], dtype="<u8")
        header = json.loads(data[8 : 8 + int(length)])
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{path.name} is not a safetensors file", param="adapters") from exc
    start = 8 + int(length)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (start + int(x) for x in info["data_offsets"])
        tensors[name] = _decode(data[begin:end], info["dtype"], info["shape"], name)
    return tensors


def _decode(raw: bytes, dtype: str, shape: list[int], name: str) -> np.ndarray:
    if dtype == "BF16":  # the high half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype not in _SAFETENSORS_DTYPES:
        raise InvalidRequest(
            f"adapter tensor {name} has unsupported type {dtype}", param="adapters"
        )
    return np.frombuffer(raw, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<")).reshape(
        shape
    )
