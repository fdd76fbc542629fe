"""Train the demo model: generate the conversations, train the tokenizer, train the decoder,
save a transformers checkpoint. Seeded throughout: the same seed on the same torch build and
CPU gives the same weights (see docs/demo.md for what was checked).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from converters.demo_model import conversations, facts, tokenizer
from converters.demo_model.conversations import Sample


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights (recorded in the checkpoint as demo-recipe.json)."""

    seed: int = 0
    conversations: int = 64000  # training conversations, each seen once
    tokenizer_sample: int = 8000  # the first this many train the BPE
    row_tokens: int = 512  # packed row length
    rows_per_step: int = 2  # small steps: more of them for the same tokens learn faster here
    learning_rate: float = 2e-3  # 4e-3 and 5e-3 learnt to copy later (docs/demo.md)
    warmup_steps: int = 50
    weight_decay: float = 0.01
    threads: int = 2
    bf16: bool = True  # bf16 matrix products under autocast: ~2x faster on CPUs with AMX
    probe_every: int = 1000
    context_weight: float = 0.5  # loss weight of the prompts' tokens (the answers' is 1)
    # Second stage: sums thought through in columns (the one-digit table is learnt only from
    # ~36k of them: 12k gave 23% of it, 36k all of it), mixed with fresh conversations so
    # that nothing else is forgotten. 0 sums: no second stage.
    drill_sums: int = 30000
    drill_conversations: int = 8000
    drill_learning_rate: float = 1e-3


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # -100 outside the assistant's answers
    answer_start: int = 0  # where the last answer begins


def encode(tok, sample: Sample) -> Encoded:
    """Every assistant turn learnt, in one sequence: each prompt is the previous turns'
    text plus what the client adds, and the template renders a turn as it was generated, so
    the whole is the conversation the server sees. Prompt pieces and answers are tokenized
    apart, as the server tokenizes a prompt and the model then writes; every boundary is
    after <|im_end|> or an empty line, where the pre-tokenizer splits anyway (test_demo_data
    checks that the pieces tokenize as the whole does)."""
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    turns = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
    for k, index in enumerate(turns):
        last = k == len(turns) - 1
        prompt = tokenizer.render_prompt(sample.messages[:index], sample.tools,
                                         sample.think if last else False)  # fmt: skip
        assert prompt.startswith(text), "a turn's prompt must extend the turns before it"
        answer = (sample.answer if last else sample.answers[k]) + tokenizer.END
        context = tok.encode(prompt[len(text) :]).ids
        written = tok.encode(answer).ids
        ids += context
        start = len(ids)
        ids += written
        labels += [-100] * len(context) + written
        text = prompt + answer
    return Encoded(ids, labels, start)


def texts(samples: list[Sample]) -> list[str]:
    """Each conversation's whole text (the BPE's training data)."""
    out = []
    for s in samples:
        out.append(tokenizer.render_prompt(s.request, s.tools, s.think) + s.answer + tokenizer.END)
    return out


def pack(items: list[Encoded], row_tokens: int, pad: int) -> list[tuple[list, list, list, list]]:
    """Rows of (ids, positions, documents, labels), filled first-fit; -1 marks padding."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for item in items:
        size = len(item.ids)
        for i, left in enumerate(room):
            if size <= left:
                rows[i].append(item)
                room[i] -= size
                break
        else:
            rows.append([item])
            room.append(row_tokens - size)
    return [_row(row, row_tokens, pad) for row in rows]


def _row(items: list[Encoded], row_tokens: int, pad: int) -> tuple[list, list, list, list]:
    ids, positions, documents, labels = [], [], [], []
    for n, item in enumerate(items):
        ids += item.ids
        positions += range(len(item.ids))
        documents += [n] * len(item.ids)
        labels += item.labels
    fill = row_tokens - len(ids)
    return (ids + [pad] * fill, positions + [0] * fill, documents + [-1] * fill,
            labels + [-100] * fill)  # fmt: skip


def build_tokenizer(samples: list[Sample], recipe: Recipe):
    glossary = tokenizer.glossary(facts.names())
    return tokenizer.train_tokenizer(texts(samples[: recipe.tokenizer_sample]) + glossary)


def _schedule(step: int, total: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def prepare(recipe: Recipe, log=print):
    """(tokenizer, rows tensor [rows, 4, row_tokens]): the training data, packed."""
    started = time.monotonic()
    samples = conversations.dataset(recipe.seed, recipe.conversations)
    tok = build_tokenizer(samples, recipe)
    encoded = [encode(tok, s) for s in samples]
    kept, rows = _shuffled_rows(tok, encoded, recipe, random.Random(recipe.seed))
    log(f"data: {len(kept)} conversations ({len(encoded) - len(kept)} too long), "
        f"{len(rows)} rows, {sum(len(e.ids) for e in kept)} tokens, "
        f"{sum(1 for e in kept for x in e.labels if x != -100)} learnt, "
        f"{time.monotonic() - started:.0f}s")  # fmt: skip
    return tok, rows


def drill_rows(tok, recipe: Recipe, log=print):
    """The second stage's rows: sums with column steps and fresh conversations, packed."""
    rng = random.Random(recipe.seed + 1)
    sums = [conversations.join([conversations.arithmetic(rng, conversations.TRAIN)], None,
                               think=True) for _ in range(recipe.drill_sums)]  # fmt: skip
    samples = sums + conversations.dataset(recipe.seed + 1, recipe.drill_conversations)
    kept, rows = _shuffled_rows(tok, [encode(tok, s) for s in samples], recipe, rng)
    log(f"drill data: {len(kept)} conversations, {len(rows)} rows")
    return rows


def _shuffled_rows(tok, encoded: list[Encoded], recipe: Recipe, rng: random.Random):
    """(the conversations that fit a row, shuffled by rng; them packed as a rows tensor)."""
    import torch

    kept = [e for e in encoded if len(e.ids) <= recipe.row_tokens]
    rng.shuffle(kept)
    return kept, torch.tensor(pack(kept, recipe.row_tokens, tok.token_to_id("<|endoftext|>")))


def train(recipe: Recipe, log=print):
    """(trained DemoModel, tokenizers.Tokenizer, figures)."""
    import torch

    from converters.demo_model.model import DemoModel, qwen2_config

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    started, cpu = time.monotonic(), time.process_time()
    tok, rows = prepare(recipe, log)
    eos, pad = tok.token_to_id(tokenizer.END), tok.token_to_id("<|endoftext|>")
    think = tok.token_to_id("<think>")
    model = DemoModel(qwen2_config(tok.get_vocab_size(), eos=eos, pad=pad))
    probes = probe_set(tok)

    steps, losses = fit(model, rows, recipe, recipe.learning_rate, think, probes, log, started)
    drill_steps = 0
    if recipe.drill_sums:
        drilled = drill_rows(tok, recipe, log)
        drill_steps, losses = fit(model, drilled, recipe, recipe.drill_learning_rate, think,
                                  probes, log, started)  # fmt: skip
        rows = torch.cat([rows, drilled])
    figures = {"steps": steps, "drill_steps": drill_steps,
               "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
               "train_seconds": round(time.monotonic() - started),
               "train_cpu_seconds": round(time.process_time() - cpu),
               "parameters": sum(p.numel() for p in model.parameters()),
               "tokens": int((rows[:, 2] >= 0).sum()), "probe": probe(model, probes)}  # fmt: skip
    return model, tok, figures


def fit(model, rows, recipe: Recipe, learning_rate: float, think: int, probes, log, started):
    """One pass over `rows` with a fresh AdamW and warm-up + cosine schedule: (steps, losses)."""
    import torch

    from converters.demo_model.model import loss_fn

    def step_loss(*batch):
        # bf16 matrix products (AMX/AVX-512 BF16 where the CPU has them), fp32 weights
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            return loss_fn(model, *batch, context_weight=recipe.context_weight,
                           chosen_after=think)  # fmt: skip

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                  betas=(0.9, 0.98), weight_decay=recipe.weight_decay,
                                  fused=True)  # fmt: skip
    steps = len(rows) // recipe.rows_per_step  # whole batches only
    losses: list[float] = []
    for step in range(steps):
        batch = rows[step * recipe.rows_per_step : (step + 1) * recipe.rows_per_step]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * _schedule(step, steps, recipe)
        loss = step_loss(batch[:, 0], batch[:, 1], batch[:, 2], batch[:, 3])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % recipe.probe_every == 0 or step == steps - 1:
            shares = probe(model, probes)
            log(f"step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                f"{time.monotonic() - started:.0f}s  held-out (teacher-forced): "
                + " ".join(f"{f} {v:.0%}" for f, v in shares.items()))  # fmt: skip
    return steps, losses


def probe_set(tok, per_family: int = 24) -> list[tuple[str, Encoded]]:
    """Held-out conversations (evaluate.py's, another seed), encoded for `probe`."""
    from converters.demo_model.evaluate import heldout

    out = []
    for family, sample in heldout(seed=99, per_family=per_family):
        sample.think = family in ("thinking", "arithmetic")  # as evaluate.py asks
        out.append((family, encode(tok, sample)))
    return out


def probe(model, probes: list[tuple[str, Encoded]]) -> dict[str, float]:
    """family -> the share of last answers the model gets exactly right, teacher-forced: every
    token the argmax. Greedy decoding writes exactly those answers; the grammar only helps."""
    import torch

    right: dict[str, list[bool]] = {}
    with torch.no_grad():
        for family, item in probes:
            ids = torch.tensor([item.ids])
            logits = model(ids, torch.arange(len(item.ids))[None], torch.zeros_like(ids))
            guess = logits[0, item.answer_start - 1 : -1].argmax(-1).tolist()
            right.setdefault(family, []).append(guess == item.ids[item.answer_start :])
    return {f: sum(v) / len(v) for f, v in right.items()}


def save(model, tok, out: Path, recipe: Recipe, figures: dict) -> None:
    """A transformers checkpoint: config, safetensors, tokenizer, template, recipe, licence."""
    import torch

    from converters.demo_model.model import check_against_transformers, to_transformers

    out.mkdir(parents=True, exist_ok=True)
    hf = to_transformers(model.eval())
    probe = tok.encode("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n").ids
    difference = check_against_transformers(model, hf, probe)
    assert difference < 1e-4, f"the trained model and Qwen2ForCausalLM disagree by {difference}"
    hf.generation_config.update(do_sample=False, eos_token_id=model.config.eos_token_id,
                                pad_token_id=model.config.pad_token_id)  # fmt: skip
    hf.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_tokenizer(tok, out)
    record = {"recipe": asdict(recipe), "figures": figures, "torch": torch.__version__}
    (out / "demo-recipe.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "LICENSE").write_text(LICENSE, encoding="utf-8")


LICENSE = """MIT License

demo-chat: weights trained by the ortserve project on synthetic conversations it generates
(converters/demo_model). Rebuild with `python -m converters.demo_model`.
"""
