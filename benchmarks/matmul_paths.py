"""What bounds prefill on this CPU: onnxruntime's matrix-product paths for one weight.

The weight is a Qwen2.5-0.5B MLP projection (896 x 4864, random), the activations M rows:
M = 1 and 8 are decode steps (one and eight streams), M = 512 and 1000 prefill chunks. Each
path is one node in its own session, the same threads, timed over --repeat runs after a
warm-up; the figure is multiply-adds x 2 per second:

- MatMulNBits int4 (block 32, accuracy_level 4: int8 activations), what bundles run now;
- the same with accuracy_level 1 (fp32 compute over dequantized blocks);
- DynamicQuantizeMatMul int8 (per-column weight scales, activations quantized per call): MLAS's
  QGEMM, which dispatches to AMX where the CPU has it;
- fp32 MatMul (MLAS SGEMM).

    python benchmarks/matmul_paths.py [--threads N] [--repeat 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

K, N = 896, 4864
ROWS = (1, 8, 512, 1000)


def _graph(nodes, initializers, opsets):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def models(weight: np.ndarray) -> dict:
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    plain = _graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [numpy_helper.from_array(weight, "w")],
        [("", 21)],
    )
    found = {"fp32 MatMul": plain}
    for level in (4, 1):
        copy = onnx.ModelProto()
        copy.CopyFrom(plain)  # the quantizer rewrites the model it is given
        quantizer = MatMulNBitsQuantizer(
            copy, block_size=32, is_symmetric=True, accuracy_level=level
        )
        quantizer.process()
        found[f"MatMulNBits int4, accuracy_level {level}"] = quantizer.model.model
    scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    int8 = np.round(weight / scale).astype(np.int8)
    node = helper.make_node(
        "DynamicQuantizeMatMul", ["x", "w", "scale", "", ""], ["y"], domain="com.microsoft"
    )
    found["DynamicQuantizeMatMul int8"] = _graph(
        [node],
        [numpy_helper.from_array(int8, "w"), numpy_helper.from_array(scale, "scale")],
        [("", 21), ("com.microsoft", 1)],
    )
    return found


def timed(model, rows: int, threads: int, repeat: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from ortserve.config import physical_cores

    threads = args.threads or physical_cores()
    weight = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32) * 0.05
    results: dict[str, dict[int, float]] = {}
    for name, model in models(weight).items():
        results[name] = {rows: timed(model, rows, threads, args.repeat) for rows in ROWS}
    header = "| path (896 x 4864 weight) | " + " | ".join(f"M = {m}" for m in ROWS) + " |"
    print(header)
    print("|---" * (len(ROWS) + 1) + "|")
    for name, times in results.items():
        cells = [
            f"{times[m] * 1e3:.2f} ms, {2 * m * K * N / times[m] / 1e9:.0f} GOPS" for m in ROWS
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{threads} threads")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": threads, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
