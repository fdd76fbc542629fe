"""Serving benchmark: raw og.Engine vs ortserve over HTTP, concurrency, load time, memory.

Subject: a Qwen2-0.5B-shaped random checkpoint converted to int4 (built once, kept under
--keep). In one run:
  (a) the raw og.Engine: time to first token and decode tokens/s, one request;
  (b) the same through `ortserve serve`'s HTTP stream, one client;
  (c) aggregate decode tokens/s at 1, 4, 8 and 16 concurrent streaming clients;
  (d) model load time;  (e) the server's peak resident memory with the model loaded.
Prints each figure and the ratios b/a and c(N)/c(1). A benchmark, not a test: `make bench`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import build_subject  # noqa: E402

MODEL = "bench:int4"
NEW_TOKENS = 128
# About 40 tokens: on 2 CPU cores a long prefill would hide the decode figures under load.
PROMPT_TEXT = " ".join(["river mountain forest cloud"] * 4)


def subject_bundle(work: Path) -> tuple[Path, Path]:
    """(library root, bundle dir) of the int4 subject, converting it once."""
    from converters import convert
    from ortserve.library import Library

    library = Library(work / "library")
    if not library.exists("bench:int4"):
        convert(build_subject(work), "bench:int4", precision="int4", library=library)
    return library.root, library.get("bench:int4").path


def prompt_ids(bundle: Path) -> list[int]:
    """PROMPT_TEXT as the server will tokenize it, so both sides prefill the same tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    return tokenizer.encode(PROMPT_TEXT, add_special_tokens=False).ids


def raw_engine(bundle: Path) -> dict:
    """(a) and (d): og.Engine alone, one request, greedy, NEW_TOKENS tokens."""
    import onnxruntime_genai as og

    started = time.perf_counter()
    config = og.Config(str(bundle))
    config.overlay(json.dumps({"search": {"min_length": 0}}))
    model = og.Model(config)
    load = time.perf_counter() - started
    engine = og.Engine(model)
    buffer = engine.create_event_buffer(256)
    request = engine.create_request()
    turn = og.TurnOptions(request)
    turn.set_max_generated_tokens(NEW_TOKENS)
    turn.set_min_generated_tokens(NEW_TOKENS)
    begun = time.perf_counter()
    request.begin_turn(np.asarray(prompt_ids(bundle), dtype=np.int32), turn)
    first, count = 0.0, 0
    while engine.has_pending_requests():
        for _ in engine.run(buffer):
            count += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    return {"load_s": load, "ttft_s": first - begun, "decode_tps": (count - 1) / (end - first)}


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
    raise SystemExit("server did not start")


def http_stream(url: str, model: str = MODEL, new_tokens: int = NEW_TOKENS) -> dict:
    """One streamed /api/generate of `new_tokens` greedy tokens (raw prompt, no template)."""
    body = {"model": model, "prompt": PROMPT_TEXT, "raw": True, "stream": True,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    root, bundle = subject_bundle(args.keep)
    bundle_bytes = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())

    raw = raw_engine(bundle)
    process, url = start_server(root)
    peak, stop = {"worker_rss": 0, "tree_pss": 0}, threading.Event()
    threading.Thread(target=sample_memory, args=(process.pid, peak, stop), daemon=True).start()
    try:
        load_started = time.perf_counter()
        urllib.request.urlopen(urllib.request.Request(
            url + "/api/generate", data=b'{"model": "bench:int4"}', method="POST")).read()  # fmt: skip
        server_load = time.perf_counter() - load_started
        http_stream(url)  # warm-up
        one = http_stream(url)
        aggregate = {n: concurrent_streams(url, n) for n in (1, 4, 8, 16)}
    finally:
        stop.set()
        process.terminate()
        process.wait()
    http_tps = (one["tokens"] - 1) / one["decode_s"]
    report = {
        "subject": "Qwen2-0.5B-shaped random checkpoint, int4 bundle",
        "bundle_bytes": bundle_bytes,
        "a_raw_engine": {"ttft_s": round(raw["ttft_s"], 4), "decode_tps": round(raw["decode_tps"], 1)},
        "b_http_one_client": {"ttft_s": round(one["ttft_s"], 4), "decode_tps": round(http_tps, 1)},
        "ratio_b_over_a_decode": round(http_tps / raw["decode_tps"], 3),
        "c_aggregate_tps": {n: round(v, 1) for n, v in aggregate.items()},
        "ratio_c_over_c1": {n: round(v / aggregate[1], 2) for n, v in aggregate.items()},
        "d_load_s": {"raw_og_model": round(raw["load_s"], 3),
                     "server_load_request": round(server_load, 3)},
        "e_worker_peak_rss_bytes": peak["worker_rss"],
        "e_worker_rss_minus_bundle_mb": round((peak["worker_rss"] - bundle_bytes) / 1e6, 1),
        "e_tree_peak_pss_bytes": peak["tree_pss"],
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
