"""``python -P -m trimcpp.quality.minivlm``: train the mini VLM stage by stage, rebuild the bundled
pair, check an exported pair, write the test split. Training and ``agree`` need PyTorch
(``pip install "trimcpp[train]"``); ``-P`` keeps Python from importing an uninstalled source tree."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import scenes
from ..evaluate import BUNDLED
from .stages import BUNDLED_STAGE, MINI, SEEDS, STAGES

METHODS = ("random", "uniform", "divprune", "cdpruner", "align+l2", "align+cosine", "trimtokenator+l2", "trimtokenator+cosine",
           "trimtokenator+l2+adaptive", "trimtokenator+cosine+adaptive")
KEEPS = (64, 32, 16)


def _needs_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(f'python -m trimcpp.quality.minivlm {command}: needs PyTorch: pip install "trimcpp[train]"')


def rebuild(out: Path) -> None:
    """Runs the stages of the bundled pair in order (up to BUNDLED_STAGE), each into out/<stage>, each
    from the one before."""
    _needs_torch("rebuild")
    from .train import train

    names = list(STAGES)
    for name in names[: names.index(BUNDLED_STAGE) + 1]:
        stage = STAGES[name]
        train(stage, out / stage.name, start=None if stage.start is None else out / stage.start)


def print_coverage(result: dict) -> None:
    print(f"{'method':<31}" + "".join(f"{'keep ' + str(k):>16}" for k in KEEPS))
    for method in dict.fromkeys(name.split()[0] for name in result):
        cells = [result[f"{method} {k}"] for k in KEEPS]
        print(f"{method:<31}" + "".join(f"{100 * c['evidence_kept']:>9.0f} {100 * c['any_evidence_kept']:>5.0f}%"
                                        for c in cells))
    print(f"{next(iter(result.values()))['questions']} questions about a drawn figure; per cell: % of their evidence "
          "rows kept, then % of questions with at least one kept")


def main(argv: Optional[Sequence[str]] = None) -> None:
    bundled = BUNDLED["model"].parent
    parser = argparse.ArgumentParser(prog="python -P -m trimcpp.quality.minivlm", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_ = commands.add_parser("train", help="run one named stage")
    train_.add_argument("--stage", choices=list(STAGES), required=True)
    train_.add_argument("--start", type=Path, help="the folder of the stage it goes on from (that stage's --out)")
    train_.add_argument("--out", type=Path, required=True, help="where the pair, minivlm.pt and training.json go")
    train_.add_argument("--steps", type=int, help="stop after this many steps (a smoke test; else the stage's own)")
    rebuild_ = commands.add_parser("rebuild", help="the bundled pair's stages in order (about 5 hours on 2 cores)")
    rebuild_.add_argument("--out", type=Path, required=True, help="one folder per stage is made here")
    for name, text in (("agree", "PyTorch's answers vs llama.cpp's on a split"),
                       ("coverage", "share of each question's evidence rows each method keeps")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--out", type=Path, default=bundled, help="the exported pair (default: the bundled one)")
        sub.add_argument("--data", type=Path, default=BUNDLED["data"], help="the split (default: the bundled test split)")
    split = commands.add_parser("split", help="write the test split")
    split.add_argument("--data", type=Path, required=True)
    split.add_argument("--images", type=int, default=200, help="scenes in the split")
    split.add_argument("--style", choices=scenes.STYLES, default="plain",
                       help="plain (the bundled split), cluttered or crowded (where the question should matter)")
    args = parser.parse_args(argv)
    if args.command == "split":
        scenes.write_split(args.data, SEEDS["test"], args.images, MINI.image_size, per_image=2, style=args.style)
    elif args.command == "train":
        stage = STAGES[args.stage]
        if (stage.start is None) != (args.start is None):
            parser.error(f"{stage.name} goes on from {stage.start or 'random weights'}: "
                         + ("give --start" if stage.start else "no --start"))
        _needs_torch("train")
        from .train import train as run_stage

        if args.steps is not None:
            stage = dataclasses.replace(stage, steps=args.steps)
        run_stage(stage, args.out, start=args.start)
    elif args.command == "rebuild":
        rebuild(args.out)
    elif args.command == "coverage":
        from .coverage import coverage

        print_coverage(coverage(args.out, args.data, METHODS, KEEPS))
    else:
        _needs_torch("agree")
        from .agree import agree

        print(json.dumps(agree(args.out, args.data), indent=1))


if __name__ == "__main__":
    main()
