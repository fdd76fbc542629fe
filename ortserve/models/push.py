"""Push a library model to a Hugging Face Hub repository, for `ortserve pull` elsewhere.

The destination is `[hf.co/]ORG/REPO[:VARIANT]`: the bundle goes into the VARIANT folder (the
repository's root without one), with the manifest file of models/pushed.py beside it, through
huggingface-hub (HF_TOKEN, HF_ENDPOINT for a private hub). Two properties matter:

- **Nothing half-written is ever visible.** Files go up first as LFS (or Xet) objects, which
  no revision shows; then ONE commit adds the bundle, its adapters and the manifest file at
  once (and removes a previous push's leftovers in the folder), against the commit that was
  read, so a concurrent push is refused instead of mixed in.
- **An interrupted push resumes.** Objects the hub already holds are not sent again: the LFS
  batch answer (or Xet's deduplication) says which it has, so a re-run uploads only the rest.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ortserve.errors import InvalidRequest, PullCancelled, SourceUnavailable
from ortserve.hub import endpoint, hub_errors
from ortserve.library import bundle as bundles
from ortserve.library.store import INDEX_FILE, Library, ModelInfo
from ortserve.models import pushed
from ortserve.models.pull import HF_HOST, ProgressFn, PullRef, PullStatus, ignore_progress

_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PushTarget:
    """Where a push goes: a repository and a folder in it ("" for the root)."""

    repo: str
    variant: str | None = None

    @property
    def folder(self) -> str:
        return self.variant or ""

    @property
    def text(self) -> str:
        return f"{HF_HOST}/{self.repo}" + (f":{self.variant}" if self.variant else "")

    def path(self, relative: str) -> str:
        """A bundle-relative path as a path in the repository."""
        return posixpath.join(self.folder, relative) if self.folder else relative


@dataclass(frozen=True)
class PushResult:
    target: PushTarget
    commit: str | None  # None: the hub already had exactly this


def parse_target(text: Any, param: str = "destination") -> PushTarget:
    """`[hf.co/]ORG/REPO[:VARIANT]`; `:latest` (Ollama's default tag) is the repository's root."""
    what = "a push destination" if param == "destination" else "a model named after its destination"
    try:
        ref = PullRef.parse(text, local=False)
    except InvalidRequest:
        ref = None
    if ref is None or ref.repo is None or ref.revision is not None:
        raise InvalidRequest(
            f"invalid {param} {text!r}: {what} is [hf.co/]ORG/REPO[:VARIANT] (no @REVISION: "
            "a push commits to the main branch)",
            param=param,
        )
    variant = None if (ref.variant or "latest").lower() == "latest" else ref.variant
    if variant in (".", "..") or variant in pushed.RESERVED:
        raise InvalidRequest(
            f"invalid {param} {text!r}: {variant!r} cannot be a variant", param=param
        )
    return PushTarget(ref.repo, variant)


def push(
    name: str,
    destination: str | None = None,
    *,
    library: Library | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PushResult:
    """Push library model `name` to `destination` (default: the name itself, as Ollama pushes
    a model named after where it goes: `hf.co/org/repo:variant`)."""
    library = library or Library()
    info = library.get(name)
    if destination is None:
        target = parse_target(info.name, param="model")
    else:
        target = parse_target(destination)
    return _Push(
        info, target, library, progress or ignore_progress, cancel or threading.Event()
    ).run()


class _Push:
    """One push: check the bundle, upload what the hub lacks, commit everything at once."""

    def __init__(self, info: ModelInfo, target: PushTarget, library: Library,
                 report: ProgressFn, cancel: threading.Event):  # fmt: skip
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # its per-file upload bars: ours are reported instead
        self.info, self.target, self.library = info, target, library
        self.report, self.cancel = report, cancel
        self.api = HfApi(endpoint=endpoint())
        self.action = f"cannot push {info.name!r} to {target.text!r}"

    def run(self) -> PushResult:
        self.report(PullStatus("retrieving manifest"))
        self.library.check(self.info)  # a damaged bundle is never published
        index = json.loads((self.info.path / INDEX_FILE).read_text(encoding="utf-8"))
        with self._errors():
            self.api.create_repo(self.target.repo, exist_ok=True)
            head = self.api.model_info(
                self.target.repo,
                timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),  # type: ignore[arg-type]
            )
        additions = [self._upload(path, local) for path, local in self._files(index)]
        manifest = json.dumps(pushed.build(self.info, index), indent=2, sort_keys=True).encode()
        additions.append(self._operation(self.target.path(pushed.MANIFEST_FILE), manifest))
        deletions = self._leftovers(head, {op.path_in_repo for op in additions})
        self._check_cancel()
        self.report(PullStatus("pushing manifest"))
        with self._errors():
            commit = self.api.create_commit(
                self.target.repo,
                [*deletions, *additions],
                commit_message=f"ortserve push {self.info.name}",
                commit_description=f"bundle {self.info.digest}",
                parent_commit=head.sha,  # a push that landed meanwhile fails this one
            )
        self.report(PullStatus("success"))
        return PushResult(self.target, None if commit.oid == head.sha else commit.oid)

    def _files(self, index: dict[str, Any]) -> list[tuple[str, Path]]:
        """(path in the repository, local file) of the bundle's files and adapter blobs."""
        files = [(self.target.path(f["path"]), self.info.path / f["path"]) for f in index["files"]]
        for adapter in self.info.manifest.get("adapters") or []:
            digest = adapter.get("digest") if isinstance(adapter, dict) else None
            if not digest or not self.library.has_blob(digest):
                raise SourceUnavailable(f"{self.action}: adapter {adapter!r} has no blob here")
            files.append((self.target.path(pushed.adapter_path(digest)),
                          self.library.blob_path(digest)))  # fmt: skip
        return files

    def _upload(self, path: str, local: Path):
        """Send one file's content unless the hub has it (preupload + LFS batch say which)."""
        self._check_cancel()
        operation = self._operation(path, local)
        size, sha256 = operation.upload_info.size, operation.upload_info.sha256.hex()
        status = f"pushing {sha256[:12]}"  # Ollama's status line for a layer
        self.report(PullStatus(status, f"sha256:{sha256}", size, 0))
        with self._errors():
            self.api.preupload_lfs_files(self.target.repo, additions=[operation])
        self.report(PullStatus(status, f"sha256:{sha256}", size, size))
        return operation

    @staticmethod
    def _operation(path: str, content: Path | bytes):
        from huggingface_hub import CommitOperationAdd

        source = str(content) if isinstance(content, Path) else content
        return CommitOperationAdd(path_in_repo=path, path_or_fileobj=source)

    def _leftovers(self, head: Any, keep: set[str]) -> list[Any]:
        """Files of a previous push in the variant folder that this one does not have (the
        folder is the bundle); the root keeps what it has (a README, other variants' files),
        since a pull takes only the files the manifest lists."""
        from huggingface_hub import CommitOperationDelete

        folder = self.target.folder
        if not folder:
            return []
        present = [s.rfilename for s in head.siblings or []]
        nested = {posixpath.dirname(p) for p in present
                  if posixpath.basename(p) == bundles.GENAI_CONFIG} - {folder}  # fmt: skip
        return [
            CommitOperationDelete(path_in_repo=p)
            for p in present
            if p.startswith(folder + "/") and p not in keep
            and not any(p.startswith(n + "/") for n in nested if n.startswith(folder + "/"))
        ]  # fmt: skip

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PullCancelled(f"push of {self.info.name} to {self.target.text} cancelled "
                                "(push again to resume)")  # fmt: skip

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """hub_errors, plus what a write adds: a refused token, a failed upload, a race."""
        try:
            with hub_errors(self.action):
                try:
                    yield
                except (RuntimeError, ValueError) as exc:  # an LFS upload or batch failed
                    cause = exc.__cause__
                    if isinstance(cause, OSError):
                        raise cause from exc
                    raise SourceUnavailable(f"{self.action}: {exc}; push again to resume") from exc
        except SourceUnavailable as exc:
            raise _refusal(exc, self.action, self.target) or exc from exc.__cause__


def _refusal(exc: SourceUnavailable, action: str, target: PushTarget) -> SourceUnavailable | None:
    """A clearer error for an HTTP refusal of the write (no token, read-only token, race)."""
    response = getattr(exc.__cause__, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return SourceUnavailable(
            f"{action}: {endpoint()} refused the write (HTTP {status}): set HF_TOKEN to a token "
            f"with write access to {target.repo}"
        )
    if status in (409, 412):
        return SourceUnavailable(
            f"{action}: the repository changed while pushing (HTTP {status}); push again"
        )
    return None
