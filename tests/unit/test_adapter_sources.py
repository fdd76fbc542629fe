"""Which files make which adapter: the shapes ADAPTER lines and /api/create uploads arrive in."""

from __future__ import annotations

import numpy as np
import pytest

from converters.adapter import write_onnx_adapter
from ortserve.errors import InvalidRequest
from ortserve.models.adapters import group_sources


def peft_files(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("model card")
    return folder


def test_a_directory_is_one_peft_adapter_named_as_given(tmp_path):
    folder = peft_files(tmp_path / "on-disk")
    (found,) = group_sources([("my-lora", folder)])
    assert found.name == "my-lora"
    assert found.peft_config == folder / "adapter_config.json"
    assert found.peft_weights == folder / "adapter_model.safetensors"


def test_modelfile_form_two_directories_flattened(tmp_path):
    """The Modelfile parser lists each ADAPTER directory's files by their relative names."""
    a, b = peft_files(tmp_path / "style"), peft_files(tmp_path / "facts")
    sources = [(p.name, p) for folder in (a, b) for p in sorted(folder.iterdir())]
    found = group_sources(sources)
    assert sorted(f.name for f in found) == ["facts", "style"]
    assert {f.peft_config.parent for f in found} == {a, b}


def test_uploaded_blobs_pair_by_filename(tmp_path):
    """/api/create: {filename: digest}; the files are blobs named by digest."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "sha256-aa").write_text('{"r": 4, "lora_alpha": 8}')
    (blobs / "sha256-bb").write_bytes(b"weights")
    (found,) = group_sources([("adapter_config.json", blobs / "sha256-aa"),
                              ("adapter_model.safetensors", blobs / "sha256-bb")])  # fmt: skip
    assert found.peft_config == blobs / "sha256-aa"
    assert found.peft_weights == blobs / "sha256-bb"


def test_onnx_adapters_by_suffix_or_by_content(tmp_path):
    params = {"model.layers.0.attn.q_proj.lora_A.MatMul.weight": np.ones((2, 1), np.float32)}
    write_onnx_adapter(params, tmp_path / "style.onnx_adapter")
    (tmp_path / "sha256-cc").write_bytes((tmp_path / "style.onnx_adapter").read_bytes())
    found = group_sources([("style.onnx_adapter", tmp_path / "style.onnx_adapter"),
                           ("sha256-cc", tmp_path / "sha256-cc")])  # fmt: skip
    assert [(f.name, f.onnx_adapter.name) for f in found] == [
        ("style", "style.onnx_adapter"),
        ("sha256-cc", "sha256-cc"),
    ]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"README.md": b"x"}, "no LoRA adapter in README.md"),
        ({"adapter_model.safetensors": b"x"}, "adapter weights without adapter_config.json"),
        ({"adapter_config.json": b"{}"}, "adapter_config.json without adapter_model.safetensors"),
        ({"adapter_model.bin": b"x"}, "pickled PEFT weights"),
    ],
)
def test_incomplete_or_unsupported_sources(tmp_path, files, message):
    sources = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        sources.append((name, tmp_path / name))
    with pytest.raises(InvalidRequest, match=message):
        group_sources(sources)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidRequest, match="adapter file gone.onnx_adapter not found"):
        group_sources([("gone.onnx_adapter", tmp_path / "gone.onnx_adapter")])
