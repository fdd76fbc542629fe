"""The catalog of short model names: `llama3.2`, `qwen2.5:0.5b`, `phi4-mini`, as Ollama's
library names them, each mapped to Hugging Face sources the way Foundry Local's aliases map to
per-device variants: a ready ONNX GenAI bundle per execution provider where one is published,
else the original checkpoint with the recipe that converts it.

The catalog ships as package data (catalog.json beside this module). Two files extend it, each
over the one before, tag by tag: `catalog.json` in the library root, then the file that
ORTSERVE_CATALOG names. A tag is either an entry or the name of another tag of the same model
(`"latest": "3b"`), so `llama3.2` means `llama3.2:latest`, which means `llama3.2:3b`.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ortserve.errors import OrtServeError, RepoNotFound, SourceUnavailable
from ortserve.library.names import DEFAULT_TAG, REPO_ID, ModelName

CATALOG_ENV = "ORTSERVE_CATALOG"
CATALOG_FILE = "catalog.json"
PRECISIONS = ("int4", "int8", "fp16", "fp32")  # the converter's
_CLOSE = 6  # close names listed for a name the catalog lacks


@dataclass(frozen=True)
class Source:
    """A Hugging Face repository: a bundle folder in it, or a checkpoint and its precision."""

    repo: str
    variant: str | None = None
    revision: str | None = None
    precision: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Source:
        return cls(data["repo"], data.get("variant"), data.get("revision"), data.get("precision"))

    def describe(self) -> str:
        where = f"{self.repo}/{self.variant}" if self.variant else self.repo
        return where + (f" ({self.precision})" if self.precision else "")


@dataclass(frozen=True)
class Entry:
    """One `model:tag` of the catalog: its bundles by provider, its checkpoint, its aliases."""

    model: str
    tag: str
    bundles: dict[str, Source]
    checkpoint: Source | None
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.model}:{self.tag}"


@dataclass(frozen=True)
class Choice:
    """What a pull of an entry downloads on this machine."""

    entry: Entry
    source: Source
    provider: str | None  # the bundle's provider; None: the checkpoint, converted

    def describe(self) -> str:
        return f"{self.provider} bundle" if self.provider else f"convert {self.source.precision}"


class Catalog:
    """The merged catalog: model -> tag -> entry data, or the name of another tag."""

    def __init__(self, models: dict[str, dict[str, Any]]):
        self.models = {
            model.lower(): {tag.lower(): value for tag, value in data["tags"].items()}
            for model, data in models.items()
        }

    def lookup(self, name: ModelName) -> Entry:
        """The entry `model[:tag]` names, aliases followed; RepoNotFound with close names."""
        tags = self.models.get(name.model.lower())
        if tags is None:
            raise RepoNotFound(
                f"unknown model {name.model!r}: not in the catalog of short names "
                f"({self._suggest(name)}; `ortserve list --catalog` shows them all), and not "
                "ORG/REPO on Hugging Face",
                param="model",
            )
        tag = self._resolve(name.model.lower(), name.tag.lower(), tags)
        return self._entry(name.model.lower(), tag)

    def entries(self) -> list[Entry]:
        """Every entry (aliases folded into the entry they name), sorted by name."""
        return [
            self._entry(model, tag)
            for model, tags in sorted(self.models.items())
            for tag, value in sorted(tags.items())
            if isinstance(value, dict)
        ]

    def _resolve(self, model: str, tag: str, tags: dict[str, Any]) -> str:
        seen = []
        while isinstance(tags.get(tag), str) and tag not in seen:
            seen.append(tag)
            tag = tags[tag].lower()
        if isinstance(tags.get(tag), dict):
            return tag
        known = ", ".join(sorted(tags))
        if seen and tag in seen:
            raise OrtServeError(f"the catalog's tags of {model} name each other: {', '.join(seen)}")
        what = "has no default tag" if tag == DEFAULT_TAG else f"has no tag {tag!r}"
        raise RepoNotFound(f"{model} {what} in the catalog; tags: {known}", param="model")

    def _entry(self, model: str, tag: str) -> Entry:
        data = self.models[model][tag]
        aliases = tuple(
            sorted(
                a for a, v in self.models[model].items() if isinstance(v, str) and v.lower() == tag
            )
        )
        bundles = {p.lower(): Source.from_json(s) for p, s in data.get("bundles", {}).items()}
        checkpoint = data.get("checkpoint")
        return Entry(model, tag, bundles, checkpoint and Source.from_json(checkpoint), aliases)

    def _suggest(self, name: ModelName) -> str:
        close = difflib.get_close_matches(name.model.lower(), self.models, n=_CLOSE, cutoff=0.5)
        if close:
            return "close: " + ", ".join(close)
        return "it has " + ", ".join(sorted(self.models))


# ---- choosing -----------------------------------------------------------------------------------


def choose(entry: Entry, providers: list[str], *, convert: bool = False) -> Choice:
    """The bundle for the first of `providers` (best first) that has one, else the checkpoint.

    `convert`: the checkpoint whatever bundles there are (a precision was asked for).
    """
    if not convert:
        for provider in providers:
            if provider in entry.bundles:
                return Choice(entry, entry.bundles[provider], provider)
    if entry.checkpoint is not None:
        return Choice(entry, entry.checkpoint, None)
    if convert:
        raise SourceUnavailable(
            f"{entry.name} has only ready bundles in the catalog, no checkpoint to convert at a "
            "precision; pull it without one"
        )
    raise SourceUnavailable(
        f"cannot pull {entry.name}: the catalog has bundles for {', '.join(sorted(entry.bundles))} "
        f"only, none for this machine's execution providers ({', '.join(providers)}), and no "
        "checkpoint to convert"
    )


def rows(catalog: Catalog, providers: list[str]) -> list[list[str]]:
    """`ortserve list --catalog`: name, aliases, what a pull here gets, bundles, checkpoint."""
    table = []
    for entry in catalog.entries():
        try:
            here = choose(entry, providers).describe()
        except SourceUnavailable:
            here = "-"
        table.append(
            [
                entry.name,
                ", ".join(entry.aliases) or "-",
                here,
                ", ".join(sorted(entry.bundles)) or "-",
                entry.checkpoint.describe() if entry.checkpoint else "-",
            ]
        )
    return table


# ---- loading ------------------------------------------------------------------------------------


def load(library_root: Path | None = None) -> Catalog:
    """The shipped catalog, extended by the library root's catalog.json and ORTSERVE_CATALOG."""
    shipped = resources.files(__package__).joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    models = _validated(json.loads(shipped), "the shipped catalog")["models"]
    for path in user_files(library_root):
        _merge(models, _read(path)["models"])
    return Catalog(models)


def user_files(library_root: Path | None) -> list[Path]:
    """The catalog files that extend the shipped one, in the order they apply."""
    found = []
    if library_root is not None and (Path(library_root) / CATALOG_FILE).is_file():
        found.append(Path(library_root) / CATALOG_FILE)
    named = os.environ.get(CATALOG_ENV, "").strip()
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise OrtServeError(f"{CATALOG_ENV}={named!r}: no such file")
        found.append(path)
    return found


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OrtServeError(f"catalog {path} cannot be read: {exc}") from exc
    return _validated(data, f"catalog {path}")


def _merge(models: dict[str, Any], extra: dict[str, Any]) -> None:
    """Tag by tag: a user's `qwen2.5:14b` adds a tag, a user's `qwen2.5:0.5b` replaces one."""
    lowered = {m.lower(): m for m in models}
    for model, data in extra.items():
        key = lowered.get(model.lower(), model)
        tags = models.setdefault(key, {"tags": {}})["tags"]
        names = {t.lower(): t for t in tags}
        for tag, value in data["tags"].items():
            tags.pop(names.get(tag.lower(), tag), None)
            tags[tag] = value


def _validated(data: Any, what: str) -> dict[str, Any]:
    import jsonschema

    try:
        jsonschema.validate(data, _schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise OrtServeError(f"{what} is invalid at {where}: {exc.message}") from exc
    return {"models": {m: {"tags": v["tags"]} for m, v in data["models"].items()}}


def _schema() -> dict[str, Any]:
    from ortserve.engine.providers import ACCELERATORS

    text = {"type": "string", "minLength": 1, "maxLength": 200}
    source = {
        "type": "object",
        "required": ["repo"],
        "additionalProperties": False,
        "properties": {
            "repo": {"type": "string", "pattern": REPO_ID.pattern, "not": {"pattern": r"\.\."}},
            "variant": text,
            "revision": text,
        },
    }
    checkpoint = {
        **source,
        "properties": {**source["properties"], "precision": {"enum": list(PRECISIONS)}},
    }
    entry = {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "bundles": {
                "type": "object",
                "additionalProperties": source,
                "minProperties": 1,
                "propertyNames": {"enum": ["cpu", *ACCELERATORS]},
            },
            "checkpoint": checkpoint,
        },
    }
    tag = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"}
    model = {
        "type": "object",
        "required": ["tags"],
        "properties": {
            "tags": {
                "type": "object",
                "propertyNames": tag,
                "additionalProperties": {"if": {"type": "string"}, "then": tag, "else": entry},
            }
        },
    }
    return {
        "type": "object",
        "required": ["models"],
        "properties": {
            "models": {
                "type": "object",
                "additionalProperties": model,
                "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$"},
            }
        },
    }
