"""Serving benchmark: ortserve over HTTP vs the raw og.Engine on the same bundle, load, memory.

Subject: the Qwen2-shaped random checkpoint of benchmarks/graph_bench.py (hidden 512,
8 layers, Qwen2's 152k vocabulary) converted to int4 as ortserve converts by default,
`bench:converted` under --keep/library (the bundle graph_bench.py calls "converted"; built
once, shared). `--subject 0.5b` takes the Qwen2-0.5B-shaped `bench:int4` instead (what
adapter_bench.py serves). In one run:
  (a) the raw og.Engine in this process: time to first token and decode tokens/s, one request;
  (b) the same prompt through `ortserve serve`'s streamed /api/generate, one client;
  (e) the same through ortserve's engine (engine.scheduler.Scheduler, what the server's
      worker runs) in this process: the loop's own cost, apart from HTTP's;
      (a), (b) and (e) alternated for --rounds rounds, medians, ratios b/a and e/a;
  (c) model load: og.Model in this process, and the server's load on its first request;
  (d) the server's peak memory with the model loaded and serving: the worker's RSS (the
      process holding the model) and the whole tree's PSS, against the bundle's size on disk.
A benchmark, not a test: `make bench` runs it through benchmarks/bench.py.

    python benchmarks/serve_bench.py [--keep DIR] [--rounds 3] [--new-tokens 128] [--json F]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import build_subject  # noqa: E402

MODEL = "bench:int4"  # the 0.5B subject (adapter_bench.py's base)
CONVERTED = "bench:converted"  # graph_bench.py's name for the same bundle
NEW_TOKENS = 128
# About 40 tokens: on 2 CPU cores a long prefill would hide the decode figures under load.
PROMPT_TEXT = " ".join(["river mountain forest cloud"] * 4)
# A different first word each round: the server keeps finished turns for KV reuse, and a
# prompt it has seen would skip its prefill there and not in the raw engine.
LEADS = ("harbor", "lantern", "orchard", "bridge", "thunder", "candle", "silver", "garden",
         "window", "winter", "summer", "marble", "island", "meadow", "valley", "stone")  # fmt: skip
# benchmarks/graph_bench.py's subject: its SHAPE and directory name, so both use one checkpoint
H512_DIR = "qwen2-h512-l8-random"
H512 = {
    "vocab_size": 151936,
    "hidden_size": 512,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
}


def subject_bundle(work: Path) -> tuple[Path, Path]:
    """(library root, bundle dir) of the 0.5B int4 subject, converting it once."""
    from converters import convert
    from ortserve.library import Library

    library = Library(work / "library")
    if not library.exists(MODEL):
        convert(build_subject(work), MODEL, precision="int4", library=library)
    return library.root, library.get(MODEL).path


def h512_checkpoint(work: Path) -> Path:
    from converters.tiny import build_checkpoint

    checkpoint = work / H512_DIR
    if not (checkpoint / "model.safetensors").is_file():
        build_checkpoint("qwen2", checkpoint, **H512)
    return checkpoint


def converted_bundle(work: Path) -> tuple[Path, Path]:
    """(library root, bundle dir) of the h512 subject as `bench:converted`, converting it once."""
    from converters import convert
    from ortserve.library import Library

    library = Library(work / "library")
    if not library.exists(CONVERTED):
        print("converting the subject ...", file=sys.stderr, flush=True)
        convert(h512_checkpoint(work), CONVERTED, "int4", verify=False, library=library,
                progress=False)  # fmt: skip
    return library.root, library.get(CONVERTED).path


def prompt_ids(bundle: Path, text: str = PROMPT_TEXT) -> list[int]:
    """`text` as the server will tokenize it, so both sides prefill the same tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


class RawEngine:
    """(a) and (c): og.Engine alone in this process, one request at a time, greedy."""

    def __init__(self, bundle: Path) -> None:
        import onnxruntime_genai as og

        from ortserve.config import physical_cores

        self.og = og
        started = time.perf_counter()
        config = og.Config(str(bundle))
        # the server's thread count (ortserve.config: the physical cores), so that the two
        # compare the same computation
        threads = {"session_options": {"intra_op_num_threads": physical_cores()}}
        config.overlay(json.dumps({"search": {"min_length": 0}, "model": {"decoder": threads}}))
        self.model = og.Model(config)
        self.load_s = time.perf_counter() - started
        self.engine = og.Engine(self.model)
        self.buffer = self.engine.create_event_buffer(256)

    def run(self, ids: list[int], new_tokens: int) -> dict:
        request = self.engine.create_request()
        turn = self.og.TurnOptions(request)
        turn.set_max_generated_tokens(new_tokens)
        turn.set_min_generated_tokens(new_tokens)
        begun = time.perf_counter()
        request.begin_turn(np.asarray(ids, dtype=np.int32), turn)
        first, count = 0.0, 0
        while self.engine.has_pending_requests():
            for _ in self.engine.run(self.buffer):
                count += 1
                first = first or time.perf_counter()
        end = time.perf_counter()
        return {"ttft_s": first - begun, "decode_tps": (count - 1) / (end - first)}


class InProcessEngine:
    """(e): ortserve's scheduler in this process, loaded by the server's own Runtime."""

    def __init__(self, root: Path, model: str) -> None:
        from ortserve.config import Settings
        from ortserve.engine.runtime import Runtime
        from ortserve.library import Library

        self.runtime = Runtime(Settings(models=root), Library(root))
        self.loaded = self.runtime.acquire(model)

    def run(self, ids: list[int], new_tokens: int) -> dict:
        from ortserve.engine.types import GenerationOptions

        options = GenerationOptions(temperature=0, num_predict=new_tokens, num_ctx=4096,
                                    repeat_penalty=1.0)  # fmt: skip
        begun = time.perf_counter()
        job = self.loaded.scheduler.submit(ids, options)
        first, count = 0.0, 0
        while True:
            kind, *payload = job.events.get(timeout=600)
            if kind == "token":
                count += 1
                first = first or time.perf_counter()
            elif kind == "done":
                break
            else:
                raise payload[0]
        end = time.perf_counter()
        return {"ttft_s": first - begun, "decode_tps": (count - 1) / (end - first)}

    def stop(self) -> None:
        self.runtime.release(self.loaded)
        self.runtime.shutdown()


def raw_engine(bundle: Path) -> dict:
    """One raw run with its load time (the former interface of this module)."""
    raw = RawEngine(bundle)
    return {"load_s": raw.load_s, **raw.run(prompt_ids(bundle), NEW_TOKENS)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ORTSERVE_MODELS": str(root), "ORTSERVE_HOST": f"127.0.0.1:{port}",
           "ORTSERVE_NUM_PARALLEL": "16", "ORTSERVE_MAX_QUEUE": "64"}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise SystemExit("server did not start")


def http_stream(url: str, model: str = MODEL, new_tokens: int = NEW_TOKENS,
                prompt: str = PROMPT_TEXT) -> dict:  # fmt: skip
    """One streamed /api/generate of `new_tokens` greedy tokens (raw prompt, no template)."""
    body = {"model": model, "prompt": prompt, "raw": True, "stream": True,
            "options": {"temperature": 0, "num_predict": new_tokens}}  # fmt: skip
    request = urllib.request.Request(url + "/api/generate", data=json.dumps(body).encode(),
                                     method="POST")  # fmt: skip
    begun = time.perf_counter()
    first, final = 0.0, {}
    with urllib.request.urlopen(request) as response:
        for line in response:
            chunk = json.loads(line)
            first = first or time.perf_counter()
            if chunk.get("done"):
                final = chunk
    end = time.perf_counter()
    tokens = final.get("eval_count", 0)
    return {"ttft_s": first - begun, "tokens": tokens, "decode_s": end - first, "end": end}


def concurrent_streams(url: str, clients: int, model: str = MODEL,
                       new_tokens: int = NEW_TOKENS) -> float:  # fmt: skip
    """Aggregate generated tokens per second with `clients` streams at once."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: http_stream(url, model, new_tokens), range(clients)))
    return sum(r["tokens"] for r in results) / (time.perf_counter() - started)


def load_over_http(url: str, model: str) -> float:
    """Seconds for the server to load `model` (an empty /api/generate loads it)."""
    started = time.perf_counter()
    body = json.dumps({"model": model}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "/api/generate", data=body,
                                                  method="POST")).read()  # fmt: skip
    return time.perf_counter() - started


def sample_memory(pid: int, peak: dict[str, int], stop: threading.Event) -> None:
    """Peaks of the worker's RSS (the process that holds the model) and of the whole tree's
    PSS (gunicorn's arbiter and worker, shared pages counted once)."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        tree_pss = 0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                tree_pss += info.pss
                if process.pid != pid:
                    peak["worker_rss"] = max(peak["worker_rss"], info.rss)
        peak["tree_pss"] = max(peak["tree_pss"], tree_pss)
        time.sleep(0.1)


def measure(root: Path, bundle: Path, model: str, rounds: int, new_tokens: int) -> dict:
    texts = [f"{LEADS[i % len(LEADS)]} {PROMPT_TEXT}" for i in range(rounds + 1)]
    ids = [prompt_ids(bundle, text) for text in texts]
    raw = RawEngine(bundle)
    engine = InProcessEngine(root, model)
    process, url = start_server(root)
    peak, stop = {"worker_rss": 0, "tree_pss": 0}, threading.Event()
    threading.Thread(target=sample_memory, args=(process.pid, peak, stop), daemon=True).start()
    raw_runs, http_runs, engine_runs = [], [], []
    try:
        server_load = load_over_http(url, model)
        raw.run(ids[-1], new_tokens)  # warm-up, every side
        engine.run(ids[-1], new_tokens)
        http_stream(url, model, new_tokens, texts[-1])
        for i in range(rounds):
            raw_runs.append(raw.run(ids[i], new_tokens))
            time.sleep(0.2)  # let the other side's spinning threads go idle
            one = http_stream(url, model, new_tokens, texts[i])
            http_runs.append({"ttft_s": one["ttft_s"],
                              "decode_tps": (one["tokens"] - 1) / one["decode_s"]})  # fmt: skip
            time.sleep(0.2)
            engine_runs.append(engine.run(ids[i], new_tokens))
            time.sleep(0.2)
    finally:
        engine.stop()
        stop.set()
        process.terminate()
        process.wait()
    bundle_bytes = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    raw_tps, http_tps = median(raw_runs, "decode_tps"), median(http_runs, "decode_tps")
    engine_tps = median(engine_runs, "decode_tps")
    return {
        "model": model,
        "prompt_tokens": len(ids[0]),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "bundle_bytes": bundle_bytes,
        "raw": {"ttft_s": round(median(raw_runs, "ttft_s"), 4), "decode_tps": round(raw_tps, 1),
                "decode_runs": [round(r["decode_tps"], 1) for r in raw_runs]},
        "http": {"ttft_s": round(median(http_runs, "ttft_s"), 4), "decode_tps": round(http_tps, 1),
                 "decode_runs": [round(r["decode_tps"], 1) for r in http_runs]},
        "engine": {"decode_tps": round(engine_tps, 1),
                   "decode_runs": [round(r["decode_tps"], 1) for r in engine_runs]},
        "ratio_http_over_raw_decode": round(http_tps / raw_tps, 3),
        "ratio_engine_over_raw_decode": round(engine_tps / raw_tps, 3),
        "load_s": {"raw_og_model": round(raw.load_s, 3), "server_first_request": round(server_load, 3)},
        "worker_peak_rss_bytes": peak["worker_rss"],
        "tree_peak_pss_bytes": peak["tree_pss"],
        "ratio_worker_rss_over_bundle": round(peak["worker_rss"] / bundle_bytes, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--subject", choices=("h512", "0.5b"), default="h512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    if args.subject == "h512":
        (root, bundle), model = converted_bundle(args.keep), CONVERTED
    else:
        (root, bundle), model = subject_bundle(args.keep), MODEL
    report = measure(root, bundle, model, args.rounds, args.new_tokens)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
