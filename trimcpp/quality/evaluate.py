"""Accuracy against kept rows: every (method, keep) pair on a folder of pictures and questions.

A dataset is a folder of pictures and a ``questions.json``: a list of
``{"image": "00000.png", "question": "What color is the triangle?", "answer": "red"}`` (the
format :func:`trimcpp.quality.scenes.write_split` writes). Each question is asked through the trimmed
handler with greedy decoding; the reply counts as right when its first word, lower-cased and
without punctuation, is the answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..bench import machine
from ..handlers import HANDLERS
from ..images import image_messages
from ..llamacpp import load_llama

DATA = Path(__file__).parent / "data"
BUNDLED = {"model": DATA / "minivlm" / "llm.gguf", "mmproj": DATA / "minivlm" / "mmproj.gguf",
           "data": DATA / "scenes-test"}  # the project's trained mini VLM and its test split


@dataclasses.dataclass(frozen=True)
class Question:
    image: Path
    question: str
    answer: str


def load(folder: os.PathLike | str) -> list[Question]:
    """The questions of a dataset folder (ValueError naming the problem if it is not one)."""
    folder = Path(folder)
    index = folder / "questions.json"
    if not index.is_file():
        raise ValueError(f"{folder} has no questions.json (a list of {{image, question, answer}} records)")
    try:
        records = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{index} is not valid JSON: {error}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{index} must hold a non-empty list of records")
    questions = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("image", "question", "answer")):
            raise ValueError(f"{index}: record {i} needs string fields image, question and answer")
        image = folder / r["image"]
        if not image.is_file():
            raise ValueError(f"{index}: record {i} names {r['image']!r}, which is not in {folder}")
        questions.append(Question(image, r["question"], normalise(r["answer"])))
    return questions


def normalise(reply: str) -> str:
    """The first word of a reply, lower-cased, without punctuation."""
    words = re.findall(r"[\w']+", reply.lower())
    return words[0] if words else ""


def run(model: str, mmproj: str, questions: Sequence[Question], methods: Sequence[str], keeps: Sequence[int], *,
        chat_format: str = "llava-1-5", n_ctx: int = 2048, threads: Optional[int] = None, max_tokens: int = 4,
        on_step: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Asks every question under every (method, keep); `none` runs once (it keeps every row)."""
    handler = HANDLERS[chat_format][1](clip_model_path=mmproj, verbose=False)
    llama = load_llama(model, handler, n_ctx=n_ctx, threads=threads, seed=0)
    configs = [(m, None) if m == "none" else (m, k) for m in methods for k in ([None] if m == "none" else keeps)]
    right = {c: 0 for c in configs}
    kept = {c: 0 for c in configs}
    replies: dict[tuple, list[str]] = {c: [] for c in configs}
    for q in questions:
        messages = image_messages(q.image.read_bytes(), q.question)
        for method, keep in configs:
            handler.method, handler.keep = method, keep
            reply = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
            answer = normalise(reply["choices"][0]["message"]["content"] or "")
            replies[(method, keep)].append(answer)
            right[(method, keep)] += answer == q.answer
            kept[(method, keep)] += sum(s.kept for s in handler.last_selection)
            if on_step:
                on_step()
    n = len(questions)
    base = right[("none", None)] / n if ("none", None) in right else None
    results = [{"method": m, "keep": k, "accuracy": right[(m, k)] / n, "mean_kept": kept[(m, k)] / n,
                "relative": None if not base else right[(m, k)] / n / base, "answers": replies[(m, k)]}
               for m, k in configs]
    return {"model": model, "mmproj": mmproj, "chat_format": chat_format, "questions": n, "keeps": list(keeps),
            "methods": list(methods), "machine": machine(), "results": results}


def table(result: dict[str, Any]) -> str:
    """Accuracy (and relative to keep-all) per method and budget."""
    keeps = result["keeps"]
    cells = {(r["method"], r["keep"]): r for r in result["results"]}
    lines = [f"{'method':<14}" + "".join(f"{'keep ' + str(k):>16}" for k in keeps)]
    for method in result["methods"]:
        row = f"{method:<14}"
        for keep in keeps:
            r = cells[(method, None if method == "none" else keep)]
            relative = "" if r["relative"] is None else f"({100 * r['relative']:.0f}%)"
            row += f"{100 * r['accuracy']:>9.1f} {relative:>6}"
        lines.append(row)
    lines.append(f"{result['questions']} questions; accuracy in %, (relative to keeping every row, method none)")
    return "\n".join(lines)
