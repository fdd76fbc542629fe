"""optimum export of a checkpoint to ONNX, quietly."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from converters.checkpoint import Checkpoint

_TASKS = {
    "decoder": ("text-generation-with-past", "transformers"),
    # sentence-transformers' export keeps the pooling and normalisation in the graph
    # (output "sentence_embedding").
    "encoder": ("feature-extraction", "sentence_transformers"),
}


def export_onnx(checkpoint: Checkpoint, out: Path, *, trust_remote_code: bool = False) -> Path:
    """Export to out/model.onnx (fp32); return its path."""
    from optimum.exporters.onnx import main_export

    task, library = _TASKS[checkpoint.kind]
    with warnings.catch_warnings(), _quiet("optimum", "transformers", "torch"):
        warnings.simplefilter("ignore")
        main_export(
            str(checkpoint.path),
            str(out),
            task=task,
            library_name=library,
            trust_remote_code=trust_remote_code,
            do_validation=False,
            local_files_only=True,
            # optimum's post-processing re-loads the whole graph to merge tied weights: +30%
            # peak memory and a fp32 lm_head sharing the embedding (which MatMulNBits then
            # cannot quantize). Without it the lm_head keeps its own weight and is quantized.
            no_post_process=True,
        )
    return out / "model.onnx"


class _quiet:
    """Raise some loggers to ERROR for the duration of a block (tracer chatter)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]
        self.levels: list[int] = []

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
