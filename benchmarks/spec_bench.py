"""Speculative decoding benchmark: ortserve's continuous loop with prompt-lookup drafts vs
without, on the same bundle, in this process, alternated.

Subject: serve_bench.py's `bench:converted` (the Qwen2-shaped h512 random checkpoint as int4;
built once under --keep/library), or --bundle DIR. Two schedulers over the same bundle, one
with ORTSERVE_SPECULATION=auto and one with off, each given the same turns in turn:
  copy      greedy, a prompt holding a ~300-token passage and asking for it again. A
            random-weight model does not copy a passage, but its greedy output falls into
            loops, which repeat text just the same (what a quoting or editing reply does);
  sampled   Ollama's default sampling (temperature 0.8, top-k 40, top-p 0.9, repetition
            penalty 1.1), one seed: a random model's flat distribution makes most drafts
            miss, so this is mostly the cost of drafting where it does not pay;
  streams   4 copy turns at once (different passages): aggregate tokens/s.
Per line: median tokens/s of each side over --rounds rounds, their ratio, the share of
drafts kept, and for greedy lines whether the tokens were identical.

    python benchmarks/spec_bench.py [--keep DIR] [--bundle DIR] [--rounds 5]
                                    [--new-tokens 256] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = ("river", "mountain", "forest", "cloud", "harbor", "lantern", "orchard", "bridge",
         "thunder", "candle", "silver", "garden", "window", "winter", "summer", "marble",
         "island", "meadow", "valley", "stone")  # fmt: skip


def passage_prompt(bundle: Path, seed: int, words: int = 220) -> list[int]:
    """A request to repeat a ~300-token passage of plain words, tokenized."""
    from tokenizers import Tokenizer

    rng = np.random.default_rng(seed)
    text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))
    prompt = f"Repeat the following passage exactly.\n\n{text}\n\nThe passage again:\n"
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    return tokenizer.encode(prompt, add_special_tokens=False).ids


def start(bundle: Path, speculation: str):
    from ortserve.config import physical_cores
    from ortserve.engine.scheduler import Scheduler

    scheduler = Scheduler(bundle, "cpu", batch_size=8, lanes=1, name=speculation,
                          kv_cache_entries=0, threads=physical_cores(),
                          speculation=speculation)  # fmt: skip
    scheduler.start()
    return scheduler


def options(new_tokens: int, sampled: bool = False):
    from ortserve.engine.types import GenerationOptions

    if sampled:
        return GenerationOptions(temperature=0.8, top_k=40, top_p=0.9, seed=3,
                                 num_predict=new_tokens, repeat_penalty=1.1, num_ctx=4096)  # fmt: skip
    return GenerationOptions(temperature=0, num_predict=new_tokens, repeat_penalty=1.0,
                             num_ctx=4096)  # fmt: skip


def tokens_of(job) -> list[int]:
    tokens = []
    while True:
        kind, *payload = job.events.get(timeout=600)
        if kind == "token":
            tokens.append(payload[0])
        elif kind == "done":
            return tokens
        else:
            raise payload[0]


def run_turns(scheduler, prompts: list[list[int]], opts) -> tuple[float, list[list[int]]]:
    """Aggregate decode tokens/s (first token to last, over all turns) and each turn's tokens."""
    jobs = [scheduler.submit(p, opts) for p in prompts]
    results: list[list[int]] = [[] for _ in jobs]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, tokens_of(jobs[i])))
               for i in range(len(jobs))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = min(job.first_token_at for job in jobs)
    last = max(job.finished_at for job in jobs)
    generated = sum(len(r) - 1 for r in results)  # the first token belongs to the prefill
    return generated / max(last - first, 1e-9), results


def engine_of(scheduler):
    return scheduler._lanes[0].engine


def measure(bundle: Path, rounds: int, new_tokens: int) -> dict:
    off, auto = start(bundle, "off"), start(bundle, "auto")
    lines = {
        "copy": ([passage_prompt(bundle, 1)], options(new_tokens)),
        "sampled": ([passage_prompt(bundle, 2)], options(new_tokens, sampled=True)),
        "streams": ([passage_prompt(bundle, 10 + i) for i in range(4)], options(new_tokens)),
    }
    figures = {}
    try:
        for prompts, _ in lines.values():  # warm both: first runs pay for allocations
            run_turns(off, prompts[:1], options(8))
            run_turns(auto, prompts[:1], options(8))
        for name, (prompts, opts) in lines.items():
            runs = {"off": [], "auto": []}
            outputs = {"off": [], "auto": []}
            engine = engine_of(auto)
            drafted, accepted = engine.drafted, engine.accepted
            for _ in range(rounds):
                for side, scheduler in (("off", off), ("auto", auto)):
                    tps, tokens = run_turns(scheduler, prompts, opts)
                    runs[side].append(round(tps, 1))
                    outputs[side].append(tokens)
            proposed = engine.drafted - drafted
            kept = engine.accepted - accepted
            figures[name] = summary(runs, outputs, proposed, kept, len(prompts), opts)
            print(json.dumps({name: figures[name]}), flush=True)
    finally:
        off.stop()
        auto.stop()
    return figures


def summary(runs: dict, outputs: dict, proposed: int, kept: int, streams: int, opts) -> dict:
    off, auto = statistics.median(runs["off"]), statistics.median(runs["auto"])
    result = {
        "streams": streams,
        "off_tps": round(off, 1),
        "auto_tps": round(auto, 1),
        "ratio": round(auto / off, 3) if off else None,
        "drafted": proposed,
        "accepted": kept,
        "acceptance": round(kept / proposed, 3) if proposed else None,
        "off_runs": runs["off"],
        "auto_runs": runs["auto"],
    }
    if opts.temperature == 0:
        pairs = [(a, b) for o, s in zip(outputs["off"], outputs["auto"]) for a, b in zip(o, s)]
        result["identical"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        result["first_divergence"] = [_diverges(a, b) for a, b in pairs if a != b][:4]
        result["tokens"] = len(pairs[0][0]) if pairs else 0
    return result


def _diverges(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--bundle", type=Path, help="a builder bundle (default: bench:converted)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    bundle = args.bundle
    if bundle is None:
        from serve_bench import converted_bundle

        bundle = converted_bundle(args.keep)[1]
    load = os.getloadavg()
    started = time.perf_counter()
    figures = measure(bundle, args.rounds, args.new_tokens)
    report = {"spec": figures, "bundle": str(bundle), "load_start": [round(x, 2) for x in load],
              "load_end": [round(x, 2) for x in os.getloadavg()],
              "wall_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
