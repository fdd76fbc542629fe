"""`ortserve create` and /api/create: a new library model from a base and a ModelSpec.

The base is a library model, a bundle directory, a checkpoint directory (converted), or files
uploaded as blobs. A model made from a library model or from a library bundle shares that
bundle: no weights are copied. Every check that needs no heavy work runs in prepare_create,
so the API can answer 400/404 before it starts streaming; CreatePlan.run does the rest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ortserve.errors import InvalidName, InvalidRequest, ModelNotFound, NotSupportedYet
from ortserve.library import bundle as bundles
from ortserve.library.modelfile import ModelfileError, ModelSpec, check_parameters
from ortserve.library.names import ModelName
from ortserve.library.store import INDEX_FILE, Library, ModelInfo

Progress = Callable[[str], None]
# Fields a Modelfile sets; the rest of a manifest describes the bundle.
MODEL_FIELDS = ("template", "system", "parameters", "messages", "license", "adapters", "draft")
# Fields Library.save writes itself: never inherited from the base.
_RECORD_FIELDS = ("name", "size", "created", "modified", "schema_version", "bundle")
QUANTIZE = {"int4": "int4", "int8": "int8", "q4_k_m": "int4", "q4_k_s": "int4", "q4_0": "int4",
            "q4_1": "int4", "q8_0": "int8"}  # fmt: skip
_UNQUANTIZED = ("fp32", "fp16")
_NEEDS_CONVERT = "converting a checkpoint needs the converter: pip install 'ortserve[convert]'"
_SAMPLE_CHAT = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "Tell me a story."},
]


@dataclass
class Base:
    """Where the new model's bundle comes from."""

    kind: str  # "model", "bundle" (in the library), "bundle_dir", "checkpoint", "files"
    info: ModelInfo | None = None
    path: Path | None = None
    digest: str | None = None
    files: dict[str, str] | None = None


@dataclass
class CreatePlan:
    """A checked create request; run() converts, quantizes or links, then names the model."""

    library: Library
    name: ModelName
    spec: ModelSpec
    quantize: str | None
    base: Base

    def run(self, progress: Progress | None = None) -> ModelInfo:
        """Make the model (the name is replaced if it exists); report status lines."""
        report = progress or (lambda _status: None)
        base = _realise(self, report)
        check_draft(self.library, self.spec, base.path)  # the bundle's tokenizer, now at hand
        manifest = merge(base.manifest, self.spec)
        if self.spec.adapters:
            manifest.update(_attach(self.library, base, self.spec, report))
        report("writing manifest")
        info = self.library.save(self.name, manifest)
        report("success")
        return info


def create_model(
    library: Library,
    name: str,
    spec: ModelSpec,
    *,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> ModelInfo:
    """Create (or replace) model `name` from `spec`; see CreatePlan."""
    return prepare_create(library, name, spec, quantize=quantize).run(progress)


def prepare_create(
    library: Library, name: str, spec: ModelSpec, *, quantize: str | None = None
) -> CreatePlan:
    """Every cheap check of a create: name, quantize, template, parameters, base, blobs."""
    model_name = ModelName.parse(name)
    precision = quantize_precision(quantize)
    check_template(spec)
    spec.parameters = check_parameters(spec.parameters)
    base = locate_base(library, spec)
    _check_quantize(library, base, precision)
    check_draft(library, spec, base.info.path if base.info else base.path)
    return CreatePlan(library, model_name, spec, precision, base)


def quantize_precision(quantize: str | None) -> str | None:
    """int4/int8, or Ollama's q4_K_M, q4_0 (-> int4) and q8_0 (-> int8)."""
    if quantize is None:
        return None
    precision = QUANTIZE.get(str(quantize).lower())
    if precision is None:
        raise InvalidRequest(
            f'quantize: "{quantize}" is not one of int4, int8, q4_K_M, q4_0, q8_0',
            param="quantize",
        )
    return precision


def check_template(spec: ModelSpec) -> None:
    """A TEMPLATE must be a Jinja chat template that renders a sample conversation.

    It renders within the sandbox's default limits (output size, loop iterations, time), as
    every request's render is bounded: one that breaks them is refused here, naming the limit.
    """
    if not spec.template:
        return
    from ortserve.engine.prompts import ChatTemplate
    from ortserve.engine.sandbox import TemplateLimitExceeded

    try:
        ChatTemplate(spec.template).render(_SAMPLE_CHAT, add_generation_prompt=True)
    except TemplateLimitExceeded as exc:
        raise InvalidRequest(
            f"{spec.where('template')}template: {exc.message}", param="template", code=exc.code
        ) from None
    except InvalidRequest as exc:
        raise InvalidRequest(
            f"{spec.where('template')}template: {exc.message} (TEMPLATE is a Jinja chat "
            "template, as Hugging Face models use, not a Go template)",
            param="template",
        ) from None


def check_draft(library: Library, spec: ModelSpec, bundle: Path | None) -> None:
    """DRAFT must name a library model (a name, never a path) whose graph the continuous
    loop runs and, where the new model's tokenizer.json is at hand in `bundle` (a bundle or
    a checkpoint), with the same tokenizer (engine/draft_model.py)."""
    if not spec.draft:
        return
    from ortserve.engine.continuous import supports
    from ortserve.engine.draft_model import same_tokenizer

    where, name = spec.where("draft"), spec.draft
    try:
        draft = library.get(name)
    except InvalidName as exc:
        raise InvalidRequest(f"{where}draft: {exc.message}", param="draft") from None
    except ModelNotFound:
        raise InvalidRequest(f'{where}draft: no library model named "{name}"',
                             param="draft") from None  # fmt: skip
    if not supports(draft.path):
        raise InvalidRequest(f'{where}draft: "{name}" is not a model builder text decoder, '
                             "which a draft model must be", param="draft")  # fmt: skip
    tokenizer = bundle / "tokenizer.json" if bundle is not None else None
    if tokenizer is not None and tokenizer.is_file() and not same_tokenizer(bundle, draft.path):
        raise InvalidRequest(f'{where}draft: "{name}" has another tokenizer than the model; '
                             "a draft model must share its vocabulary", param="draft")  # fmt: skip


def merge(base: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """The new manifest: the base's, with the spec's values over it."""
    manifest = {k: v for k, v in base.items() if k not in _RECORD_FIELDS or k == "bundle"}
    if spec.template is not None:
        manifest["template"] = spec.template or None
        if "completion" in (manifest.get("capabilities") or []) and spec.template:
            # as bundle.capabilities decides (tools, thinking), from the new template; what
            # the graphs take (vision) stays
            kept = [c for c in manifest["capabilities"] if c in bundles.INPUT_CAPABILITIES]
            manifest["capabilities"] = bundles.template_capabilities(spec.template) + kept
    if spec.system is not None:
        manifest["system"] = spec.system or None
    if spec.license:
        manifest["license"] = "\n".join(spec.license)
    manifest["parameters"] = {**(manifest.get("parameters") or {}), **spec.parameters}
    if spec.messages is not None:
        manifest["messages"] = [dict(m) for m in spec.messages]
    if spec.draft is not None:
        manifest["draft"] = spec.draft or None
    return manifest


# ---- finding the base ------------------------------------------------------------------------


def locate_base(library: Library, spec: ModelSpec) -> Base:
    """The base the spec names, checked to exist (404/400 before any work)."""
    if spec.files:
        for filename, digest in spec.files.items():
            safe_filename(filename, "files")
            if not library.has_blob(digest):
                raise InvalidRequest(
                    f"files: blob {digest} for {filename} is not on the server (upload it "
                    f"with POST /api/blobs/{digest})",
                    param="files",
                )
        return Base("files", files=dict(spec.files))
    if spec.from_path is not None:
        return _path_base(library, spec, spec.from_path)
    if not spec.from_:
        raise InvalidRequest("from is required (or files)", param="from")
    try:
        return Base("model", info=library.get(spec.from_))
    except InvalidName as exc:
        raise InvalidRequest(f"{spec.where('from')}from: {exc.message}", param="from") from None
    except ModelNotFound:
        line = spec.lines.get("from")
        if line:
            raise ModelfileError(
                line, f"FROM {spec.from_}: no library model or path by that name", "from"
            ) from None
        raise


def _path_base(library: Library, spec: ModelSpec, path: Path) -> Base:
    digest = library_digest(library, path)
    if digest is not None:
        return Base("bundle", path=path, digest=digest)
    if is_bundle(path):
        return Base("bundle_dir", path=path)
    if is_checkpoint(path):
        return Base("checkpoint", path=path)
    raise InvalidRequest(
        f"{spec.where('from')}FROM {path}: not an ONNX GenAI bundle (genai_config.json) or a "
        "Hugging Face checkpoint (config.json and *.safetensors)",
        param="from",
    )


def library_digest(library: Library, path: Path) -> str | None:
    """The digest of a bundle directory inside `library` (reused, never copied)."""
    path = path.resolve()
    inside = path.parent == library.bundles_dir.resolve() and path.name.startswith("sha256-")
    return path.name if inside and (path / INDEX_FILE).is_file() else None


def _checkpoint_names(files: dict[str, str]) -> bool:
    return "config.json" in files and any(
        "/" not in name and name.endswith(".safetensors") for name in files
    )


def is_bundle(path: Path) -> bool:
    try:
        bundles.bundle_kind(path)
    except ValueError:
        return False
    return True


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def safe_filename(name: str, param: str) -> PurePosixPath:
    """An uploaded file's name, refused if it could land outside its directory."""
    path = PurePosixPath(name)
    if (not name or "\\" in name or "\0" in name or path.is_absolute() or ":" in path.parts[0]
            or any(p in ("..", ".", "") for p in name.split("/"))):  # fmt: skip
        raise InvalidRequest(f"{param}: invalid file name {name!r}", param=param)
    return path


def _check_quantize(library: Library, base: Base, precision: str | None) -> None:
    """quantize re-quantizes an fp32/fp16 generation bundle; a quantized one is refused."""
    if precision is None or base.kind == "checkpoint":
        return  # a checkpoint is converted at that precision
    if base.kind == "files":
        if not _checkpoint_names(base.files or {}):
            raise InvalidRequest(
                "quantize: uploaded files are quantized only when they are a checkpoint "
                "(config.json and *.safetensors) that is converted",
                param="quantize",
            )
        return
    manifest = base.info.manifest if base.info else _bundle_fields(library, base)
    current = (manifest.get("details") or {}).get("quantization")
    path = base.info.path if base.info else base.path
    if "completion" not in (manifest.get("capabilities") or bundles.capabilities(path)):
        raise InvalidRequest("quantize: only generation models can be quantized", param="quantize")
    if current not in _UNQUANTIZED:
        what = f"already quantized ({current})" if current else "of an unknown precision"
        raise InvalidRequest(
            f"quantize: the base model is {what}; quantize needs an fp32 or fp16 model",
            param="quantize",
        )


# ---- making the bundle -----------------------------------------------------------------------


def _realise(plan: CreatePlan, report: Progress) -> ModelInfo:
    """The base as a ModelInfo whose bundle is in the library (converted, quantized, linked)."""
    library, base = plan.library, plan.base
    if base.kind == "model":
        info = base.info
        manifest = dict(info.manifest)
    elif base.kind == "bundle":
        manifest = {**_bundle_fields(library, base), "bundle": base.digest}
        info = ModelInfo(str(base.path), library.bundle_path(base.digest), manifest)
    elif base.kind == "bundle_dir":
        info = _add_bundle_dir(library, base.path, report)
        manifest = info.manifest
    elif base.kind == "checkpoint":
        info = _convert(library, base.path, plan, report)
        manifest = info.manifest
    else:
        info = _from_files(plan, report)
        manifest = info.manifest
    info = ModelInfo(info.name, info.path, manifest)
    if plan.quantize and base.kind in ("model", "bundle", "bundle_dir"):
        return _requantize(library, info, plan.quantize, report)
    if base.kind in ("model", "bundle"):
        report(f"using existing layer {_layer(manifest['bundle'])}")
    return info


def _bundle_fields(library: Library, base: Base) -> dict[str, Any]:
    """A library bundle's own description (from a model using it) and its files' defaults."""
    users = [m for m in library.list() if m.digest == base.digest]
    fields = described(base.path)
    if users:
        fields.update({k: v for k, v in users[0].manifest.items() if k not in MODEL_FIELDS})
    return {k: v for k, v in fields.items() if k not in _RECORD_FIELDS}


def described(bundle: Path, source: str | None = None) -> dict[str, Any]:
    """A manifest for a bundle known only by its files."""
    manifest: dict[str, Any] = {
        "details": bundles.describe(bundle),
        "capabilities": bundles.capabilities(bundle),
        "template": bundles.chat_template(bundle),
        "parameters": {},
        "system": None,
        "license": bundles.license_text(bundle),
        "messages": [],
        "adapters": [],
    }
    if source is not None:
        manifest["source"] = {"source": source}
    return manifest


def _add_bundle_dir(library: Library, path: Path, report: Progress) -> ModelInfo:
    """Copy an outside bundle directory into the library (atomically, by digest)."""
    report(f"copying bundle {path}")
    with library.staging("create") as staged:
        bundle = staged / "bundle"
        shutil.copytree(path, bundle, ignore=shutil.ignore_patterns(INDEX_FILE))
        digest = library.add_bundle(bundle)
    report(f"creating new layer {_layer(digest)}")
    bundle_dir = library.bundle_path(digest)
    return ModelInfo(str(path), bundle_dir, {**described(bundle_dir, str(path)), "bundle": digest})


def _from_files(plan: CreatePlan, report: Progress) -> ModelInfo:
    """Uploaded files assembled in staging: a bundle is added, a checkpoint converted."""
    library = plan.library
    with library.staging("create") as staged:
        folder = staged / "files"
        for filename, digest in plan.spec.files.items():
            target = folder / safe_filename(filename, "files")
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(library.blob_path(digest), target)
        if is_checkpoint(folder):
            return _convert(library, folder, plan, report)
        if not is_bundle(folder):
            raise InvalidRequest(
                "files: neither an ONNX GenAI bundle (genai_config.json) nor a Hugging Face "
                "checkpoint (config.json and *.safetensors)",
                param="files",
            )
        digest = library.add_bundle(folder)  # already staged: moved, not copied again
    report(f"creating new layer {_layer(digest)}")
    bundle = library.bundle_path(digest)
    return ModelInfo("upload", bundle, {**described(bundle, "upload"), "bundle": digest})


def _convert(library: Library, path: Path, plan: CreatePlan, report: Progress) -> ModelInfo:
    """Convert a checkpoint (int4 unless quantize says otherwise) under the new name."""
    try:
        from converters import convert
    except ImportError as exc:
        raise InvalidRequest(f"{_NEEDS_CONVERT} ({exc})", param="from") from None
    precision = plan.quantize or "int4"
    report(f"converting model ({precision})")
    try:
        info = convert(path, plan.name.display, precision, library=library, progress=False)
    except ModuleNotFoundError as exc:  # torch or transformers missing (raised in the child)
        raise InvalidRequest(f"{_NEEDS_CONVERT} ({exc})", param="from") from None
    report(f"creating new layer {_layer(info.digest)}")
    return info


def _requantize(library: Library, info: ModelInfo, precision: str, report: Progress) -> ModelInfo:
    """A new bundle: the base's files with its model re-quantized to `precision`."""
    from converters.isolated import run_isolated
    from converters.quantize import apply_precision

    current = info.details.get("quantization")
    report(f"quantizing {current} model to {precision}")
    model_file = _model_filename(info.path)
    with library.staging("quantize") as staged:
        bundle = staged / "bundle"
        shutil.copytree(info.path, bundle, ignore=shutil.ignore_patterns(
            INDEX_FILE, f"{model_file}*"))  # fmt: skip
        run_isolated("quantize", apply_precision, info.path / model_file, bundle / model_file,
                     precision, kind="decoder")  # fmt: skip
        digest = library.add_bundle(bundle)
    report(f"creating new layer {_layer(digest)}")
    manifest = {**info.manifest, "bundle": digest, "verification": {}}
    manifest["details"] = {**info.details, "quantization": precision}
    source = manifest.get("source") or {}
    if isinstance(source.get("options"), dict):
        manifest["source"] = {**source, "options": {**source["options"], "precision": precision}}
    return ModelInfo(info.name, library.bundle_path(digest), manifest)


def _model_filename(bundle: Path) -> str:
    return bundles.decoder_config(bundle).get("filename", "model.onnx")


def _attach(library: Library, base: ModelInfo, spec: ModelSpec, report: Progress) -> dict:
    """Manifest fields for the spec's LoRA adapters (ortserve/models/adapters.py)."""
    try:
        from ortserve.models.adapters import attach_adapters
    except ImportError:
        raise NotSupportedYet(
            f"{spec.where('adapters')}ADAPTER is not supported by this build", param="adapters"
        ) from None
    report("attaching adapters")
    return attach_adapters(library, base, list(spec.adapters))


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows one (blobs are immutable), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _layer(digest: str) -> str:
    return digest.replace("sha256-", "sha256:", 1)
