"""Conversion benchmark: a Qwen2-0.5B-shaped random checkpoint -> int4 bundle.

Reports wall time and peak resident memory of `ortserve convert`, against the size of the
fp32 weights. The converter runs its heavy steps in child processes, so two peaks are
reported: `/usr/bin/time -v`'s maximum resident set size (the largest single process) and
the peak of the whole process tree's summed RSS, sampled every 50 ms (what the machine must
have). Goal: peak under 3x the fp32 weights. A benchmark, not a test: `make bench`.

    python benchmarks/convert_bench.py [--keep DIR] [--no-verify]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B), random weights.
QWEN2_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
}


def build_subject(directory: Path) -> Path:
    from converters.tiny import build_checkpoint

    checkpoint = directory / "qwen2-0.5b-random"
    if not (checkpoint / "model.safetensors").is_file():
        build_checkpoint("qwen2", checkpoint, **QWEN2_05B)
    return checkpoint


def timed_convert(checkpoint: Path, library: Path, precision: str, verify: bool) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "ortserve", "convert",
               str(checkpoint), "--name", f"bench:{precision}", "--precision", precision]  # fmt: skip
    if not verify:
        command.append("--no-verify")
    env = {**os.environ, "ORTSERVE_MODELS": str(library)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, env=env)  # fmt: skip
    tree_peak = [0]
    sampler = threading.Thread(target=_sample_tree, args=(process.pid, tree_peak), daemon=True)
    sampler.start()
    stderr = process.stderr.read()
    process.wait()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"convert failed:\n{stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)[1])
    steps = dict(re.findall(r": (\w[\w ]*) done in ([\d.]+)s", stderr))
    return {
        "wall_s": round(wall, 1),
        "peak_rss_bytes": peak_kb * 1024,
        "peak_tree_rss_bytes": tree_peak[0],
        "steps_s": steps,
    }


def _sample_tree(pid: int, peak: list[int]) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            peak[0] = max(peak[0], total)
            time.sleep(0.05)
    except psutil.Error:
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="directory to keep the checkpoint in")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification step")
    parser.add_argument("--precision", default="int4")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = build_subject(work)
        weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        figures = timed_convert(checkpoint, Path(scratch) / "library", args.precision,
                                verify=not args.no_verify)  # fmt: skip
        bundle = next((Path(scratch) / "library" / "bundles").iterdir())
        bundle_bytes = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    report = {
        "subject": "Qwen2-0.5B-shaped random checkpoint (24 layers, hidden 896)",
        "precision": args.precision,
        "verify": not args.no_verify,
        "fp32_weights_bytes": weights,
        "bundle_bytes": bundle_bytes,
        **figures,
        "peak_over_fp32_weights": round(figures["peak_rss_bytes"] / weights, 2),
        "tree_peak_over_fp32_weights": round(figures["peak_tree_rss_bytes"] / weights, 2),
    }
    print(json.dumps(report, indent=2))
    worst = max(report["peak_over_fp32_weights"], report["tree_peak_over_fp32_weights"])
    print(f"peak memory {worst}x the fp32 weights (goal < 3x: {'met' if worst < 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
