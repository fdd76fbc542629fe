"""Driving a decoder graph or a continuous engine directly, for the engine's accuracy tests."""

from __future__ import annotations

import numpy as np

from ortserve.engine.continuous import BatchCache, ContinuousTurn, DecoderGraph


def teacher_forced_logits(graph: DecoderGraph, ids: list[int]) -> np.ndarray:
    """Every position's logits of one pass over `ids` (teacher forcing), float32."""
    cache = BatchCache(graph, 1)
    cache.reserve(1, len(ids))
    mask = np.ones((1, len(ids)), dtype=np.int64)
    out = graph.forward(np.asarray([ids]), mask, cache.view(0, 1), len(ids))
    return out[0, :, : graph.vocab_size].astype(np.float32)


def run_turns(
    engine, prompts: list[list[int]], new_tokens: int, after_step=None
) -> list[list[int]]:
    """The greedy tokens of `prompts`, all begun at once on a ContinuousEngine;
    `after_step()` is called after each of its steps."""
    requests = []
    for prompt in prompts:
        turn = ContinuousTurn()
        turn.set_max_generated_tokens(new_tokens)
        request = engine.create_request()
        request.begin_turn(np.asarray(prompt), turn)
        requests.append(request)
    tokens: dict = {request: [] for request in requests}
    while engine.has_pending_requests():
        for event in engine.run():
            if event.token is not None:
                tokens[event.request].append(event.token)
        if after_step is not None:
            after_step()
    return [tokens[request] for request in requests]


def served_turn(settings, library, name: str, text: str) -> list:
    """The events of one short greedy turn of `name` through a Runtime, shut down after."""
    from ortserve.engine.runtime import Runtime
    from ortserve.engine.types import GenerationOptions

    runtime = Runtime(settings, library)
    try:
        model = runtime.acquire(name)
        options = GenerationOptions(temperature=0, num_predict=16, num_ctx=512)
        events = list(model.generate(model.encode(text), options))
        runtime.release(model)
    finally:
        runtime.shutdown()
    return events
