"""Engine benchmark: batching, admission of late arrivals and KV reuse, before and after.

Subject: a Qwen2-shaped random checkpoint (hidden 512, 8 layers, Qwen2's 152k vocabulary),
converted to int4 twice: by optimum (the converter's former graph) and by the ORT GenAI
model builder (its graph now). Three configurations run one after another in one process,
each with the model loaded afresh:

  before      optimum int4, og.Engine lanes, one prompt length per batch (the old rule)
  og-static   builder int4, og.Engine lanes, any prompt lengths per batch (og's cap of 4),
              ORTSERVE_BATCHING=static
  after       builder int4, continuous batching and KV reuse (the default)

Figures, ratios only (the machine is shared and small; absolute numbers drift):
  aggregate   generated tokens/s of N concurrent streams (N = 4, 8, 16) over one stream
              running the 8-stream set's prompts one at a time; prompts of 16-260 tokens
              (12-200 words of English at ~1.3 tokens a word: the test tokenizer splits
              words into 3-4 tokens, so prompts are random token ids of those lengths);
              "aggregate_decode": the same with prompts of 8 tokens (decoding alone)
  late        time to first token of a request arriving while a 300-token generation runs,
              over the same request on an idle model
  turn 2      time to first token of a ~1400-token conversation's second turn over its first:
              "rendered" as the chat endpoints run it (the answer re-tokenized from its text),
              "exact" when the answer re-tokenizes to its own ids (real models mostly do; this
              random one rarely: its answers are random ids of a 152k vocabulary), and through
              `ortserve serve`'s /api/chat

    python benchmarks/engine_bench.py [--keep DIR] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import H512, free_port  # noqa: E402

SHAPE = H512  # the checkpoint every benchmark shares (.cache/bench/qwen2-h512-l8-random)
CONFIGS = {
    "before": ("bench:optimum-int4", "static"),
    "og-static": ("bench:builder-int4", "static"),
    "after": ("bench:builder-int4", "auto"),
}
WORDS = ["river", "mountain", "forest", "cloud", "stone", "valley", "meadow", "harbor",
         "lantern", "orchard", "bridge", "thunder", "candle", "silver", "garden", "window",
         "winter", "summer", "marble", "island"]  # fmt: skip


def library(keep: Path, models: set[str]):
    """The library holding the int4 bundles `models` name, each converted once and kept."""
    from converters import convert
    from converters.tiny import build_checkpoint
    from ortserve.library import Library

    checkpoint = keep / "qwen2-h512-l8-random"
    if not (checkpoint / "model.safetensors").is_file():
        build_checkpoint("qwen2", checkpoint, **SHAPE)
    lib = Library(keep / "engine-library")
    for name, backend in (("bench:optimum-int4", "optimum"), ("bench:builder-int4", "builder")):
        if name in models and not lib.exists(name):
            convert(checkpoint, name, precision="int4", backend=backend, library=lib)
    return lib


def text(words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


def prompt_sets(seed: int, longest: int = 260) -> dict[int, list[list[int]]]:
    """N -> N prompts of 16..longest random ids (the trained part of the vocabulary)."""
    rng = np.random.default_rng(seed)
    shortest = min(16, longest)
    return {n: [rng.integers(5, 500, int(k)).tolist() for k in np.linspace(shortest, longest, n)]
            for n in (4, 8, 16)}  # fmt: skip


def options(new_tokens: int):
    from ortserve.engine.types import GenerationOptions

    return GenerationOptions(temperature=0, num_predict=new_tokens, num_ctx=4096)


def generate(loaded, tokens: list[int], new_tokens: int, started: threading.Event | None = None):
    """(generated tokens, seconds from submission to first token, end time) of one turn."""
    from ortserve.engine.types import Finished

    turn = loaded.generate(tokens, options(new_tokens))
    finished = None
    for item in turn:
        if started is not None and not started.is_set():
            started.set()
        if isinstance(item, Finished):
            finished = item
    job = turn._job  # the scheduler's timestamps: queueing included
    return (
        finished.usage.generated_tokens,
        job.first_token_at - job.submitted_at,
        time.perf_counter(),
    )


def aggregate(loaded, prompts: list[list[int]], new_tokens: int) -> float:
    """Generated tokens per second with every prompt streaming at once."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(loaded, p, new_tokens), prompts))
    return sum(r[0] for r in results) / (time.perf_counter() - started)


def one_at_a_time(loaded, prompts: list[list[int]], new_tokens: int) -> float:
    started = time.perf_counter()
    tokens = sum(generate(loaded, p, new_tokens)[0] for p in prompts)
    return tokens / (time.perf_counter() - started)


def late_arrival(loaded) -> dict:
    """TTFT of a 52-token request while a 300-token generation runs, and alone (the best of
    three); every prompt different, so that no kept turn shortens a prefill."""
    rng = np.random.default_rng(5)
    newcomers = [rng.integers(5, 500, 52).tolist() for _ in range(4)]
    solo = min(generate(loaded, prompt, 8)[1] for prompt in newcomers[:3])
    started = threading.Event()
    long = threading.Thread(target=generate, args=(loaded, rng.integers(5, 500, 80).tolist(),
                                                   300, started))  # fmt: skip
    long.start()
    started.wait()
    time.sleep(0.5)  # well into its decoding
    late = generate(loaded, newcomers[3], 8)[1]
    long.join()
    return {"solo_ttft_s": round(solo, 3), "late_ttft_s": round(late, 3),
            "ratio": round(late / solo, 2)}  # fmt: skip


def conversation(loaded, seed: int = 7) -> list[dict]:
    """A system prompt and question of ~1400 tokens in the model's chat template."""
    words = 200
    while True:
        messages = [{"role": "system", "content": text(words, seed)},
                    {"role": "user", "content": "Describe the valley."}]  # fmt: skip
        if len(loaded.encode(loaded.template.render(messages))) >= 1400:
            return messages
        words += 10


def second_turn(loaded) -> dict:
    """First- and second-turn TTFT of one conversation: as rendered, and exact."""
    messages = conversation(loaded)
    prompt = loaded.encode(loaded.template.render(messages))
    answer, ttft1, _ = turn(loaded, prompt, 32)
    text_answer = loaded.tokenizer.decode(answer)
    messages += [{"role": "assistant", "content": text_answer},
                 {"role": "user", "content": "And?"}]  # fmt: skip
    rendered = loaded.encode(loaded.template.render(messages))
    _, ttft2, cached = turn(loaded, rendered, 8)
    # another conversation, continued with the ids the model generated
    other = loaded.encode(loaded.template.render(conversation(loaded, seed=8)))
    kept, ttft1b, _ = turn(loaded, other, 32)
    follow = loaded.encode("<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n")
    _, ttft2b, cached_b = turn(loaded, other + kept + follow, 8)
    return {
        "prompt_tokens": len(rendered),
        "rendered": {"turn1_ttft_s": round(ttft1, 3), "turn2_ttft_s": round(ttft2, 3),
                     "reused_tokens": cached, "ratio": round(ttft2 / ttft1, 3)},
        "exact": {"turn1_ttft_s": round(ttft1b, 3), "turn2_ttft_s": round(ttft2b, 3),
                  "reused_tokens": cached_b, "ratio": round(ttft2b / ttft1b, 3)},
    }  # fmt: skip


def turn(loaded, tokens: list[int], new_tokens: int) -> tuple[list[int], float, int]:
    """(generated ids, TTFT, prompt tokens reused) of one turn on the scheduler itself."""
    job = loaded.scheduler.submit(tokens, options(new_tokens))
    ids = []
    while True:
        kind, *payload = job.events.get()
        if kind == "token":
            ids.append(payload[0])
        elif kind == "done":
            ttft = job.first_token_at - job.submitted_at
            return ids, ttft, payload[1].cached_prompt_tokens
        else:
            raise payload[0]


def throughput(loaded, new_tokens: int, repeat: int, longest: int = 260) -> dict:
    """Aggregate tok/s of 4, 8, 16 streams and their ratio to one stream, medians of
    `repeat` rounds (one stream and the others alternate, so drift hits both)."""
    single, together = [], {n: [] for n in (4, 8, 16)}
    for r in range(repeat):
        # other prompts every time: no kept turn may shorten a prefill here
        single.append(one_at_a_time(loaded, prompt_sets(10 * r + 1, longest)[8], new_tokens))
        for n, prompts in prompt_sets(10 * r + 2, longest).items():
            together[n].append(aggregate(loaded, prompts, new_tokens))
    one = float(np.median(single))
    return {
        "one_stream_tps": round(one, 1),
        "aggregate_tps": {n: round(float(np.median(v)), 1) for n, v in together.items()},
        "ratio": {n: round(float(np.median(v)) / one, 2) for n, v in together.items()},
    }


def measure(lib, model: str, batching: str, new_tokens: int, repeat: int) -> dict:
    from ortserve.config import Settings
    from ortserve.engine.runtime import Runtime

    runtime = Runtime(Settings(models=lib.root, batching=batching), lib)
    loaded = runtime.acquire(model)
    try:
        generate(loaded, loaded.encode(text(20, 0)), 16)  # warm-up
        return {
            "lanes": [lane.kind for lane in loaded.scheduler._lanes],
            "aggregate": throughput(loaded, new_tokens, repeat),
            # prompts of 8 tokens: decoding alone, what batching itself gives
            "aggregate_decode": throughput(loaded, new_tokens, repeat, longest=8),
            "late_arrival": late_arrival(loaded),
            "second_turn_engine": second_turn(loaded),
        }
    finally:
        runtime.release(loaded)
        runtime.shutdown()


def http_second_turn(lib, model: str, batching: str) -> dict:
    """The same conversation through `ortserve serve`'s streamed /api/chat."""
    port = free_port()
    env = {**os.environ, "ORTSERVE_MODELS": str(lib.root), "ORTSERVE_HOST": f"127.0.0.1:{port}",
           "ORTSERVE_BATCHING": batching}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "ortserve", "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url)
        from ortserve.config import Settings
        from ortserve.engine.runtime import Runtime

        runtime = Runtime(Settings(models=lib.root), lib)  # only to build the same messages
        loaded = runtime.acquire(model)
        messages = conversation(loaded)
        runtime.release(loaded)
        runtime.shutdown()
        _chat(url, model, [{"role": "user", "content": "hi"}], 4)  # load and warm up
        answer, ttft1 = _chat(url, model, messages, 32)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And?"}]
        _, ttft2 = _chat(url, model, messages, 8)
        return {"turn1_ttft_s": round(ttft1, 3), "turn2_ttft_s": round(ttft2, 3),
                "ratio": round(ttft2 / ttft1, 3)}  # fmt: skip
    finally:
        server.terminate()
        server.wait()


def _wait(url: str) -> None:
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def _chat(url: str, model: str, messages: list[dict], new_tokens: int) -> tuple[str, float]:
    """(answer, seconds to the first streamed chunk) of one /api/chat call."""
    body = {"model": model, "messages": messages, "stream": True,
            "options": {"temperature": 0, "num_predict": new_tokens}}  # fmt: skip
    request = urllib.request.Request(url + "/api/chat", data=json.dumps(body).encode(),
                                     method="POST")  # fmt: skip
    begun, first, parts = time.perf_counter(), 0.0, []
    with urllib.request.urlopen(request) as response:
        for line in response:
            chunk = json.loads(line)
            first = first or time.perf_counter()
            parts.append((chunk.get("message") or {}).get("content", ""))
    return "".join(parts), first - begun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the aggregates")
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    names = args.configs.split(",")
    lib = library(args.keep, {CONFIGS[name][0] for name in names})
    report = {"machine": f"{os.cpu_count()} logical CPUs (shared: compare ratios only)"}
    for name in names:
        model, batching = CONFIGS[name]
        report[name] = measure(lib, model, batching, args.new_tokens, args.repeat)
        if not args.no_http and name != "og-static":
            report[name]["second_turn_http"] = http_second_turn(lib, model, batching)
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
