"""Pull models into the library: ONNX GenAI bundles from the Hugging Face Hub as they are,
plain checkpoints through the converter, or the same from a local directory.

A reference is `[hf.co/]ORG/REPO[:VARIANT][@REVISION]`, a directory, or a short name from the
catalog (`llama3.2`, `qwen2.5:0.5b`: models/catalog.py), which names the repository, and the
variant for this machine's execution provider or the checkpoint to convert. Downloads go through
huggingface-hub (its cache, resumed `.incomplete` files, HF_TOKEN, HF_ENDPOINT,
HF_HUB_OFFLINE); nothing reaches the library until every file is there and verified, and
then it arrives in one rename (`Library.add`). Pulls of one repository take turns through a
file lock, so a second pull of the same model waits and then finds it in place. A variant
that `ortserve push` wrote (its `ortserve-manifest.json`: models/pushed.py) is pulled as
exactly the files that file lists, with its parameters, template, system, messages, adapters
and licence: the same model as the one pushed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortserve.errors import (
    ConverterMissing,
    InvalidRequest,
    PullCancelled,
    RepoNotFound,
    SourceUnavailable,
    UnsupportedModel,
)
from ortserve.hub import CHECKPOINT_PATTERNS, endpoint, hub_errors
from ortserve.library import bundle as bundles
from ortserve.library.names import REPO_ID, ModelName, bare_name
from ortserve.library.store import INDEX_FILE, Library, ModelInfo, blob_hex, file_sha256

HF_HOST = "hf.co"
CONVERT_EXTRA = "pip install 'ortserve[convert]'"
# Metadata calls: give up on a silent network fast, let a slow hub answer.
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0
_POLL_S = 0.25

_REF = re.compile(
    r"^(?P<repo>[^:@]+)(?::(?P<v1>[^:@/]+))?(?:@(?P<rev>[^:@]+))?(?::(?P<v2>[^:@/]+))?$"
)
# Words in a variant's folder name that say which execution provider it was built for.
_PROVIDER_WORDS = {
    "cpu": "cpu",
    "mobile": "cpu",
    "cuda": "cuda",
    "gpu": "cuda",
    "directml": "dml",
    "dml": "dml",
    "webgpu": "webgpu",
    "coreml": "coreml",
}
_PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")


# ---- references --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullRef:
    """What to pull: a Hugging Face repository (with variant and revision) or a directory."""

    repo: str | None
    variant: str | None = None
    revision: str | None = None
    local: Path | None = None
    text: str = ""
    prefixed: bool = False  # typed with hf.co/ (or huggingface.co/)
    catalog: ModelName | None = None  # a short name: the catalog says which repo (resolve())
    entry: str | None = None  # the catalog entry it resolved to (`llama3.2:3b`)

    @classmethod
    def parse(cls, text: str, *, local: bool = True) -> PullRef:
        """`[hf.co/]ORG/REPO[:VARIANT][@REVISION]`, a catalog name `model[:tag]`, or (with
        `local`) a directory[:VARIANT] (before a catalog name of the same spelling).

        `local=False` for a remote client: the server's disk is never looked at, so the
        answer cannot tell the client which server paths exist.
        """
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("model reference is empty", param="model")
        text = text.strip()
        directory = _local_ref(text) if local else None
        if directory is not None:
            return directory
        short = bare_name(text)
        if short is not None:
            return cls(None, text=text, catalog=short)
        match = _REF.match(text)
        if not match or (match["v1"] and match["v2"]):
            raise _bad_ref(text, local)
        repo = match["repo"].removeprefix(f"{HF_HOST}/").removeprefix("huggingface.co/")
        if not REPO_ID.match(repo) or ".." in repo:
            raise _bad_ref(text, local)
        variant = match["v1"] or match["v2"]
        return cls(repo, variant, match["rev"], None, text, repo != match["repo"])

    @property
    def source(self) -> str:
        """How the manifest records where the model came from (a short name as typed until
        resolve() names its repository)."""
        if self.local is not None:
            return str(self.local)
        return f"{HF_HOST}/{self.repo}" if self.repo else self.text

    def default_name(self) -> str:
        """The reference as typed, as Ollama names hf.co pulls: `[hf.co/]org/repo:variant`
        (`:latest` without a variant; no revision); a directory's own name; a catalog name as
        typed (`llama3.2` -> `llama3.2:latest`, as Ollama names library pulls)."""
        if self.catalog is not None:
            return self.catalog.display
        tag = self.variant or "latest"
        if self.local is not None:
            base = re.sub(r"[^a-z0-9_.-]", "-", self.local.name.lower()).strip("-_.")
            return f"{base or 'model'}:{tag}"
        return f"{HF_HOST + '/' if self.prefixed else ''}{self.repo}:{tag}"


def _local_ref(text: str) -> PullRef | None:
    path = Path(text).expanduser()
    if path.is_dir():
        return PullRef(None, None, None, path.resolve(), text)
    head, sep, variant = text.rpartition(":")
    if sep and "/" not in variant and "\\" not in variant and Path(head).expanduser().is_dir():
        return PullRef(None, variant, None, Path(head).expanduser().resolve(), text)
    return None


def _bad_ref(text: str, local: bool = True) -> InvalidRequest:
    where = ("or a local directory" if local else
             "(a directory is pulled with `ortserve pull DIRECTORY` on the server)")  # fmt: skip
    return InvalidRequest(
        f"invalid model reference {text!r}: use a catalog name such as llama3.2 or "
        f"qwen2.5:0.5b, [hf.co/]ORG/REPO[:VARIANT][@REVISION], {where}",
        param="model",
    )


def resolve(
    ref: PullRef, library: Library, precision: str | None = None
) -> tuple[PullRef, str | None]:
    """A catalog name as the repository to pull for this machine, and the precision to convert
    at (the recipe's, unless one is asked for); any other reference as it is."""
    if ref.catalog is None:
        return ref, precision
    from ortserve.models import catalog

    entry = catalog.load(library.root).lookup(ref.catalog)
    choice = catalog.choose(entry, preferred_providers(), convert=precision is not None)
    source = choice.source
    resolved = PullRef(source.repo, source.variant, source.revision, None, ref.text,
                       catalog=ref.catalog, entry=entry.name)  # fmt: skip
    return resolved, precision or source.precision


# ---- progress ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullStatus:
    """One progress report, in the shape of Ollama's pull progress objects."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


ProgressFn = Callable[[PullStatus], None]


# ---- what a repository (or directory) holds -------------------------------------------------------


@dataclass(frozen=True)
class RepoFile:
    """One file of a snapshot, with the hashes the hub publishes for it."""

    path: str
    size: int | None = None
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob id (sha1) of non-LFS files

    @property
    def digest(self) -> str | None:
        if self.sha256:
            return f"sha256:{self.sha256}"
        return f"sha1:{self.blob_id}" if self.blob_id else None

    @property
    def etag(self) -> str | None:
        """The name huggingface-hub gives the file's blob in its cache."""
        return self.sha256 or self.blob_id


@dataclass
class Snapshot:
    """The files of one commit of a repository, or of a local directory."""

    ref: PullRef
    commit: str | None
    files: dict[str, RepoFile] = field(default_factory=dict)

    def variants(self) -> list[str]:
        """Folders holding a genai_config.json ("" for the root), sorted."""
        return sorted(
            {
                posixpath.dirname(p)
                for p in self.files
                if posixpath.basename(p) == bundles.GENAI_CONFIG
            }
        )

    def variant_files(self, variant: str) -> list[RepoFile]:
        """The files of one variant folder, leaving out variants nested below it."""
        others = [v for v in self.variants() if v != variant and _is_below(v, variant)]
        return [
            f
            for path, f in sorted(self.files.items())
            if _is_below(path, variant) and not any(_is_below(path, o) for o in others)
        ]

    def is_checkpoint(self) -> bool:
        names = {posixpath.basename(p) for p in self.files if "/" not in p}
        return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def _is_below(path: str, folder: str) -> bool:
    return folder == "" or path.startswith(folder + "/")


def list_snapshot(ref: PullRef) -> Snapshot:
    """The files of the reference: a directory walked, or a repo listed at its commit."""
    if ref.local is not None:
        files = {
            p.relative_to(ref.local).as_posix(): RepoFile(
                p.relative_to(ref.local).as_posix(), p.stat().st_size
            )
            for p in sorted(ref.local.rglob("*"))
            if p.is_file() and p.name != INDEX_FILE
        }
        return Snapshot(ref, None, files)
    return _list_hub(ref)


def _list_hub(ref: PullRef) -> Snapshot:
    from huggingface_hub import HfApi

    with hub_errors(f"cannot pull {ref.source!r}", revision=ref.revision):
        info = HfApi(endpoint=endpoint()).model_info(
            ref.repo,
            revision=ref.revision,
            files_metadata=True,
            timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),  # type: ignore[arg-type]
        )
    files = {}
    for sibling in info.siblings or []:
        _check_repo_path(ref, sibling.rfilename)
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        size = sibling.lfs.size if sibling.lfs else sibling.size
        blob = None if sibling.lfs else sibling.blob_id
        files[sibling.rfilename] = RepoFile(sibling.rfilename, size, sha256, blob)
    if not info.sha:
        raise SourceUnavailable(f"cannot pull {ref.source!r}: the hub did not say which commit")
    return Snapshot(ref, info.sha, files)


def _check_repo_path(ref: PullRef, path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise SourceUnavailable(f"cannot pull {ref.source!r}: unsafe file name {path!r}")


# ---- variants ----------------------------------------------------------------------------------


def variant_label(variant: str) -> str:
    """A variant's name as a tag: its folder's last part ('' for a bundle at the root)."""
    return posixpath.basename(variant)


def variant_provider(variant: str) -> str | None:
    """The execution provider a variant's folder name says it targets, if it says."""
    for word in re.split(r"[/_\-.]", variant.lower()):
        if word in _PROVIDER_WORDS:
            return _PROVIDER_WORDS[word]
    return None


def variant_precision(variant: str) -> str | None:
    words = set(re.split(r"[/_\-.]", variant.lower()))
    return next((p for p in _PRECISIONS if p in words), None)


def choose_variant(
    variants: list[str],
    requested: str | None,
    providers: list[str],
    target_of: Callable[[str], str],
    *,
    what: str = "cannot pull",
) -> str:
    """The named variant, else the best for the first provider of `providers` that has one."""
    if not variants:
        raise ValueError("no variants")
    if requested and requested.lower() != "latest":
        return _named_variant(variants, requested, what)
    if len(variants) == 1:
        return variants[0]

    def rank(variant: str) -> tuple[int, int, str]:
        target = target_of(variant)
        provider_rank = providers.index(target) if target in providers else len(providers)
        precision = variant_precision(variant)
        precision_rank = _PRECISIONS.index(precision) if precision else len(_PRECISIONS)
        return provider_rank, precision_rank, variant

    best = min(variants, key=rank)
    if rank(best)[0] == len(providers):
        names = ", ".join(variant_label(v) or "(root)" for v in variants)
        raise SourceUnavailable(
            f"{what}: no variant runs on this machine's execution providers ({', '.join(providers)}); "
            f"variants: {names}. Name one as REPO:VARIANT"
        )
    return best


def _named_variant(variants: list[str], requested: str, what: str) -> str:
    wanted = requested.lower()
    for variant in variants:
        if wanted in (variant.lower(), variant_label(variant).lower()):
            return variant
    names = ", ".join(variant_label(v) for v in variants if v) or "none (one bundle at the root)"
    raise RepoNotFound(f"{what}: variant {requested!r} not found; variants: {names}", param="model")


def preferred_providers() -> list[str]:
    """This machine's execution providers, best first (ORTSERVE_PROVIDER first if set)."""
    from ortserve.config import Settings
    from ortserve.engine.providers import load_candidates  # imports onnxruntime_genai

    available = load_candidates("auto")
    wanted = Settings.from_env().provider
    return available if wanted == "auto" else [wanted, *(p for p in available if p != wanted)]


# ---- errors --------------------------------------------------------------------------------------


# ---- pulling -------------------------------------------------------------------------------------


def pull(
    ref: str | PullRef,
    *,
    name: str | None = None,
    library: Library | None = None,
    precision: str | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> ModelInfo:
    """Pull `ref` into the library as `name` (default PullRef.default_name); report progress.

    `precision` is the converter's (default int4), for a checkpoint repository only.
    """
    ref = ref if isinstance(ref, PullRef) else PullRef.parse(ref)
    model_name = ModelName.parse(name or ref.default_name())  # a bad name fails first
    library = library or Library()
    ref, precision = resolve(ref, library, precision)
    job = _Pull(ref, model_name, library, progress or ignore_progress, cancel)
    return job.run(precision)


def ignore_progress(_status: PullStatus) -> None:
    pass


class _Pull:
    """One pull: list, lock, choose, download, verify, add."""

    def __init__(self, ref, name, library, report, cancel):
        self.ref: PullRef = ref
        self.name: ModelName = name
        self.library: Library = library
        self.report: ProgressFn = report
        self.cancel: threading.Event = cancel or threading.Event()

    def run(self, precision: str | None) -> ModelInfo:
        self.report(PullStatus("pulling manifest"))
        snapshot = list_snapshot(self.ref)
        with self._lock():
            if snapshot.variants():
                _refuse_precision(self.ref, precision)
                info = self._pull_bundle(snapshot)
            elif snapshot.is_checkpoint():
                info = self._pull_checkpoint(snapshot, precision or "int4")
            else:
                raise SourceUnavailable(
                    f"{self.ref.source} holds neither an ONNX GenAI bundle (genai_config.json) "
                    "nor a checkpoint (config.json and .safetensors weights)"
                )
        self.report(PullStatus("success"))
        return info

    # -- bundles --

    def _pull_bundle(self, snapshot: Snapshot) -> ModelInfo:
        variant = choose_variant(
            snapshot.variants(),
            self.ref.variant,
            preferred_providers(),
            lambda v: variant_provider(v) or self._target_from_config(snapshot, v),
            what=f"cannot pull {self.ref.source!r}",
        )
        source = {"source": self.ref.source, "revision": snapshot.commit, "variant": variant,
                  **self._catalog()}  # fmt: skip
        current = self._up_to_date(source)
        if current is not None:
            return current
        files = snapshot.variant_files(variant)
        pushed, adapters = self._pushed(snapshot, variant), []
        if pushed is not None:  # `ortserve push` wrote it: exactly its files, and its fields
            files = _pushed_files(self.ref, snapshot, variant, pushed.files)
            adapters = _pushed_files(self.ref, snapshot, variant, _adapter_entries(pushed))
        local = self._fetch(snapshot, files + adapters)
        self._check_cancel()
        self.report(PullStatus("verifying sha256 digest"))
        for file in files + adapters:
            _check_digest(self.ref, file, local[file.path])
        license_ = self._root_license(snapshot) if pushed is None else None
        with self.library.staging("pull") as staged:
            bundle = staged / "bundle"
            _stage(files, local, variant, bundle)
            verify_bundle(bundle, self.ref.source)
            checked = sum(1 for f in files if f.digest)
            manifest = bundle_manifest(bundle, source, license_, checked)
            if pushed is not None:
                manifest.update(pushed.fields)
                for adapter in adapters:
                    _store_blob(self.library, adapter, local[adapter.path])
            self._check_cancel()
            self.report(PullStatus("writing manifest"))
            return self.library.add(self.name, bundle, manifest)

    def _pushed(self, snapshot: Snapshot, variant: str) -> Any:
        """The variant's ortserve manifest file (models/pushed.py), checked; None without one."""
        from ortserve.models import pushed

        file = snapshot.files.get(posixpath.join(variant, pushed.MANIFEST_FILE))
        if file is None:
            return None
        path = self._fetch(snapshot, [file], quiet=True)[file.path]
        _check_digest(self.ref, file, path)
        return pushed.read(path, self.ref.source)

    def _target_from_config(self, snapshot: Snapshot, variant: str) -> str:
        """A variant whose name says nothing: read its genai_config.json's provider options."""
        config = snapshot.files[posixpath.join(variant, bundles.GENAI_CONFIG)]
        path = self._fetch(snapshot, [config], quiet=True)[config.path]
        return bundles.target_provider(path.parent)

    def _root_license(self, snapshot: Snapshot) -> str | None:
        for name in bundles.LICENSE_FILES:
            if name in snapshot.files:
                path = self._fetch(snapshot, [snapshot.files[name]], quiet=True)[name]
                return path.read_text(encoding="utf-8", errors="replace")
        return None

    # -- checkpoints --

    def _pull_checkpoint(self, snapshot: Snapshot, precision: str) -> ModelInfo:
        require_converter(self.ref.source)
        options = {"precision": precision, "block_size": 32, "provider": "cpu"}
        source = {"source": self.ref.source, "revision": snapshot.commit, "options": options,
                  **self._catalog()}  # fmt: skip
        current = self._up_to_date(source)
        if current is not None:
            return current
        self._check_architecture(snapshot)
        from huggingface_hub.utils import filter_repo_objects

        paths = set(filter_repo_objects(snapshot.files, allow_patterns=CHECKPOINT_PATTERNS))
        files = [f for p, f in sorted(snapshot.files.items()) if p in paths]
        local = self._fetch(snapshot, files)
        self.report(PullStatus("verifying sha256 digest"))
        for file in files:
            _check_digest(self.ref, file, local[file.path])
        directory = self.ref.local or _snapshot_dir(local, files)
        self._check_cancel()
        self.report(PullStatus(f"converting ({precision})"))
        return self._convert(directory, precision, source)

    def _check_architecture(self, snapshot: Snapshot) -> None:
        """Refuse an architecture the converter lacks before downloading any weights."""
        from converters.checkpoint import DECODERS, ENCODERS, VISION, supported_architectures

        file = snapshot.files["config.json"]
        path = self._fetch(snapshot, [file], quiet=True)[file.path]
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return  # the converter says what is wrong with it
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type not in DECODERS and model_type not in ENCODERS and model_type not in VISION:
            raise UnsupportedModel(
                f"cannot pull {self.ref.source!r}: the converter does not convert architecture "
                f"{model_type!r}; it converts {', '.join(supported_architectures())}"
            )

    def _convert(self, directory: Path, precision: str, source: dict[str, Any]) -> ModelInfo:
        from converters import convert

        info = convert(directory, str(self.name), precision, library=self.library, progress=False)
        self.report(PullStatus("writing manifest"))
        return self.library.update(info.name, source={**info.manifest["source"], **source})

    # -- shared steps --

    def _catalog(self) -> dict[str, str]:
        """The manifest's record of the catalog entry a short name resolved to."""
        return {"catalog": self.ref.entry} if self.ref.entry else {}

    def _up_to_date(self, source: dict[str, Any]) -> ModelInfo | None:
        """The model already in the library from this very commit (a re-pull, or a pull that
        waited for another): nothing to download."""
        if source["revision"] is None or not self.library.exists(self.name):
            return None
        info = self.library.get(self.name)
        recorded = info.manifest.get("source") or {}
        if any(recorded.get(k) != v for k, v in source.items()) or not info.path.is_dir():
            return None
        self.report(PullStatus("already up to date"))
        return info

    def _fetch(self, snapshot: Snapshot, files: list[RepoFile], quiet=False) -> dict[str, Path]:
        """Local paths of `files`: in the directory, or downloaded into the hub cache."""
        if self.ref.local is not None:
            return {f.path: self.ref.local / f.path for f in files}
        paths = {}
        for file in files:
            self._check_cancel()
            paths[file.path] = self._download(snapshot, file, quiet)
        return paths

    def _download(self, snapshot: Snapshot, file: RepoFile, quiet: bool) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars("huggingface_hub.http_get")  # ours are reported instead
        status = f"downloading {file.path}"
        incomplete = _incomplete_path(self.ref.repo, file)
        report = ignore_progress if quiet else self.report
        report(PullStatus(status, file.digest, file.size, _size(incomplete)))
        watch = _watch(incomplete, lambda n: report(PullStatus(status, file.digest, file.size, n)))
        errors = hub_errors(f"cannot pull {self.ref.source!r}", revision=self.ref.revision)
        with watch, errors:
            path = hf_hub_download(
                self.ref.repo, file.path, revision=snapshot.commit, endpoint=endpoint()
            )
        report(PullStatus(status, file.digest, file.size, file.size))
        return Path(path)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One pull of a repository (or directory) at a time in this library."""
        from filelock import FileLock, Timeout

        key = (str(self.ref.local) if self.ref.local else self.ref.repo or "").lower()
        folder = self.library.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"pull-{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.report(PullStatus(f"waiting for another pull of {self.ref.source}"))
            while not _acquired(lock, _POLL_S):
                self._check_cancel()
        try:
            yield
        finally:
            lock.release()

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PullCancelled(f"pull of {self.ref.source} cancelled")


def _refuse_precision(ref: PullRef, precision: str | None) -> None:
    if precision is not None:
        raise InvalidRequest(
            f"{ref.source} holds ready ONNX GenAI bundles: a precision applies to checkpoints "
            "only; choose a variant as REPO:VARIANT instead",
            param="precision",
        )


def _acquired(lock, timeout: float) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        return False
    return True


def _incomplete_path(repo: str | None, file: RepoFile) -> Path | None:
    """Where huggingface-hub writes `file` while downloading it (named by its etag)."""
    if repo is None or file.etag is None:
        return None
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = repo_folder_name(repo_id=repo, repo_type="model")
    return Path(constants.HF_HUB_CACHE) / folder / "blobs" / f"{file.etag}.incomplete"


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


@contextlib.contextmanager
def _watch(path: Path | None, emit: Callable[[int], None]) -> Iterator[None]:
    """Report the growing size of a partly downloaded file from a side thread."""
    stop = threading.Event()

    def loop() -> None:
        last = _size(path)
        while not stop.wait(_POLL_S):
            size = _size(path)
            if size != last and size:
                emit(size)
                last = size

    thread = threading.Thread(target=loop, name="ortserve-pull-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- verification and staging ------------------------------------------------------------------


def _check_digest(ref: PullRef, file: RepoFile, path: Path) -> None:
    """The file on disk is the one the hub describes (sha256 of LFS files, git blob id else)."""
    if file.sha256:
        actual, expected = file_sha256(path), file.sha256
    elif file.blob_id:
        actual, expected = git_blob_id(path), file.blob_id
    else:
        return
    if actual != expected:
        raise SourceUnavailable(
            f"cannot pull {ref.source!r}: {file.path} does not match its digest on the hub "
            f"(got {actual[:12]}, expected {expected[:12]}); pull again"
        )


def git_blob_id(path: Path) -> str:
    """The git object id of a file: sha1 of `blob <size>\\0` and the content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _adapter_entries(pushed: Any) -> list[dict[str, Any]]:
    """The adapter blobs of a pushed manifest as file entries (their sha256 is their name)."""
    from ortserve.models.pushed import adapter_path

    return [{"path": adapter_path(a["digest"]), "sha256": blob_hex(a["digest"])}
            for a in pushed.adapters]  # fmt: skip


def _pushed_files(
    ref: PullRef, snapshot: Snapshot, variant: str, entries: list[dict[str, Any]]
) -> list[RepoFile]:
    """The listed files of a pushed variant, each with the sha256 the manifest gives it (so
    a file the hub serves as a plain git blob is checked against it too)."""
    files = []
    for entry in entries:
        path = posixpath.join(variant, entry["path"]) if variant else entry["path"]
        found = snapshot.files.get(path)
        if found is None:
            raise SourceUnavailable(f"cannot pull {ref.source!r}: {path}, listed by its "
                                    "ortserve manifest, is not in the repository")  # fmt: skip
        if found.sha256 not in (None, entry["sha256"]):
            raise SourceUnavailable(f"cannot pull {ref.source!r}: {path} on the hub is not the "
                                    "file its ortserve manifest lists")  # fmt: skip
        files.append(RepoFile(path, found.size, entry["sha256"], found.blob_id))
    return files


def _store_blob(library: Library, file: RepoFile, path: Path) -> None:
    """An adapter file as a library blob, named by its digest (checked while copied)."""
    digest = f"sha256:{file.sha256}"
    if not library.has_blob(digest):
        with open(path, "rb") as stream:
            library.add_blob(stream, digest)


def _snapshot_dir(local: dict[str, Path], files: list[RepoFile]) -> Path:
    """The huggingface-hub snapshot folder the downloaded files sit in."""
    first = files[0]
    return local[first.path].parents[len(first.path.split("/")) - 1]


def _stage(files: list[RepoFile], local: dict[str, Path], variant: str, bundle: Path) -> None:
    """Hard-link (else copy) a variant's files into a staging bundle folder."""
    for file in files:
        relative = file.path[len(variant) + 1 :] if variant else file.path
        target = bundle / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        source = Path(os.path.realpath(local[file.path]))  # the cache's blob, not its symlink
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or no hard links: copy
            shutil.copyfile(source, target)


def verify_bundle(bundle: Path, source: str) -> None:
    """A bundle that ORT GenAI can load: its config parses, the files it names exist, the
    tokenizer loads."""
    try:
        config = bundles.genai_config(bundle)
        bundles.describe(bundle)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceUnavailable(f"{source}: genai_config.json is not usable: {exc}") from exc
    for name in sorted(_named_files(config.get("model", {}))):
        if not (bundle / name).is_file():
            raise SourceUnavailable(f"{source}: {name}, named by genai_config.json, is missing")
    _check_tokenizer(bundle, source)


def _named_files(node: Any) -> set[str]:
    """Every `filename` in genai_config.json's model section (decoder, embedding, vision...)."""
    if isinstance(node, dict):
        found = {v for k, v in node.items() if k == "filename" and isinstance(v, str)}
        return found.union(*(_named_files(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_named_files(v) for v in node))
    return set()


def _check_tokenizer(bundle: Path, source: str) -> None:
    if (bundle / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(bundle / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exceptions on a bad file
            raise SourceUnavailable(f"{source}: tokenizer.json does not load: {exc}") from exc
    elif not (bundle / "tokenizer.model").is_file():
        raise SourceUnavailable(f"{source}: the bundle has no tokenizer.json or tokenizer.model")


def bundle_manifest(
    bundle: Path, source: dict[str, Any], license_: str | None, checked: int
) -> dict[str, Any]:
    """The manifest of a downloaded bundle, described from its own files."""
    details = bundles.describe(bundle)
    precision = variant_precision(source.get("variant") or "")
    if precision:
        details["quantization"] = precision
    return {
        "details": details,
        "capabilities": bundles.capabilities(bundle),
        "template": bundles.chat_template(bundle),
        "parameters": search_parameters(bundle),
        "system": None,
        "license": bundles.license_text(bundle) or license_,
        "messages": [],
        "adapters": [],
        "source": source,
        "verification": {"files_checked": checked} if checked else {},
    }


def search_parameters(bundle: Path) -> dict[str, Any]:
    """The bundle's sampling defaults (genai_config.json's search), under Ollama's names."""
    search = bundles.genai_config(bundle).get("search") or {}
    if not search.get("do_sample"):
        return {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "repetition_penalty": "repeat_penalty"}  # fmt: skip
    return {ours: search[theirs] for theirs, ours in names.items() if theirs in search}


def require_converter(source: str) -> None:
    """Fail before any download when the `convert` extra is not installed."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "optimum") if not importlib.util.find_spec(m)]
    if missing:
        raise ConverterMissing(
            f"{source} is a checkpoint, not an ONNX GenAI bundle: converting it needs the "
            f"converter ({', '.join(missing)} missing). Install it with {CONVERT_EXTRA}"
        )
