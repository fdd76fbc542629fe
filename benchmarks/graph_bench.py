"""Graph benchmark: the converter's int4 decoder vs the model builder's own vs optimum's.

Subject: a Qwen2-shaped random checkpoint (hidden 512, 8 layers, Qwen2's vocabulary and
head ratios), built once under --keep. Three int4 bundles of it:
  (a) `convert(..., backend="builder")`: what ortserve converts by default;
  (b) the ORT GenAI model builder with its own defaults (`-p int4 -e cpu`, no options),
      run through converters/builder.py (its CLI does not import under transformers 4.57);
  (c) `convert(..., backend="optimum")`: optimum's export + MatMulNBits quantization.
Each is loaded once with og.Model and run with og.Generator (greedy, the same prompt,
--new-tokens tokens), the three alternated for --rounds rounds (in a rotating order) so that
machine noise falls on all alike. Prints the median prefill and decode tokens/s of each and the
ratios a/b, a/c, b/c (medians of each round's ratio).
A benchmark, not a test: `make bench`.

    python benchmarks/graph_bench.py [--keep DIR] [--rounds 9] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import H512 as SHAPE  # noqa: E402  (one checkpoint shape for every benchmark)

PROMPT_TOKENS = 64
BUNDLES = ("converted", "builder", "optimum")


def workdir(keep: Path, vocab: int) -> Path:
    """Where a subject and its bundles live: --keep itself for the default shape (serve_bench.py
    and bench.py find `qwen2-h512-l8-random` and `library` there), a folder for another."""
    return keep if vocab == SHAPE["vocab_size"] else keep / f"vocab-{vocab}"


def build_subject(work: Path, vocab: int) -> Path:
    from converters.tiny import build_checkpoint

    checkpoint = work / "qwen2-h512-l8-random"
    if not (checkpoint / "model.safetensors").is_file():
        build_checkpoint("qwen2", checkpoint, **{**SHAPE, "vocab_size": vocab})
    return checkpoint


def build_bundles(work: Path, checkpoint: Path) -> dict[str, Path]:
    """The three int4 bundles of the checkpoint, each built once."""
    from converters import convert
    from converters.builder import build_decoder
    from converters.checkpoint import inspect_checkpoint
    from ortserve.library import Library

    library = Library(work / "library")
    paths = {}
    for backend, name in (("builder", "converted"), ("optimum", "optimum")):
        if not library.exists(f"bench:{name}"):
            print(f"converting ({backend}) ...", file=sys.stderr, flush=True)
            convert(checkpoint, f"bench:{name}", "int4", backend=backend, verify=False,
                    library=library, progress=False)  # fmt: skip
        paths[name] = library.get(f"bench:{name}").path
    own = work / "builder-int4"
    if not (own / "genai_config.json").is_file():
        print("building with the model builder's defaults ...", file=sys.stderr, flush=True)
        build_decoder(inspect_checkpoint(checkpoint), own, "int4", options={})
    paths["builder"] = own
    return {name: paths[name] for name in BUNDLES}


def prompt(vocab: int) -> list[int]:
    """PROMPT_TOKENS ids that are ordinary words of the tiny tokenizer's filled vocabulary."""
    return [int(i) for i in np.random.default_rng(0).integers(600, vocab, PROMPT_TOKENS)]


def run_once(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy og.Generator run."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    generator.generate_next_token()
    first = time.perf_counter()
    count = 1
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    end = time.perf_counter()
    return len(ids) / (first - started), (count - 1) / (end - first)


def measure(bundles: dict[str, Path], rounds: int, new_tokens: int, vocab: int) -> dict:
    import onnxruntime_genai as og

    models = {name: og.Model(str(path)) for name, path in bundles.items()}
    ids = prompt(vocab)
    for model in models.values():  # warm-up: first runs allocate and pre-pack weights
        run_once(model, ids, 8)
    names = list(models)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(rounds):
        # a different order each round: no bundle always runs first (or after the same one)
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name].append(run_once(models[name], ids, new_tokens))
    return {
        name: {
            "prefill_tps": statistics.median(r[0] for r in results),
            "decode_tps": statistics.median(r[1] for r in results),
            "prefill_runs": [round(r[0], 1) for r in results],
            "decode_runs": [round(r[1], 1) for r in results],
        }
        for name, results in runs.items()
    }


def report(figures: dict[str, dict]) -> dict:
    """Ratios as the median of each round's ratio: load that changes between rounds (a shared
    machine) then cancels out, where a ratio of medians would mix rounds."""

    def ratio(a: str, b: str, key: str) -> float:
        pairs = zip(figures[a][f"{key}_runs"], figures[b][f"{key}_runs"])
        return round(statistics.median(x / y for x, y in pairs), 3)

    ratios = {
        f"{a}/{b} {key}": ratio(a, b, key)
        for a, b in (("converted", "builder"), ("converted", "optimum"), ("builder", "optimum"))
        for key in ("decode", "prefill")
    }
    for name, f in figures.items():
        print(f"{name:<10} prefill {f['prefill_tps']:8.1f} tok/s   decode {f['decode_tps']:7.1f}"
              f" tok/s   runs {f['decode_runs']}")  # fmt: skip
    for label, value in ratios.items():
        print(f"{label:<28}{value:.3f}x")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="where to keep the checkpoint and bundles")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"],
                        help="vocabulary size: Qwen2's by default, whose LM head dominates "
                        "the decode of so small a model; a smaller one weighs the layers more")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        keep = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work = workdir(keep, args.vocab)
        work.mkdir(parents=True, exist_ok=True)
        bundles = build_bundles(work, build_subject(work, args.vocab))
        figures = measure(bundles, args.rounds, args.new_tokens, args.vocab)
        ratios = report(figures)
        if args.json:
            args.json.write_text(json.dumps({"figures": figures, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
