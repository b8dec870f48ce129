"""The named training stages of the bundled mini VLM (``trimcpp/quality/data/minivlm``).

The bundled pair was trained in stages, each going on from the one before; rebuilding it
runs them in order (``python -P -m trimcpp.quality.minivlm rebuild``). Training is bound by wall
time (the learning rate follows ``minutes``; ``steps`` stops a run early, as stages 3 and 4 were
stopped by hand), so a rerun on another machine, or a busier one, gives a different model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ...testing import Shape

# The mini VLM's dimensions: a LLaVA-1.5 in miniature (256 rows of width 192 per picture).
MINI = Shape(n_embd=192, n_layer=4, n_head=4, n_ff=512, n_vocab=2048, weight_type="f16",
             image_size=224, patch_size=14, v_embd=128, v_layer=5, v_head=4, v_ff=512, v_type="f16",
             n_ctx_train=1024)
BUNDLED_STAGE = "stage6"  # the last stage of the bundled pair (stage 7 did not reach its target: RESULTS.md)
SEEDS = {"train": 1000, "validation": 2000, "test": 3000}  # scenes.split seeds: disjoint scene sets

# What a projected row that shows a figure learns to read as, through the LLM's output head.
READOUT = ("colour", "kind", "side", "height", "count")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run."""

    name: str
    why: str  # what the stage adds
    minutes: float  # the cosine learning-rate schedule's length
    lr: float  # peak learning rate
    seed: int  # torch seed, and the offset of the training scenes' seed
    start: Optional[str] = None  # the stage it goes on from (None: random weights)
    from_checkpoint: bool = False  # start from that stage's minivlm.pt (else its exported GGUF pair)
    steps: Optional[int] = None  # stop after this many steps (else when `minutes` have passed)
    row_share: float = 0.6  # share of the steps in which the LLM sees fewer image rows
    readout: tuple[str, ...] = READOUT  # the words a figure's rows read as
    attend: float = 0.5  # weight of the attention supervision of head 0 of layer WATCH
    attributes: float = 0.5  # weight of each attribute read among its own words
    position_boost: float = 0.0  # multiple of fixed 2-D position codes added to the encoder's first
    aux: float = 0.5  # weight of the encoder's patch classes and of the rows' readout
    cluttered: float = 0.0  # share of the training scenes in the cluttered style (scenes.STYLES)
    crowded: float = 0.0  # share in the crowded style

    def style(self, rng) -> str:
        """The style of the next training scene (one draw of `rng` when the stage mixes styles)."""
        if not (self.cluttered or self.crowded):
            return "plain"
        u = rng.random()
        return "crowded" if u < self.crowded else "cluttered" if u < self.crowded + self.cluttered else "plain"

    def styles(self) -> tuple[str, ...]:
        """The styles the stage trains on, and validates on."""
        return ("plain",) + (("cluttered",) if self.cluttered else ()) + (("crowded",) if self.crowded else ())


STAGES = {
    "stage1": Stage("stage1", "answers from every row; rows read as colour and kind words",
                    minutes=65, lr=2e-3, seed=0, row_share=0.0, readout=("colour", "kind"), attend=0.0,
                    attributes=0.0),
    "stage2": Stage("stage2", "fewer rows in 60% of the steps; rows also read as side and height",
                    minutes=75, lr=5e-4, seed=2, start="stage1", readout=("colour", "kind", "side", "height"),
                    attend=0.0, attributes=0.0),
    "stage3": Stage("stage3", "attention supervision; rows also read as how many of their kind",
                    minutes=60, lr=1e-3, seed=3, start="stage2", steps=1500, attributes=0.0),
    "stage4": Stage("stage4", "stronger encoder position codes, so rows can tell their side and height",
                    minutes=55, lr=1e-3, seed=4, start="stage3", from_checkpoint=True, steps=900,
                    attributes=0.0, position_boost=2.5),
    "stage5": Stage("stage5", "each attribute of a row also among its own words",
                    minutes=58, lr=1e-3, seed=5, start="stage4", from_checkpoint=True),
    "stage6": Stage("stage6", "cluttered scenes in half the steps, where the question matters",
                    minutes=55, lr=5e-4, seed=6, start="stage5", cluttered=0.5),
    "stage7": Stage("stage7", "crowded scenes for 40% of the pictures, counts of a colour and kind",
                    minutes=50, lr=5e-4, seed=7, start="stage6", crowded=0.4, cluttered=0.3),
}
