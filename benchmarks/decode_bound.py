"""What bounds one stream's decode on this CPU: bytes a token reads, against the bandwidth.

A lone decode step multiplies one row of activations by every weight of the model, so it
reads all of them once: its time is at least (bytes of weights) / (memory read bandwidth).
This prints, for one of server_peer.py's subjects (the same bundle and GGUF):

- the machine's read bandwidth, with 1 and with 2 threads (numpy over a 1.3 GB buffer);
- for each of ortserve's two forms of the projections (the int4 kernels, MatMulNBits; the
  int8 products that AMX runs, int8_compute.py): the bytes a token reads, the step's time
  in-process, the floor those bytes set at the measured bandwidth, and the step's split by
  operator from onnxruntime's profiler;
- llama.cpp at the same point: `llama-batched-bench`'s one-sequence decode (S_TG) on the
  Q4_0 GGUF, and the bytes it reads.

    python benchmarks/decode_bound.py [--shape 1.5b] [--steps 40] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import server_peer  # noqa: E402

CONTEXT = 200  # tokens already in the row: a short conversation's decode


def read_bandwidth(size: int = 1_310_000_000) -> dict[int, float]:
    """GB/s reading `size` bytes with 1 and 2 threads (best of 5; numpy drops the GIL)."""
    buffer = np.ones(size // 8, dtype=np.uint64)
    halves = np.array_split(buffer, 2)

    def read(part: np.ndarray) -> int:
        return int(np.bitwise_xor.reduce(part))

    result = {}
    for threads in (1, 2):
        best = float("inf")
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(5):
                started = time.perf_counter()
                list(pool.map(read, halves if threads == 2 else [buffer]))
                best = min(best, time.perf_counter() - started)
        result[threads] = buffer.nbytes / best / 1e9
    return result


def weight_bytes(bundle: Path, int8: Path | None) -> int:
    """Bytes of the weights one step reads: the bundle's data less the rotary tables (a step
    reads a row of them); as int8 products, the int8 weights and the LM head (which keeps
    its int4 kernel), the int4 projections in the bundle's data being left unread."""
    if int8 is not None:
        return (int8 / "int8.data").stat().st_size + _initializer_bytes(bundle, "lm_head")
    total = sum(p.stat().st_size for p in bundle.glob("*.data"))
    return total - _initializer_bytes(bundle, "_cache")


def _initializer_bytes(bundle: Path, match: str) -> int:
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    size = {onnx.TensorProto.UINT8: 1, onnx.TensorProto.FLOAT: 4}
    return sum(int(np.prod(t.dims)) * size.get(t.data_type, 2)
               for t in model.graph.initializer if match in t.name)  # fmt: skip


def ortserve_step(bundle: Path, int8: Path | None, threads: int, steps: int) -> dict[str, Any]:
    """One row's decode step in-process: median ms, and its split by operator (profiled
    in a second session, which slows the small operators a little)."""
    from ortserve.engine import continuous

    def run(profile: bool) -> tuple[float, dict[str, float]]:
        options = continuous._session_options
        if profile:

            def profiled(config, threads=None):
                chosen = options(config, threads)
                chosen.enable_profiling = True
                chosen.profile_file_prefix = str(server_peer.BENCH / "logs" / "decode_bound")
                return chosen

            continuous._session_options = profiled
        try:
            graph = continuous.DecoderGraph.load(bundle, threads, int8)
        finally:
            continuous._session_options = options
        cache = continuous.BatchCache(graph, 1)
        cache.reserve(1, CONTEXT + steps + 16)
        block = cache.view(0, 1)
        ids = np.full((1, 1), 100, dtype=np.int64)
        times = []
        for step in range(steps):
            mask = np.ones((1, CONTEXT + step + 1), dtype=np.int64)
            started = time.perf_counter()
            graph.forward(ids, mask, block)
            times.append(time.perf_counter() - started)
        split: dict[str, float] = collections.Counter()
        if profile:
            trace = Path(graph.session.end_profiling())
            for event in json.loads(trace.read_text()):
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    split[event["args"]["op_name"]] += event["dur"] / 1000 / steps
            trace.unlink()
        return float(np.median(times[5:]) * 1000), dict(split)

    (server_peer.BENCH / "logs").mkdir(parents=True, exist_ok=True)
    step_ms, _ = run(profile=False)
    profiled_ms, split = run(profile=True)
    top = dict(sorted(split.items(), key=lambda kv: -kv[1])[:8])
    return {"step_ms": step_ms, "profiled_step_ms": profiled_ms,
            "split_ms": {k: round(v, 2) for k, v in top.items()}}  # fmt: skip


def llama_step(gguf: Path, threads: int, tokens: int) -> float:
    """llama.cpp's one-sequence decode, ms a token (llama-batched-bench's S_TG)."""
    command = [str(server_peer.BUILD / "bin" / "llama-batched-bench"), "-m", str(gguf),
               "-c", "1024", "-b", "512", "-ub", "512", "-npp", str(CONTEXT), "-ntg",
               str(tokens), "-npl", "1", "-t", str(threads), "-tb", str(threads)]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return 1000 / decode_rate(output)


def decode_rate(output: str) -> float:
    """S_TG (decode tokens/s) of llama-batched-bench's first result row:
    |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s | ..."""
    row = next(line for line in output.splitlines() if re.match(r"\|\s+\d+\s+\|", line))
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
    return float(cells[7])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1.5b", choices=sorted(server_peer.SHAPES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from ortserve.config import physical_cores
    from ortserve.library import Library

    threads = args.threads or physical_cores()
    source = server_peer.checkpoint(args.shape)
    library_root = server_peer.BENCH / "server-peer" / "library"
    name = f"peer-{args.shape}"
    server_peer.converted(source, library_root, name)
    bundle = Path(Library(library_root).get(name).path)
    int8 = library_root / "cache" / "int8" / bundle.name
    gguf = server_peer.gguf_q4_0(source)
    server_peer.llama_server()

    bandwidth = read_bandwidth()
    peak = bandwidth[2] if threads >= 2 else bandwidth[1]
    report: dict[str, Any] = {"shape": args.shape, "threads": threads,
                              "read_gb_s": {str(k): round(v, 1) for k, v in bandwidth.items()}}  # fmt: skip
    forms = {"int4 kernels (MatMulNBits)": None, "int8 products (AMX QGEMM)": int8}
    for form, folder in forms.items():
        step = ortserve_step(bundle, folder, threads, args.steps)
        step["bytes"] = weight_bytes(bundle, folder)
        step["floor_ms"] = step["bytes"] / peak / 1e6
        report[form] = step
    llama_bytes = gguf.stat().st_size  # Q4_0 blocks; the embedding rows it reads are few
    report["llama.cpp Q4_0"] = {"step_ms": llama_step(gguf, threads, args.steps),
                                "bytes": llama_bytes, "floor_ms": llama_bytes / peak / 1e6}  # fmt: skip
    print(f"{args.shape} shape, {threads} threads; read bandwidth "
          f"{bandwidth[1]:.1f} GB/s (1 thread), {bandwidth[2]:.1f} GB/s (2 threads)")  # fmt: skip
    print("| form | GB a token | floor at that bandwidth | one-row step | tok/s | GB/s reached |")
    print("|---|---|---|---|---|---|")
    for form in (*forms, "llama.cpp Q4_0"):
        entry = report[form]
        print(f"| {form} | {entry['bytes'] / 1e9:.2f} | {entry['floor_ms']:.1f} ms | "
              f"{entry['step_ms']:.1f} ms | {1000 / entry['step_ms']:.1f} | "
              f"{entry['bytes'] / entry['step_ms'] / 1e6:.1f} |")  # fmt: skip
    for form in forms:
        print(
            f"{form}, profiled ({report[form]['profiled_step_ms']:.1f} ms a step): "
            + ", ".join(f"{op} {ms:.2f}" for op, ms in report[form]["split_ms"].items())
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
