"""The model builder backend, end to end: the real builder through converters/builder.py.

fp32 greedy parity for every family is test_convert.py's (it converts with the builder);
here: the layer imports the builder, bundles record their graph form, precisions that take
another route inside the builder (fp16 on CPU), sliding windows, the optimum fallback, the
int4 bundle through ortserve's runtime, and LoRA on the builder's fused projections.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from converters import convert
from converters.tiny import build_checkpoint
from converters.verify import greedy_genai, greedy_transformers, verify_decoder
from ortserve.errors import InvalidRequest

pytestmark = pytest.mark.slow


def _op_types(bundle) -> set[str]:
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def _reference(checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def test_the_compatibility_layer_imports_the_installed_builder():
    import transformers

    from converters.builder import import_builder

    module = import_builder()
    assert module.__name__ == "onnxruntime_genai.models.builder"
    assert callable(module.create_model) and callable(module.parse_extra_options)
    # the classes it imports exist now, under this transformers, as stand-ins if need be
    assert hasattr(transformers, "Qwen3_5ForConditionalGeneration")


def test_an_int4_builder_bundle_records_its_graph_and_runs_in_the_runtime(tiny_checkpoint, library):
    from ortserve.config import Settings
    from ortserve.engine.runtime import Runtime
    from ortserve.engine.types import Finished, GenerationOptions, TextChunk

    info = convert(tiny_checkpoint("qwen2"), "chat", precision="int4", library=library,
                   progress=False)  # fmt: skip
    assert info.details["graph"] == "builder"
    assert info.manifest["source"]["options"]["backend"] == "auto"
    assert {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"} <= _op_types(info.path)
    genai = json.loads((info.path / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in genai["model"]["decoder"]["inputs"]
    assert (info.path / "tokenizer.json").read_bytes() == (
        tiny_checkpoint("qwen2") / "tokenizer.json"
    ).read_bytes()  # the checkpoint's own files, not the builder's re-saved ones

    runtime = Runtime(Settings(models=library.root), library)
    try:
        loaded = runtime.acquire("chat")
        options = GenerationOptions(num_predict=12, temperature=0, num_ctx=256)
        items = list(loaded.generate(loaded.encode("The river and the mountain"), options))
        runtime.release(loaded)
    finally:
        runtime.shutdown()
    assert isinstance(items[-1], Finished) and items[-1].usage.generated_tokens == 12
    assert any(isinstance(item, TextChunk) for item in items)


def test_the_optimum_backend_stays_available(tiny_checkpoint, library):
    checkpoint = tiny_checkpoint("llama")
    info = convert(checkpoint, "old", precision="fp32", backend="optimum", library=library,
                   progress=False)  # fmt: skip
    assert info.details["graph"] == "optimum"
    assert "GroupQueryAttention" not in _op_types(info.path)
    assert info.manifest["verification"]["greedy_match"] == 32
    prompt = [5, 17, 33, 100, 7, 250, 31, 64]
    assert greedy_genai(info.path, prompt, 24) == greedy_transformers(
        _reference(checkpoint), prompt, 24
    )


def test_the_builder_backend_refuses_an_encoder_before_any_work(minilm_dir, library):
    with pytest.raises(InvalidRequest, match="backend 'builder'.*use backend 'optimum'"):
        convert(minilm_dir, "emb", precision="fp32", backend="builder", library=library,
                progress=False)  # fmt: skip
    assert library.list() == []


def test_auto_falls_back_to_optimum_for_a_head_size_the_builders_graph_cannot_run(
    tmp_path, library, caplog
):
    # open_llama_3b's head size is 100: onnxruntime's CPU GroupQueryAttention refuses it
    # ("head_size must be a multiple of 8"); this llama's is 20 (hidden 60, 3 heads)
    checkpoint = build_checkpoint("llama", tmp_path / "head20", hidden_size=60,
                                  num_attention_heads=3, num_key_value_heads=3)  # fmt: skip
    with pytest.raises(InvalidRequest, match="head size 20 is not a multiple of 16") as info:
        convert(checkpoint, "built", precision="fp32", backend="builder", library=library,
                progress=False)  # fmt: skip
    assert info.value.param == "backend" and "use backend 'optimum'" in info.value.message
    assert library.list() == []

    with caplog.at_level(logging.WARNING, logger="ortserve.convert"):
        converted = convert(checkpoint, "auto", precision="fp32", library=library,
                            progress=False)  # fmt: skip
    assert converted.details["graph"] == "optimum"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [
        "backend auto: exporting with optimum, not the model builder: the model builder's "
        "graph cannot run this checkpoint: its head size 20 is not a multiple of 16, which "
        "onnxruntime's CPU GroupQueryAttention needs"
    ]
    prompt = [5, 17, 33, 100, 7, 250, 31, 64]
    assert greedy_genai(converted.path, prompt, 16) == greedy_transformers(
        _reference(checkpoint), prompt, 16
    )


def test_fp16_for_the_cpu_with_qk_norm(tiny_checkpoint, library):
    # qwen3's Q/K norms: the builder fuses them into GroupQueryAttention only for GPUs
    info = convert(tiny_checkpoint("qwen3"), "q3", precision="fp16", library=library,
                   progress=False)  # fmt: skip
    figures = info.manifest["verification"]
    assert figures["top1_agreement"] >= 0.95 and figures["logits_cosine"] >= 0.999
    genai = json.loads((info.path / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == []


@pytest.mark.parametrize("architecture", ["mistral", "gemma2"])
def test_a_sliding_window_shorter_than_the_prompt(architecture, tmp_path, library):
    # 48 teacher-forced tokens and 8 + 32 generated ones against a window of 16
    checkpoint = build_checkpoint(architecture, tmp_path / architecture, sliding_window=16)
    info = convert(checkpoint, "windowed", precision="fp32", library=library, progress=False)
    assert info.details["graph"] == "builder"
    figures = verify_decoder(checkpoint, info.path, new_tokens=40)
    assert figures["greedy_match"] == 40 and figures["logits_cosine"] >= 0.9999


# ---- LoRA on the builder's fused projections --------------------------------------------------


def _peft_adapter(checkpoint, out, modules: dict[str, tuple[str, int, int]], rank: int = 4):
    """PEFT files adapting `modules` ({name: (block, in, out)}) of every layer, non-zero B."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (block, n_in, n_out) in modules.items():
            key = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * 0.3
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": list(modules)}
    ))  # fmt: skip
    return out


def test_lora_on_packed_phi3_modules_matches_the_merged_reference(tiny_checkpoint, library,
                                                                   tmp_path):  # fmt: skip
    from converters import adapter as lora
    from tests.support import lora as helpers

    checkpoint = tiny_checkpoint("phi3")
    base = convert(checkpoint, "phi", precision="fp32", library=library, progress=False).path
    adapted = tmp_path / "adapted"
    shutil.copytree(base, adapted)
    targets = lora.add_lora_inputs(base / "model.onnx", adapted / "model.onnx")
    # one module per projection, whatever the fusion: q k v o gate up down, 2 layers
    assert len(targets) == 14
    assert {t.module.rsplit(".", 1)[1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # fmt: skip
    # phi3's PEFT adapters name its packed modules
    config = json.loads((checkpoint / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    qkv = hidden + 2 * config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    peft = _peft_adapter(checkpoint, tmp_path / "peft", {
        "qkv_proj": ("self_attn", hidden, qkv), "gate_up_proj": ("mlp", hidden, 2 * inter)})  # fmt: skip
    adapter_file = tmp_path / "a.onnx_adapter"
    lora.convert_peft_adapter(peft, adapter_file, targets=targets)

    prompt = helpers.PROMPT
    reference = helpers.merged_reference(checkpoint, peft)
    logits, tokens = helpers.genai_run(adapted, prompt, 16, adapter_file)
    assert helpers.cosine(logits, helpers.reference_logits(reference, prompt)) >= 0.999
    assert tokens == helpers.reference_greedy(reference, prompt, 16)
    base_logits, _ = helpers.genai_run(base, prompt, 1)
    assert not np.allclose(logits, base_logits, atol=1e-3)  # the adapter does change the model


def test_the_cli_chooses_the_backend_and_show_names_the_graph(tiny_checkpoint, library):
    from tests.support.cli import assert_one_line_error, ortserve

    checkpoint = str(tiny_checkpoint("llama"))
    ortserve("convert", checkpoint, "--name", "opt", "--precision", "fp32", "--backend",
             "optimum", "--no-verify")  # fmt: skip
    ortserve("convert", checkpoint, "--name", "built", "--precision", "fp32", "--no-verify")
    graphs = {name: ortserve("show", name).stdout for name in ("opt", "built")}
    assert "graph                   optimum" in graphs["opt"]
    assert "graph                   builder" in graphs["built"]
    assert "backend                 optimum" in graphs["opt"]  # the recorded option
    assert_one_line_error(
        ortserve("convert", checkpoint, "--backend", "onnx", check=False), "'onnx' is not one of"
    )


def _engine_tokens(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of prompts submitted together to one og.Engine (one batch)."""
    import onnxruntime_genai as og

    engine = og.Engine(model)
    buffer = engine.create_event_buffer(256)
    requests = []
    for prompt in prompts:
        request = engine.create_request()
        turn = og.TurnOptions(request)
        turn.set_max_generated_tokens(new_tokens)
        turn.set_min_generated_tokens(new_tokens)
        request.begin_turn(np.asarray(prompt, dtype=np.int32), turn)
        requests.append(request)
    tokens: list[list[int]] = [[] for _ in prompts]
    while engine.has_pending_requests():
        for event in engine.run(buffer):
            if int(event.flags) & int(og.EngineEventFlags.TOKEN):
                tokens[requests.index(event.request)].append(int(event.token))
    return tokens


def test_prompts_of_mixed_lengths_batch_exactly(tiny_checkpoint, library):
    # the builder's graph has no position_ids for og to pad: each row of a batch computes
    # what it computes alone (an optimum graph's padded rows diverge)
    import onnxruntime_genai as og

    info = convert(tiny_checkpoint("llama"), "mixed", precision="fp32", verify=False,
                   library=library, progress=False)  # fmt: skip
    model = og.Model(str(info.path))
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(5, 500, n)] for n in (17, 40, 95, 230)]
    batched = _engine_tokens(model, prompts, 24)
    assert batched == [_engine_tokens(model, [prompt], 24)[0] for prompt in prompts]
    assert all(len(tokens) == 24 for tokens in batched)
