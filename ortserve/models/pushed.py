"""The manifest file `ortserve push` writes beside a bundle on the hub, and its reading by pull.

A pushed variant folder holds the bundle's files, `ortserve-manifest.json` and, for a model
with LoRA adapters, `ortserve-adapters/sha256-<hex>.onnx_adapter`. The manifest file names
the bundle's digest and file index (path, size, sha256: the library's own `ortserve-files.json`)
and carries what a library manifest adds to a bundle: parameters, template, system, messages,
adapters, licence, details and capabilities. A pull that finds it takes exactly the files it
lists (not a README or .gitattributes beside them), checks each against its sha256, and
writes a manifest equal to the pushed one: same digest, same `show --modelfile`.

The file comes from a hub: it is read bounded in size and checked field by field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ortserve.errors import InvalidRequest, SourceUnavailable
from ortserve.library.store import INDEX_FILE, ModelInfo, blob_hex, index_digest

MANIFEST_FILE = "ortserve-manifest.json"
ADAPTER_FOLDER = "ortserve-adapters"
FORMAT = "ortserve-manifest/1"
# Templates, licences and messages are text: 16 MiB is far beyond any real one.
MAX_BYTES = 16 * 1024 * 1024
# The library manifest's fields a push carries (the rest, source and dates, are the puller's).
FIELDS = ("template", "system", "parameters", "messages", "license", "adapters", "details",
          "capabilities")  # fmt: skip
RESERVED = (MANIFEST_FILE, ADAPTER_FOLDER, INDEX_FILE)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def adapter_path(digest: str) -> str:
    """Where an adapter blob goes, relative to the variant folder (named by its digest)."""
    return f"{ADAPTER_FOLDER}/sha256-{blob_hex(digest)}.onnx_adapter"


def build(info: ModelInfo, index: dict[str, Any]) -> dict[str, Any]:
    """The manifest file of a library model whose bundle has the file index `index`."""
    fields = {key: info.manifest.get(key) for key in FIELDS}
    fields["adapters"] = [dict(a) for a in fields["adapters"] or []]
    return {"format": FORMAT, "name": info.name, "bundle": info.digest,
            "files": index["files"], **fields}  # fmt: skip


@dataclass(frozen=True)
class Pushed:
    """A checked manifest file: the bundle's files and the manifest fields to restore."""

    bundle: str
    files: list[dict[str, Any]]
    fields: dict[str, Any]

    @property
    def adapters(self) -> list[dict[str, Any]]:
        return self.fields.get("adapters") or []


def read(path: Path, source: str) -> Pushed:
    """Parse and check a downloaded manifest file; SourceUnavailable names what is wrong."""
    where = f"{source}: {MANIFEST_FILE}"
    if path.stat().st_size > MAX_BYTES:
        raise SourceUnavailable(f"{where} is larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceUnavailable(f"{where} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SourceUnavailable(f"{where}: format must be {FORMAT!r}")
    try:
        files = _files(data.get("files"))
        if index_digest({"files": files}) != data.get("bundle"):
            raise ValueError("bundle: the digest does not match the file list")
        fields = {key: data.get(key) for key in FIELDS}
        _check_fields(fields)
    except ValueError as exc:
        raise SourceUnavailable(f"{where}: {exc}") from exc
    return Pushed(data["bundle"], files, fields)


def _files(files: Any) -> list[dict[str, Any]]:
    if not isinstance(files, list) or not files:
        raise ValueError("files: expected a non-empty list")
    for n, entry in enumerate(files):
        if not (isinstance(entry, dict) and set(entry) == {"path", "size", "sha256"}
                and isinstance(entry["path"], str) and _safe(entry["path"])
                and entry["path"].split("/")[0] not in RESERVED
                and isinstance(entry["size"], int) and entry["size"] >= 0
                and isinstance(entry["sha256"], str) and _HEX64.match(entry["sha256"])):  # fmt: skip
            raise ValueError(f"files[{n}]: expected {{path, size, sha256}} with a safe path")
    return files


def _safe(path: str) -> bool:
    parts = path.split("/")
    return (
        not path.startswith("/")
        and "\\" not in path
        and all(p not in ("", ".", "..") for p in parts)
    )


def _check_fields(fields: dict[str, Any]) -> None:
    """Each field of the type the library's manifests give it."""
    for key in ("template", "system"):
        if fields[key] is not None and not isinstance(fields[key], str):
            raise ValueError(f"{key}: expected a string")
    license_ = fields["license"]
    if license_ is not None and not _strings(
        license_ if isinstance(license_, list) else [license_]
    ):
        raise ValueError("license: expected a string or a list of strings")
    _check_parameters(fields["parameters"])
    messages = fields["messages"] or []
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and _strings([m.get("role"), m.get("content")]) for m in messages
    ):
        raise ValueError("messages: expected a list of {role, content} strings")
    adapters = fields["adapters"] or []
    if not isinstance(adapters, list) or not all(_adapter_ok(a) for a in adapters):
        raise ValueError("adapters: expected a list of {name, digest: sha256:<hex>}")
    if not isinstance(fields["details"] or {}, dict):
        raise ValueError("details: expected an object")
    if not _strings(fields["capabilities"] or []):
        raise ValueError("capabilities: expected a list of strings")


def _check_parameters(parameters: Any) -> None:
    """The checks a Modelfile's PARAMETERs get (the values are kept as they are)."""
    from ortserve.options import parse_options

    try:
        parse_options(parameters or {}, "parameters", strict=True)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


def _adapter_ok(record: Any) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        return False
    try:
        blob_hex(record.get("digest"))
    except InvalidRequest:
        return False
    return True


def _strings(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) for v in values)
