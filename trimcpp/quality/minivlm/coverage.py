"""Which rows each method keeps of each question's evidence (the rows that show the figures it
names), through the trimmed handler on an exported pair. Needs no PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np

from ...handlers import TrimLlava15ChatHandler
from ...images import image_messages
from ...llamacpp import load_llama, quiet_logs
from .. import scenes
from ..evaluate import load, method_spec
from .stages import MINI, SEEDS


def trimmed_llama(out: Path) -> tuple[TrimLlava15ChatHandler, llama_cpp.Llama]:
    """The exported pair in `out` in llama.cpp, through a `TrimLlava15ChatHandler` keeping every row
    (set its method and keep per request)."""
    handler = TrimLlava15ChatHandler(clip_model_path=str(out / "mmproj.gguf"), keep=None, verbose=False)
    return handler, load_llama(str(out / "llm.gguf"), handler, n_ctx=1024)


def coverage(out: Path, data: Path, methods: Sequence[str], keeps: Sequence[int]) -> dict:
    """For each (method, keep): over the test split's questions about something drawn, the mean
    share of their evidence rows (`scenes.evidence`) that `TrimLlava15ChatHandler` keeps, and the
    share of questions with at least one evidence row kept. The scenes are regenerated from the
    split's seed (this model has no class token, so row r shows patch r)."""
    quiet_logs(False)
    questions = load(data)
    per_image = sum(q.image == questions[0].image for q in questions)
    made = scenes.split_of(data, SEEDS["test"])
    drawn = list(scenes.split(made["seed"], len(questions) // per_image, MINI.image_size, per_image, made["style"]))
    handler, llama = trimmed_llama(out)
    shares: dict[tuple[str, int], list[float]] = {(m, k): [] for m in methods for k in keeps}
    for q in questions:
        _, figures, pairs = drawn[int(q.image.stem)]
        if q.question not in [question for question, _ in pairs]:
            raise ValueError(f"{data} is not the {made['style']} split of seed {made['seed']}: {q.image.name} {q.question!r}")
        shown = scenes.evidence(q.question, scenes.patch_labels(figures, MINI.image_size, MINI.patch_size))
        if not shown.any():
            continue
        messages = image_messages(q.image.read_bytes(), q.question)
        for method, keep in shares:
            handler.method, handler.alignment, handler.stage1_ratio = method_spec(method)
            handler.keep = keep
            llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
            [kept] = handler.last_selection[0].indices
            shares[(method, keep)].append(float(shown[kept].sum() / shown.sum()))
    return {f"{m} {k}": {"evidence_kept": float(np.mean(v)), "any_evidence_kept": float(np.mean(np.array(v) > 0)),
                         "questions": len(v)} for (m, k), v in shares.items()}
