"""ortserve serve against llama.cpp's llama-server: the same weights, prompts and client.

The subjects are random-weight checkpoints of real model shapes (Qwen2.5-0.5B's, and with
--shapes 0.5b,1.5b Qwen2.5-1.5B's), built once under .cache/bench/. ortserve serves the
converter's int4 bundle (block 32); llama-server serves the same checkpoint as GGUF Q4_0,
made by llama.cpp's own `llama-quantize`. Both servers are up at once and asked in turn,
round after round, by one HTTP client (OpenAI's /v1/completions, raw prompts, greedy,
streamed), with the same number of compute threads; medians are compared:

- decode tokens/s of one stream (a short prompt, --new-tokens tokens);
- time to first token of a ~1000-token prompt (prefill), and of a ~4000-token prompt;
- aggregate tokens/s of 8 concurrent streams of mixed prompt lengths (llama-server: 8 slots);
- peak RSS of each server's process tree over the whole run.

llama-server is built from the llama.cpp that the llama-cpp-python sdist vendors (cmake,
-DGGML_NATIVE=ON, only the tool targets) into .cache/bench/llama-build, once (10-20 minutes
on 2 cores). The ISA each side uses is printed: llama.cpp's own system_info line, and the
CPU flags onnxruntime's MLAS dispatches on.

    python benchmarks/server_peer.py [--shapes 0.5b] [--rounds 3] [--new-tokens 128]
                                     [--threads N] [--json FILE] [--prepare]
                                     [--llama-spec ngram-simple]

--llama-spec turns on llama-server's own speculation (`--spec-type`, with a 3-token lookup and
up to 8 drafts: ortserve's prompt lookup's sizes), to compare both sides' speculation;
ortserve's follows ORTSERVE_SPECULATION (auto by default).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".cache" / "bench"
SOURCE = BENCH / "src"
BUILD = BENCH / "llama-build"
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-server", "llama-quantize", "llama-batched-bench")

# Real shapes (config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B), random weights.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2},
}  # fmt: skip
COMMON = {"vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True,
          "rope_theta": 1000000.0}  # fmt: skip
SLOTS = 8
CONTEXT = 4608  # each side's per-sequence context: the long prompt and its answer fit
WORDS = ("the", "model", "reads", "every", "word", "of", "prompt", "before", "it", "writes", "a",
         "single", "token", "its", "answer", "so", "long", "costs", "time", "first", "and",
         "memory", "while", "is", "kept")  # fmt: skip


# -- llama-server ---------------------------------------------------------------------------


def llama_server() -> Path:
    """The built llama-server, building it (and llama-quantize) first if needed."""
    binary = BUILD / "bin" / "llama-server"
    if binary.is_file() and (BUILD / "bin" / "llama-quantize").is_file():
        return binary
    vendored = _vendored_llama_cpp()
    print(f"building llama.cpp's tools from {vendored} (10-20 minutes) ...", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(vendored), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                    *isa_flags(), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2), "--target",
                    *TARGETS], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return binary


def isa_flags() -> list[str]:
    """-DGGML_NATIVE=ON, except on a CPU with AMX: there this llama.cpp's AMX kernels die of
    SIGSEGV on the first Q4_0 matrix product (measured with llama-server here, as with
    llama-cpp-python: docs/performance.md), so every instruction set this CPU has is named
    one by one instead, AMX left out."""
    from llamacpp_peer import cmake_args

    if "amx_int8" not in mlas_isa().split():
        return ["-DGGML_NATIVE=ON"]
    return [f for f in cmake_args().split() if f.startswith("-DGGML_")]


def _vendored_llama_cpp() -> Path:
    """The llama.cpp tree inside the llama-cpp-python sdist (downloaded once)."""
    tree = SOURCE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    SOURCE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(SOURCE)], check=True)  # fmt: skip
    with tarfile.open(SOURCE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
        archive.extractall(SOURCE, filter="data")
    return tree


def gguf_q4_0(checkpoint: Path) -> Path:
    """The checkpoint as GGUF Q4_0 through f16 (llama-quantize's default mix), kept."""
    out = checkpoint.parent / f"{checkpoint.name}-q4_0.gguf"
    if out.is_file():
        return out
    sys.path.insert(0, str(_vendored_llama_cpp() / "gguf-py"))  # the gguf writer, as vendored
    from llamacpp_peer import write_gguf

    f16 = checkpoint.parent / f"{checkpoint.name}-f16.gguf"
    if not f16.is_file():
        write_gguf(checkpoint, f16.with_suffix(".partial"))
        f16.with_suffix(".partial").rename(f16)
    partial = out.with_suffix(".partial")
    subprocess.run([str(BUILD / "bin" / "llama-quantize"), str(f16), str(partial), "Q4_0"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    partial.rename(out)
    f16.unlink()
    return out


# -- ortserve ---------------------------------------------------------------------------------


def checkpoint(shape: str) -> Path:
    from converters.tiny import build_checkpoint

    path = BENCH / f"qwen2.5-{shape}-random"
    built = (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()
    if not built:  # a checkpoint over 5 GB is saved in shards
        build_checkpoint("qwen2", path, **COMMON, **SHAPES[shape])
    return path


def converted(source: Path, library: Path, name: str) -> None:
    """The converter's int4 bundle of `source` in `library` (once)."""
    if (library / "manifests").exists() and name in _listed(library):
        return
    env = {**os.environ, "ORTSERVE_MODELS": str(library)}
    subprocess.run([sys.executable, "-m", "ortserve", "convert", str(source), "--name", name,
                    "--precision", "int4", "--no-verify"], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def _listed(library: Path) -> str:
    env = {**os.environ, "ORTSERVE_MODELS": str(library)}
    return subprocess.run([sys.executable, "-m", "ortserve", "list"], env=env, text=True,
                          capture_output=True).stdout  # fmt: skip


# -- the servers ------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ortserve(library: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ORTSERVE_MODELS": str(library), "ORTSERVE_HOST": f"127.0.0.1:{port}",
           "ORTSERVE_COMPUTE_THREADS": str(threads), "ORTSERVE_CONTEXT_LENGTH": str(CONTEXT),
           "ORTSERVE_KEEP_ALIVE": "-1"}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "serve"], env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def start_llama(
    gguf: Path, threads: int, log: Path, spec: str = "none"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(BUILD / "bin" / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads), "-tb", str(threads), "-np", str(SLOTS),
               "-c", str(SLOTS * CONTEXT), "--no-webui"]  # fmt: skip
    if spec != "none":  # its prompt lookup sized as ortserve's: 3-token n-grams, 8 drafts
        command += ["--spec-type", spec, f"--spec-{spec}-size-n", "3",
                    f"--spec-{spec}-size-m", "8"]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_up(url: str, process: subprocess.Popen, path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({process.returncode})")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def tree_rss(pid: int) -> tuple[int, int]:
    """The RSS of a process tree, and of its largest process (ortserve's worker: gunicorn's
    master is a second process, llama-server one)."""
    import psutil

    try:
        root = psutil.Process(pid)
        sizes = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        return sum(sizes), max(sizes)
    except psutil.Error:
        return 0, 0


class PeakMemory:
    """The peak RSS of each server's process tree, sampled every 0.1 s."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.peak = pids, dict.fromkeys(pids, 0)
        self.largest = dict.fromkeys(pids, 0)  # the peak of the largest process alone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            for side, pid in self.pids.items():
                tree, largest = tree_rss(pid)
                self.peak[side] = max(self.peak[side], tree)
                self.largest[side] = max(self.largest[side], largest)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


# -- the client ------------------------------------------------------------------------------


def completion(url: str, model: str, prompt: str, new_tokens: int) -> dict[str, float]:
    """One streamed greedy completion: time to first token, decode tokens/s, tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}  # llama-server's: both sides write new_tokens tokens  # fmt: skip
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    started = time.perf_counter()
    first = None
    usage: dict = {}
    with urllib.request.urlopen(request, timeout=1800) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    tokens = usage.get("completion_tokens", new_tokens)
    first = first or ended
    return {"ttft": first - started, "decode": (tokens - 1) / max(ended - first, 1e-9),
            "tokens": tokens, "prompt_tokens": usage.get("prompt_tokens", 0),
            "wall": ended - started}  # fmt: skip


def prompt_of(tokens: int, tokenizer, seed: int) -> str:
    """Words (seeded) until the text is `tokens` tokens long by the subject's tokenizer."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words)).ids) < tokens:
        words += [rng.choice(WORDS) for _ in range(16)]
    while len(tokenizer.encode(" ".join(words)).ids) > tokens:
        words.pop()
    return " ".join(words)


def concurrent_streams(url: str, model: str, prompts: list[str], new_tokens: int) -> float:
    """Aggregate generated tokens/s of len(prompts) streams started at once."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: completion(url, model, p, new_tokens), prompts))
    return sum(r["tokens"] for r in results) / (time.perf_counter() - started)


def measure(
    shape: str, rounds: int, new_tokens: int, threads: int, llama_spec: str = "none"
) -> dict[str, Any]:
    from tokenizers import Tokenizer

    source = checkpoint(shape)
    library = BENCH / "server-peer" / "library"
    name = f"peer-{shape}"
    converted(source, library, name)
    gguf = gguf_q4_0(source)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    short = prompt_of(40, tokenizer, 1)
    # a new prompt each round: both servers keep finished prompts' keys and values
    # (ortserve's KV reuse, llama-server's cache_prompt) and would answer a repeat at once
    prefills = [prompt_of(1000, tokenizer, 2 + 100 * r) for r in range(rounds)]
    longs = [prompt_of(4000, tokenizer, 3 + 100 * r) for r in range(rounds)]
    mixed = [[prompt_of(n, tokenizer, 10 + n + 100 * r) for n in (20, 60, 120, 200, 300, 400,
                                                                 500, 600)]
             for r in range(rounds)]  # fmt: skip
    logs = BENCH / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ours, ours_url = start_ortserve(library, threads, logs / f"server-peer-ortserve-{shape}.log")
    peer, peer_url = start_llama(gguf, threads, logs / f"server-peer-llama-{shape}.log",
                                 llama_spec)  # fmt: skip
    try:
        wait_up(ours_url, ours, "/api/version")
        wait_up(peer_url, peer, "/health")
        sides = {"ortserve": (ours_url, name), "llama": (peer_url, "q4_0")}
        for url, model in sides.values():  # load and warm both
            completion(url, model, short, 8)
        memory = PeakMemory({"ortserve": ours.pid, "llama": peer.pid})
        figures: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
        for prefill, long, streams in zip(prefills, longs, mixed):
            for side, (url, model) in sides.items():
                record = figures[side]
                record.setdefault("decode", []).append(
                    completion(url, model, short, new_tokens)["decode"]
                )
                record.setdefault("ttft_1000", []).append(
                    completion(url, model, prefill, 1)["ttft"]
                )
                record.setdefault("aggregate_8", []).append(
                    concurrent_streams(url, model, streams, new_tokens)
                )
                record.setdefault("ttft_4000", []).append(completion(url, model, long, 1)["ttft"])
        peaks = memory.stop()
        largest = memory.largest
    finally:
        for process in (ours, peer):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
    medians = {side: {k: statistics.median(v) for k, v in record.items()}
               for side, record in figures.items()}  # fmt: skip
    return {"shape": shape, "medians": medians, "runs": figures, "peak_rss": peaks,
            "llama_spec": llama_spec,
            "ortserve_speculation": os.environ.get("ORTSERVE_SPECULATION", "auto"),
            "ortserve_cpu_int8": os.environ.get("ORTSERVE_CPU_INT8", "auto"),
            "peak_rss_largest_process": largest,
            "llama_system_info": _system_info(logs / f"server-peer-llama-{shape}.log")}  # fmt: skip


def _system_info(log: Path) -> str:
    """llama.cpp's system_info line when its log has one, else the ISA it was built for."""
    for line in log.read_text(errors="replace").splitlines():
        if "system_info" in line or "CPU :" in line:
            return line.split("system_info:")[-1].strip()
    flags = [f.removeprefix("-DGGML_") for f in isa_flags() if f.endswith("=ON")]
    return "built for " + " ".join(f.removesuffix("=ON") for f in flags)


def mlas_isa() -> str:
    """The CPU features onnxruntime's MLAS dispatches its kernels on (read from /proc)."""
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags")).split()
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
        return " ".join(f for f in wanted if f in flags)
    return "n/a"


def table(results: list[dict[str, Any]]) -> str:
    """The ratios (ortserve / llama-server; for times and memory, llama-server / ortserve
    so that above 1 is always ortserve ahead), with the goals of issue 26."""
    rows = [("single-stream decode", "decode", False, "≥ 1.2x"),
            ("prefill: TTFT of a 1000-token prompt", "ttft_1000", True, "≥ 1.2x"),
            ("8 concurrent mixed streams, aggregate", "aggregate_8", False, "≥ 1.5x"),
            ("TTFT of a 4000-token prompt", "ttft_4000", True, "≥ 1.0x")]  # fmt: skip
    lines = [
        "| figure (ortserve ahead when > 1) | "
        + " | ".join(f"Qwen2.5-{r['shape'].upper()} shape" for r in results)
        + " | goal |"
    ]
    lines.append("|---" * (len(results) + 2) + "|")
    for label, key, lower_is_better, goal in rows:
        cells = []
        for r in results:
            ours, peer = r["medians"]["ortserve"][key], r["medians"]["llama"][key]
            ratio = peer / ours if lower_is_better else ours / peer
            cells.append(f"{ratio:.2f}x ({_fmt(key, ours)} vs {_fmt(key, peer)})")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {goal} |")
    cells = [f"{r['peak_rss']['ortserve'] / r['peak_rss']['llama']:.2f}x "
             f"({r['peak_rss']['ortserve'] >> 20} MB vs {r['peak_rss']['llama'] >> 20} MB)"
             for r in results]  # fmt: skip
    lines.append("| peak RSS, ortserve / llama-server (lower is better) | " + " | ".join(cells)
                 + " | ≤ 1.0x |")  # fmt: skip
    cells = [f"{r['peak_rss_largest_process']['ortserve'] / r['peak_rss_largest_process']['llama']:.2f}x "
             f"({r['peak_rss_largest_process']['ortserve'] >> 20} MB vs "
             f"{r['peak_rss_largest_process']['llama'] >> 20} MB)" for r in results]  # fmt: skip
    lines.append("| peak RSS of the largest process (ortserve's worker) | " + " | ".join(cells)
                 + " | — |")  # fmt: skip
    return "\n".join(lines)


def _fmt(key: str, value: float) -> str:
    return f"{value:.2f} s" if key.startswith("ttft") else f"{value:.1f} tok/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0.5b", help="comma-separated: 0.5b, 1.5b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0: the physical cores")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llama-spec", default="none",
                        help="llama-server's --spec-type (ngram-simple, ngram-map-k ...)")  # fmt: skip
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only build llama-server and the subjects (checkpoint, bundle, GGUF)",
    )
    args = parser.parse_args()
    if shutil.which("cmake") is None and not (BUILD / "bin" / "llama-server").is_file():
        print(json.dumps({"na": "cmake is not installed: llama-server cannot be built"}))
        return
    llama_server()
    if args.prepare:
        for shape in args.shapes.split(","):
            source = checkpoint(shape)
            converted(source, BENCH / "server-peer" / "library", f"peer-{shape}")
            print(gguf_q4_0(source))
        return
    from ortserve.config import physical_cores

    threads = args.threads or physical_cores()
    results = [measure(s, args.rounds, args.new_tokens, threads, args.llama_spec)
               for s in args.shapes.split(",")]  # fmt: skip
    text = table(results)
    print(text)
    print(f"\nthreads {threads} each; llama.cpp: {results[0]['llama_system_info']}")
    print(f"speculation: ortserve {results[0]['ortserve_speculation']}, "
          f"llama-server {args.llama_spec}")  # fmt: skip
    print(f"ortserve's int8 products (ORTSERVE_CPU_INT8): {results[0]['ortserve_cpu_int8']}")
    print(f"onnxruntime MLAS dispatches on: {mlas_isa()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "table": text,
                                         "mlas_isa": mlas_isa()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
