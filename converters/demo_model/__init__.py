"""demo-chat: a small Qwen2 chat model trained by the project on conversations it generates.

facts.py (what it knows, the tools it calls), conversations.py (the data and its held-out
split), tokenizer.py (BPE and chat template), model.py (the decoder as trained), train.py (the
recipe), evaluate.py (held-out figures through a real server). Rebuild and score it with
`python -m converters.demo_model`; docs/demo.md has the figures. The checkpoint ships in
converters/data/demo-chat, and `make demo` serves it (converters/demo.py).
"""

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent.parent / "data" / "demo-chat"
NAME = "demo-chat"
PRECISION = "int8"  # what `make demo` and the evaluation convert it to
PARAMETERS = {"temperature": 0}  # its defaults in the library (converters/demo.py)
