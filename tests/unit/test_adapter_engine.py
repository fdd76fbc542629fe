"""The Generator lanes that serve adapters behave like og.Engine lanes: same events, same usage.

A model with an adapter whose B is zero computes exactly the base model, so the scheduler's
og.Engine lanes (base bundle) and GeneratorEngine lanes (adapted bundle + zero adapter)
must produce the same tokens, finish reasons and usage, turn for turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters import adapter as lora
from ortserve.engine.guided import guidance_for
from ortserve.engine.scheduler import Scheduler
from ortserve.engine.types import GenerationOptions
from ortserve.library import Library
from ortserve.models.adapters import attach_adapters
from tests.support.lora import write_peft_adapter

pytestmark = pytest.mark.slow
GREEDY = GenerationOptions(temperature=0.0, repeat_penalty=1.0, num_ctx=512, num_predict=40)


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    """(base, the base with a zero-B adapter, the base with a real adapter), int4 qwen2."""
    from converters import convert

    root = tmp_path_factory.mktemp("engine")
    library = Library(root / "models")
    checkpoint = tiny_checkpoint("qwen2")
    base = convert(checkpoint, "base", precision="int4", library=library, progress=False)
    real = write_peft_adapter(checkpoint, root / "real")
    zero = write_peft_adapter(checkpoint, root / "zero")
    tensors = lora.read_safetensors(zero / "adapter_model.safetensors")
    config = json.loads((zero / "adapter_config.json").read_text())
    params = {
        k: v * 0 if ".lora_B." in k else v for k, v in lora.peft_to_graph(tensors, config).items()
    }
    lora.write_onnx_adapter(params, root / "zero.onnx_adapter")
    made = {"base": base}
    for name, sources in (("zero", [("zero.onnx_adapter", root / "zero.onnx_adapter")]),
                          ("real", [("real", real)])):  # fmt: skip
        made[name] = library.save(
            name, {**base.manifest, **attach_adapters(library, base, sources)}
        )
    return library, made


def run_turns(library, info, prompts, options=GREEDY, cancel_after=None):
    """Submit every prompt at once; return [(tokens, reason, usage)] in submission order."""
    scheduler = Scheduler(info.path, "cpu", batch_size=2, lanes=2, name=info.name,
                          adapters=library.adapter_files(info))  # fmt: skip
    scheduler.start()
    try:
        jobs = [scheduler.submit(p, options) for p in prompts]
        return [collect(scheduler, job, cancel_after) for job in jobs]
    finally:
        scheduler.stop()


def collect(scheduler, job, cancel_after=None):
    tokens = []
    while True:
        kind, *payload = job.events.get(timeout=120)
        if kind == "token":
            tokens.append(payload[0])
            if cancel_after is not None and len(tokens) == cancel_after:
                scheduler.cancel(job)
            continue
        assert kind == "done", payload
        return tokens, payload[0], payload[1]


def eos_prompt(library, info) -> list[int]:
    """A prompt after which the tiny model emits EOS within 40 tokens (searched, seeded)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(10, 500, size=6).tolist() for _ in range(24)]
    for prompt, (_, reason, _) in zip(prompts, run_turns(library, info, prompts)):
        if reason == "stop":
            return prompt
    pytest.skip("no prompt among 24 ends with EOS in this tiny model")


def test_generator_lanes_match_engine_lanes(models):
    library, m = models
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    prompts.append(eos_prompt(library, m["base"]))
    engine = run_turns(library, m["base"], prompts)
    generator = run_turns(library, m["zero"], prompts)
    assert generator == engine
    assert {reason for _, reason, _ in engine} == {"length", "stop"}  # both endings covered
    assert run_turns(library, m["real"], prompts[:1])[0][0] != engine[0][0]


def test_cancel_frees_a_generator_lane(models):
    library, m = models
    info = m["real"]
    long = GenerationOptions(temperature=0.0, repeat_penalty=1.0, num_ctx=1000, num_predict=900)
    scheduler = Scheduler(info.path, "cpu", lanes=2, name=info.name,
                          adapters=library.adapter_files(info))  # fmt: skip
    scheduler.start()
    try:
        jobs = [scheduler.submit([5, 6, 7, 8], long) for _ in range(3)]  # one more than lanes
        for job in jobs:
            tokens, reason, usage = collect(scheduler, job, cancel_after=3)
            assert reason == "cancelled" and 3 <= len(tokens) < 900
        assert scheduler.pending() == 0
        tokens, reason, usage = collect(scheduler, scheduler.submit([5, 6, 7, 8], GREEDY))
        assert reason == "length" and len(tokens) == usage.generated_tokens == 40
    finally:
        scheduler.stop()


def test_guidance_and_sampling_on_generator_lanes(models):
    library, m = models
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    options = GenerationOptions(temperature=0.0, repeat_penalty=1.0, num_ctx=512, num_predict=30,
                                guidance=guidance_for(schema))  # fmt: skip
    engine = run_turns(library, m["base"], [[5, 6, 7, 8]], options)
    generator = run_turns(library, m["zero"], [[5, 6, 7, 8]], options)
    assert generator == engine
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(m["real"].path) / "tokenizer.json"))
    tokens, _, _ = run_turns(library, m["real"], [[5, 6, 7, 8]], options)[0]
    text = tokenizer.decode(tokens)
    assert text.lstrip().startswith("{")  # the grammar holds with the adapter active too
    sampled = GenerationOptions(temperature=0.9, top_k=20, top_p=0.9, num_ctx=512, num_predict=8)
    tokens, reason, usage = run_turns(library, m["real"], [[5, 6, 7, 8]], sampled)[0]
    assert len(tokens) == 8 and reason == "length" and usage.generated_tokens == 8
