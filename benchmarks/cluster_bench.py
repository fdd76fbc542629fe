"""ortserve on Ray Serve against `ortserve serve`, side by side in one run (docs/cluster.md).

Subject: serve_bench.py's h512 Qwen2-shaped int4 model (`bench:converted`, built once).
- overhead: single-stream decode (tokens/s after the first token, 128 greedy tokens) through
  the cluster with one replica over the same through `ortserve serve`; goal >= 0.9. Both run
  at once and are asked in turn, round by round (medians compared): on a shared machine the
  load changes over minutes, and measuring one side after the other measured that instead;
- affinity: a ~1400-token conversation's second-turn TTFT over its first, with 2 replicas on
  a 2-node local cluster serving the model (both preload it); goal <= 0.15.

    python benchmarks/cluster_bench.py [--keep DIR] [--rounds 3] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
# Both sides with the same forward-pass threads: a Ray worker otherwise runs with fewer than
# `ortserve serve` (measured 1.55-1.86x "faster" on this busy 2-core machine for that alone).
os.environ.setdefault("ORTSERVE_COMPUTE_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import serve_bench  # noqa: E402

MODEL = serve_bench.CONVERTED
NEW_TOKENS = 128


def decode_rate(url: str) -> float:
    """Tokens/s after the first token of one stream (the client's clock)."""
    run = serve_bench.http_stream(url, MODEL, NEW_TOKENS)
    return (run["tokens"] - 1) / run["decode_s"]


def interleaved_decode(urls: list[str], rounds: int) -> list[float]:
    """Each url's median decode rate, the urls asked in turn in every round."""
    for url in urls:
        decode_rate(url)  # warm-up
    rates: list[list[float]] = [[] for _ in urls]
    for _ in range(rounds):
        for url, found in zip(urls, rates, strict=True):
            found.append(decode_rate(url))
    return [statistics.median(found) for found in rates]


@contextlib.contextmanager
def single_server(root: Path) -> Iterator[str]:
    """`ortserve serve` on the bench library, its model preloaded: its url."""
    port = serve_bench.free_port()
    env = {**os.environ, "ORTSERVE_MODELS": str(root), "ORTSERVE_HOST": f"127.0.0.1:{port}",
           "ORTSERVE_PRELOAD": MODEL}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "ortserve", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield url
    finally:
        process.terminate()
        process.wait()


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready")


def chat_ttft(url: str, messages: list[dict]) -> tuple[float, str]:
    body = {"model": MODEL, "messages": messages, "stream": True,
            "options": {"temperature": 0, "num_predict": 8}}  # fmt: skip
    started, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=300) as answer:
        for line in answer.iter_lines():
            chunk = json.loads(line)
            first = first or time.perf_counter()
            text += chunk.get("message", {}).get("content", "")
    return first - started, text


def affinity(url: str, conversations: int) -> list[float]:
    filler = " ".join(f"word{i % 50}" for i in range(290))  # ~1400 tokens
    ratios = []
    for number in range(conversations):
        messages = [{"role": "user", "content": f"Conversation {number}. {filler}"}]
        first, text = chat_ttft(url, messages)
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "And then?"}]  # fmt: skip
        second, _ = chat_ttft(url, messages)
        ratios.append(second / first)
    return ratios


def cluster_figures(root: Path, rounds: int, single_url: str) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.config import HTTPOptions

    from ortserve.cluster.deployments import APP_NAME, build, serve_tuning

    os.environ.update(serve_tuning())  # as `ortserve serve --ray` starts its Ray
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})  # fmt: skip
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    port = serve_bench.free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(proxy_location="HeadOnly", http_options=HTTPOptions(host="127.0.0.1", port=port))
    args = {"ORTSERVE_MODELS": str(root), "ORTSERVE_PRELOAD": MODEL}
    try:
        serve.run(build(args), name=APP_NAME, route_prefix="/")
        one, single = interleaved_decode([url, single_url], rounds)
        two = {**args, "ORTSERVE_MIN_REPLICAS": "2", "ORTSERVE_MAX_REPLICAS": "2"}
        serve.run(build(two), name=APP_NAME, route_prefix="/")
        ratios = affinity(url, rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return {"serve_decode_tps": single, "cluster_decode_tps": one,
            "second_turn_ttft_ratios": ratios}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    root, _ = serve_bench.converted_bundle(args.keep)
    with single_server(root) as single_url:
        figures = cluster_figures(root, args.rounds, single_url)
    figures["overhead_ratio"] = figures["cluster_decode_tps"] / figures["serve_decode_tps"]
    figures["second_turn_ttft_ratio"] = statistics.median(figures["second_turn_ttft_ratios"])
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
