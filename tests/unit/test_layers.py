"""The import structure: no circles, and each layer imports only the ones below it.

Read from the source with ast, counting lazy (function-level) imports too: a lazy import
still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ortserve", "converters")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (the nearest known module of each import)."""
    files = {_module(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        graph[name] = {_known(t, files) for t in targets} - {None, name}
    return graph


def _known(target: str, files) -> str | None:
    while target and target not in files:
        target = target.rpartition(".")[0]
    return target or None


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_are_no_import_circles():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _imports_of(prefix: str) -> set[str]:
    graph = _graph()
    return {t for m, targets in graph.items() if m == prefix or m.startswith(prefix + ".")
            for t in targets}  # fmt: skip


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # storage is a leaf: it knows nothing of inference, conversion, workflows, HTTP or the CLI
        (
            "ortserve.library",
            (
                "ortserve.engine",
                "ortserve.serving",
                "converters",
                "ortserve.models",
                "ortserve.api",
                "ortserve.cli",
            ),
        ),  # fmt: skip
        # inference returns data: it never sees a request, HTTP or the workflows above it
        (
            "ortserve.engine",
            ("ortserve.serving", "ortserve.api", "ortserve.models", "ortserve.cli", "converters"),
        ),  # fmt: skip
        # the serving core is protocol-neutral: typed requests in, events out, no HTTP
        ("ortserve.serving", ("ortserve.api", "ortserve.models", "ortserve.cli", "converters")),
        # option checks are a leaf every layer may use
        (
            "ortserve.options",
            (
                "ortserve.engine",
                "ortserve.serving",
                "ortserve.library",
                "ortserve.api",
                "ortserve.models",
                "converters",
            ),
        ),  # fmt: skip
        # the converter writes bundles into the library, never through the server
        ("converters", ("ortserve.api", "ortserve.models", "ortserve.cli", "ortserve.engine")),
        ("ortserve.models", ("ortserve.api", "ortserve.cli")),
        # the Ray application sits on top of the app: nothing below it imports it
        *[
            (layer, ("ortserve.cluster",))
            for layer in (
                "ortserve.api",
                "ortserve.serving",
                "ortserve.models",
                "ortserve.engine",
                "ortserve.library",
                "converters",
            )
        ],  # fmt: skip
    ],
)
def test_each_layer_imports_only_the_ones_below_it(layer, forbidden):
    wrong = {t for t in _imports_of(layer) if t.startswith(forbidden)}
    assert wrong == set()


def _third_party_importers(package: str) -> set[str]:
    """Project files (relative to the root) that import `package`, lazily or not."""
    found = set()
    for path in (p for top in PACKAGES for p in (ROOT / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == package or n.startswith(package + ".") for n in names):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_only_the_api_imports_flask():
    wrong = {p for p in _third_party_importers("flask") if not p.startswith("ortserve/api/")}
    assert wrong == set()


# The onnxruntime-genai backend (engine/backend.py's first implementation) and the converter,
# which builds decoders with og's model builder and checks bundles with og. Nothing else may
# import og: a second backend must not need a change above engine/.
OG_MODULES = {
    "ortserve/engine/og_backend.py",
    "ortserve/engine/scheduler.py",
    "ortserve/engine/continuous.py",
    "ortserve/engine/adapters.py",
    "ortserve/engine/providers.py",
    "converters/builder.py",
    "converters/verify.py",
    "converters/vision.py",  # verifies og's multimodal pipeline end to end
    "ortserve/engine/speech.py",  # Whisper (speech to text) through og's multimodal processor
    "converters/speech.py",  # verifies Whisper bundles against transformers
}


def test_only_the_og_backend_imports_onnxruntime_genai():
    assert _third_party_importers("onnxruntime_genai") <= OG_MODULES


def test_the_import_finder_sees_lazy_imports():
    assert "ortserve/engine/scheduler.py" in _third_party_importers("onnxruntime_genai")
    assert "ortserve/api/app.py" in _third_party_importers("flask")
