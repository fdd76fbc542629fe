"""LoRA adapters on library models: an adapted bundle beside the base, adapters as blobs.

A model with adapters points at a bundle whose graph has LoRA inputs (converters/adapter.py
adds them) and lists its adapters as blobs: `adapters: [{"name", "digest"}]`, each an
.onnx_adapter file that the engine loads with og.Adapters and activates. The adapted
bundle shares the base's weights: its external-data files are hard links to the base
bundle's (same inode, no extra disk), and only the rewritten graph is new. Its content
depends only on the base, so every adapter attached to one base shares one adapted bundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ortserve.errors import InvalidRequest
from ortserve.library import bundle as bundles
from ortserve.library.store import INDEX_FILE, Library, ModelInfo

log = logging.getLogger("ortserve.library")
ADAPTER_SUFFIX = ".onnx_adapter"
PEFT_CONFIG = "adapter_config.json"
_ONNX_ADAPTER_MAGIC = b"TORT"  # the flatbuffer file identifier of ONNX Runtime adapters


@dataclass
class AdapterSource:
    """One adapter to attach: an .onnx_adapter file, or a PEFT config + safetensors pair."""

    name: str
    onnx_adapter: Path | None = None
    peft_config: Path | None = None
    peft_weights: Path | None = None
    files: list[str] = field(default_factory=list)  # as given, for error messages


def attach_adapters(library: Library, base: ModelInfo, sources: list[tuple[str, Path]]) -> dict:
    """Manifest fields ({"bundle": digest, "adapters": [...]}) for `base` with these LoRA
    adapters; sources are (filename, path): `.onnx_adapter` files, or a PEFT adapter
    directory (adapter_config.json + adapter_model.safetensors), or those two files given
    separately (the /api/create form uploads files as blobs)."""
    tools = _converter()
    _require_decoder(base)
    wanted = group_sources(sources)
    existing = [dict(r) for r in base.manifest.get("adapters") or []]
    graph = _graph_file(base.path)
    with library.staging("adapter") as staged:
        bundle = staged / "bundle"
        targets = tools.lora_targets(base.path / graph)  # a base adapted before has them
        if not targets:
            targets = _stage_adapted_bundle(tools, base.path, bundle, graph)
        have = {r.get("digest") for r in existing}
        files = [_prepare(tools, source, staged, targets) for source in wanted]
        # one already on the base (FROM an adapted model, ADAPTER its own blob) is kept once
        files = [f for f in files if "sha256:" + _sha256(f[1]) not in have]
        _check_disjoint(library, existing, files)
        digest = library.add_bundle(bundle) if bundle.is_dir() else base.digest
        records = existing + [_store(library, name, path) for name, path, _ in files]
    _unique_names(records)
    return {"bundle": digest, "adapters": records}


def group_sources(sources: list[tuple[str, Path]]) -> list[AdapterSource]:
    """Sort (filename, path) pairs into adapters; files that are neither part are skipped."""
    groups: dict[str, AdapterSource] = {}
    singles: list[AdapterSource] = []
    for filename, path in _expand(sources):
        name = PurePosixPath(filename).name
        if name.endswith(ADAPTER_SUFFIX) or _is_onnx_adapter(path):
            stem = name[: -len(ADAPTER_SUFFIX)] if name.endswith(ADAPTER_SUFFIX) else name
            singles.append(AdapterSource(stem or "adapter", onnx_adapter=path, files=[filename]))
            continue
        if name == "adapter_model.bin":
            raise InvalidRequest(
                f"{filename}: pickled PEFT weights are not loaded; save the adapter with "
                "safe_serialization=True (adapter_model.safetensors)",
                param="adapters",
            )
        if name != PEFT_CONFIG and not name.endswith(".safetensors"):
            log.debug("ADAPTER: ignoring %s (neither adapter weights nor config)", filename)
            continue
        key, label = _group_key(filename, path)
        group = groups.setdefault(key, AdapterSource(label))
        group.files.append(filename)
        slot = "peft_config" if name == PEFT_CONFIG else "peft_weights"
        if getattr(group, slot) is not None:
            raise InvalidRequest(f"adapter {label!r} has two {name.split('.')[-1]} files: "
                                 f"{', '.join(group.files)}", param="adapters")  # fmt: skip
        setattr(group, slot, path)
    for group in groups.values():
        _check_pair(group)
    found = singles + list(groups.values())
    if not found:
        given = ", ".join(f for f, _ in sources) or "nothing"
        raise InvalidRequest(
            f"no LoRA adapter in {given}: expected an {ADAPTER_SUFFIX} file or a PEFT adapter "
            f"({PEFT_CONFIG} + adapter_model.safetensors)",
            param="adapters",
        )
    return found


# ---- internals ---------------------------------------------------------------------------------


def _converter():
    try:
        from converters import adapter
    except ImportError as exc:  # onnx is part of the convert extra
        raise InvalidRequest(
            f"ADAPTER needs the converter's packages ({exc.name} is missing): "
            "pip install 'ortserve[convert]'",
            param="adapters",
        ) from exc
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise InvalidRequest(
            "ADAPTER needs the onnx package: pip install 'ortserve[convert]'", param="adapters"
        ) from exc
    return adapter


def _require_decoder(base: ModelInfo) -> None:
    if "completion" not in base.capabilities or not bundles.is_genai(base.path):
        raise InvalidRequest(f"{base.name} is not a generation model: it cannot take an adapter",
                             param="adapters")  # fmt: skip


def _graph_file(bundle: Path) -> str:
    return bundles.decoder_config(bundle)["filename"]


def _stage_adapted_bundle(tools, base: Path, bundle: Path, graph: str) -> list:
    """The base's files hard-linked into `bundle`, its graph rewritten with LoRA inputs."""
    bundle.mkdir()
    copied = []
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = path.relative_to(base)
        if rel.as_posix() in (graph, INDEX_FILE):
            continue
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        if not _link(path, bundle / rel):
            copied.append(rel.as_posix())
    if copied:
        log.warning("could not hard-link %s from the base bundle: copied instead (more disk)",
                    ", ".join(copied))  # fmt: skip
    targets = tools.add_lora_inputs(base / graph, bundle / graph)
    if not tools.external_data_files(base / graph):
        log.warning("the base graph keeps its weights inside %s: the adapted bundle holds a "
                    "copy of them", graph)  # fmt: skip
    return targets


def _link(src: Path, dst: Path) -> bool:
    """Hard-link src to dst (bundles are immutable, so sharing an inode is safe); else copy."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def _prepare(tools, source: AdapterSource, staged: Path, targets) -> tuple[str, Path, set]:
    """The adapter as a checked .onnx_adapter file in staging; with its tensor names."""
    out = staged / f"{len(list(staged.glob('*' + ADAPTER_SUFFIX)))}{ADAPTER_SUFFIX}"
    if source.onnx_adapter is not None:
        shapes = tools.check_onnx_adapter(source.onnx_adapter, targets)
        shutil.copyfile(source.onnx_adapter, out)
    else:
        shapes = tools.convert_peft_adapter(
            None, out, targets=targets,
            config_file=source.peft_config, weights_file=source.peft_weights,
        )  # fmt: skip
    return source.name, out, set(shapes)


def _check_disjoint(library: Library, existing: list, files: list) -> None:
    """Adapters feed graph inputs by name: two that adapt the same weight cannot both run."""
    tools = _converter()
    seen: dict[str, str] = {}
    named = [(r.get("name", "adapter"), set(tools.read_onnx_adapter(library.blob_path(r["digest"]))))
             for r in existing if isinstance(r, dict) and r.get("digest")]  # fmt: skip
    for name, _, tensors in files:
        named.append((name, tensors))
    for name, tensors in named:
        for tensor in sorted(tensors):
            if tensor in seen:
                raise InvalidRequest(
                    f"adapters {seen[tensor]!r} and {name!r} both adapt "
                    f"{tensor.rsplit('.lora_', 1)[0]}: one adapter per weight can be active",
                    param="adapters",
                )
            seen[tensor] = name


def _store(library: Library, name: str, path: Path) -> dict[str, Any]:
    digest = "sha256:" + _sha256(path)
    if not library.has_blob(digest):
        with open(path, "rb") as stream:
            library.add_blob(stream, digest)
    return {"name": name, "digest": digest}


def _unique_names(records: list[dict]) -> None:
    """og.Adapters names them: a repeated name gets a -2, -3, ... suffix."""
    seen: set[str] = set()
    for record in records:
        base, n = record["name"], 1
        while record["name"] in seen:
            n += 1
            record["name"] = f"{base}-{n}"
        seen.add(record["name"])


def _expand(sources: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """A directory given as a source stands for every file in it."""
    files = []
    for filename, path in sources:
        path = Path(path)
        if path.is_dir():
            files += [(f"{filename}/{p.relative_to(path).as_posix()}", p)
                      for p in sorted(path.rglob("*")) if p.is_file()]  # fmt: skip
        elif path.is_file():
            files.append((filename, path))
        else:
            raise InvalidRequest(f"adapter file {filename} not found", param="adapters")
    return files


def _group_key(filename: str, path: Path) -> tuple[str, str]:
    """Files of one PEFT adapter: same folder on disk, or (blobs) same folder in the name."""
    folder = PurePosixPath(filename).parent.as_posix()
    label = PurePosixPath(folder).name if folder != "." else ""
    if path.name == PurePosixPath(filename).name:  # a real file under its own name
        return str(path.parent), label or path.parent.name or "adapter"
    return "upload:" + folder, label or "adapter"


def _check_pair(group: AdapterSource) -> None:
    if group.peft_config is None:
        raise InvalidRequest(f"{', '.join(group.files)}: adapter weights without "
                             f"{PEFT_CONFIG}", param="adapters")  # fmt: skip
    if group.peft_weights is None:
        raise InvalidRequest(f"{', '.join(group.files)}: {PEFT_CONFIG} without "
                             "adapter_model.safetensors", param="adapters")  # fmt: skip


def _is_onnx_adapter(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8)[4:8] == _ONNX_ADAPTER_MAGIC


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
