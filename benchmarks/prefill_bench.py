"""Prefill of a lone long prompt through ortserve's continuous loop, variants alternated.

The subject is server_peer.py's bundle (Qwen2.5-0.5B's shape, random weights, int4), or
--bundle DIR. One DecoderGraph, one ContinuousEngine per variant over it (the same session),
each given the same prompt in turn for --rounds rounds: time to the first token (wall) and
the CPU time the process spent on it (less sensitive to other work on the machine than the
wall time). A variant is the prefill chunk (tokens per forward pass):

    python benchmarks/prefill_bench.py [--bundle DIR] [--tokens 1000] [--rounds 3]
                                       [--chunks 256,512] [--threads N] [--profile]

--profile prints onnxruntime's profiler split (time per op type) of each variant's passes.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_bundle() -> Path:
    library = ROOT / ".cache" / "bench" / "server-peer" / "library" / "bundles"
    return next(library.iterdir())


def prefill(engine, prompt: np.ndarray) -> tuple[float, float, int]:
    """One turn of `prompt` and one new token: (wall s, CPU s, forward passes)."""
    from ortserve.engine.continuous import ContinuousTurn

    request = engine.create_request()
    turn = ContinuousTurn()
    turn.set_max_generated_tokens(1)
    wall, cpu, passes = time.perf_counter(), time.process_time(), 0
    request.begin_turn(prompt, turn)
    while engine.has_pending_requests():
        engine.run()
        passes += 1
    return time.perf_counter() - wall, time.process_time() - cpu, passes


def op_split(profile: str, runs: int) -> dict[str, float]:
    """Milliseconds per op type over the last `runs` session runs of a profile file."""
    events = json.loads(Path(profile).read_text())
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    spans = spans[-runs:]
    split: collections.Counter = collections.Counter()
    for e in events:
        kernel = e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        if kernel and any(start <= e["ts"] <= end for start, end in spans):
            split[e["args"]["op_name"]] += e["dur"] / 1000
    return {op: round(ms, 1) for op, ms in split.most_common(6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", default="256,512")
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import os

    from ortserve.config import physical_cores
    from ortserve.engine import continuous
    from ortserve.engine.kvcache import KVStore

    bundle = args.bundle or default_bundle()
    if args.profile:
        plain = continuous._session_options

        def profiled(*a, **k):
            options = plain(*a, **k)
            options.enable_profiling = True
            options.profile_file_prefix = str(ROOT / ".cache" / "bench" / "prefill-profile")
            return options

        continuous._session_options = profiled
    graph = continuous.DecoderGraph.load(bundle, args.threads or physical_cores())
    prompt = np.random.default_rng(0).integers(100, 10_000, args.tokens).astype(np.int32)
    engines = {}
    for chunk in (int(c) for c in args.chunks.split(",")):
        engine = continuous.ContinuousEngine(graph, 8, KVStore(0, 0), "off")
        engine.chunk = chunk
        engines[chunk] = engine
    prefill(next(iter(engines.values())), prompt[:64])  # warm up
    figures: dict[int, list[tuple[float, float, int]]] = {c: [] for c in engines}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for chunk, engine in engines.items():
            figures[chunk].append(prefill(engine, prompt))
    load.append(os.getloadavg()[0])
    print(f"{args.tokens}-token prompt, {args.rounds} rounds, load {load[0]:.2f} -> {load[1]:.2f}")
    for chunk, runs in figures.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"chunk {chunk:5d}: TTFT {wall:6.2f} s (runs {[round(r[0], 2) for r in runs]}), "
              f"CPU {cpu:6.2f} s, {runs[0][2]} steps")  # fmt: skip
    if args.profile:
        profile = graph.session.end_profiling()
        print("profile:", profile, op_split(profile, 1_000_000))


if __name__ == "__main__":
    main()
