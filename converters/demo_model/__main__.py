"""`python -m converters.demo_model`: rebuild demo-chat, then evaluate it through the server.

python -m converters.demo_model                      # train into converters/data/demo-chat
python -m converters.demo_model --out /tmp/demo      # somewhere else
python -m converters.demo_model --evaluate-only      # score the checkpoint that is there
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converters.demo_model import CHECKPOINT
from converters.demo_model.train import Recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.demo_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--evaluate-only", action="store_true", help="skip training")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the evaluation")
    args = parser.parse_args(argv)
    if not args.evaluate_only:
        from converters.demo_model.train import save, train

        recipe = Recipe(seed=args.seed)
        model, tok, figures = train(recipe, log=lambda line: print(line, file=sys.stderr))
        save(model, tok, args.out, recipe, figures)
        print(json.dumps(figures), file=sys.stderr)
    if args.no_evaluate:
        return 0
    from converters.demo_model.evaluate import GOAL, INFORMATIONAL, evaluate_checkpoint

    report = evaluate_checkpoint(args.out)
    print(report.table())
    for failure in report.failures():
        print(f"  {failure.family}: {failure.question!r} -> {failure.got!r}", file=sys.stderr)
    held = [share for family, share in report.accuracy().items() if family not in INFORMATIONAL]
    return 0 if min(held) >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
