"""Accuracy against kept rows: every (method, keep) pair on a dataset of pictures and questions.

Three layouts (:func:`load`):

- a folder of pictures and a ``questions.json``: a list of ``{"image": "00000.png", "question":
  "What color is the triangle?", "answer": "red"}`` (what :func:`trimcpp.quality.scenes.write_split`
  writes);
- POPE-style JSONL: one ``{"image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in
  the image?", "label": "yes"}`` per line ("question" / "answer" also read), the pictures in a folder
  (default: the file's own);
- a multiple-choice TSV in the MMBench / VLMEvalKit layout: columns ``index``, ``question``, ``hint``
  (optional), options ``A``, ``B``, ... , ``answer`` (a letter) and ``image`` (base64; or the
  ``index`` of another row whose picture it shares). The question asked is VLMEvalKit's prompt:
  the hint, the question, the options, "Please select the correct answer from the options above."

Each question is asked through the trimmed handler with greedy decoding; the reply counts as right
when its first word, lower-cased and without punctuation, is the answer (a yes/no, a word, a letter).

Agreement (``trimcpp eval --agreement``) needs no answers: the share of replies that are the same as
keep-all's (method ``none``, same model, same question), at each keep and method, and how much sooner
the LLM answers. It is the quality figure a user can measure on their own model and pictures.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import io
import json
import os
import re
import string
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from ..bench import machine
from ..handlers import HANDLERS
from ..images import image_messages
from ..llamacpp import load_llama
from ..selection import ADAPTIVE, DEFAULT_ALIGNMENT, DEFAULT_STAGE1_RATIO, METHODS, Stage1

DATA = Path(__file__).parent / "data"
BUNDLED = {"model": DATA / "minivlm" / "llm.gguf", "mmproj": DATA / "minivlm" / "mmproj.gguf",
           "data": DATA / "scenes-test"}  # the project's trained mini VLM and its test split


@dataclasses.dataclass(frozen=True)
class Question:
    image: Optional[Path]  # the picture's file (folder and JSONL datasets)
    question: str
    answer: Optional[str]  # normalised; None for a dataset without answers (agreement only)
    data: Optional[bytes] = None  # the picture itself (TSV datasets)

    def picture(self) -> bytes:
        """The picture's bytes."""
        return self.data if self.data is not None else self.image.read_bytes()  # type: ignore[union-attr]


def load(source: os.PathLike | str, images: Optional[os.PathLike | str] = None, answers: bool = True) -> list[Question]:
    """The questions of a dataset: a folder with ``questions.json``, a POPE-style ``.jsonl`` (pictures
    under `images`, default its folder) or an MMBench-style ``.tsv`` (ValueError naming the problem).
    With ``answers=False`` a question may come without its answer (then None)."""
    path = Path(source)
    if path.is_dir():
        return _load_folder(path, answers)
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, Path(images) if images is not None else path.parent, answers)
    if path.suffix.lower() == ".tsv":
        return _load_tsv(path, answers)
    raise ValueError(f"{path} is not a dataset: a folder with questions.json, a .jsonl (POPE) or a .tsv (MMBench)")


def _load_folder(folder: Path, answers: bool = True) -> list[Question]:
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
        unlabelled = not answers and isinstance(r, dict) and r.get("answer") is None
        needed = ("image", "question") if unlabelled else ("image", "question", "answer")
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in needed):
            raise ValueError(f"{index}: record {i} needs string fields {', '.join(needed[:-1])} and {needed[-1]}")
        image = folder / r["image"]
        if not image.is_file():
            raise ValueError(f"{index}: record {i} names {r['image']!r}, which is not in {folder}")
        questions.append(Question(image, r["question"], None if unlabelled else normalise(r["answer"])))
    return questions


def _load_jsonl(path: Path, images: Path, answers: bool = True) -> list[Question]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    questions = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        fields = {"image": r.get("image"), "question": r.get("text", r.get("question")),
                  "answer": r.get("label", r.get("answer"))} if isinstance(r, dict) else {}
        missing = not answers and bool(fields) and fields["answer"] is None
        if not fields or not all(isinstance(v, str) for k, v in fields.items() if not (missing and k == "answer")):
            raise ValueError(f"{path}, line {number}: needs string fields image, text (or question) and label "
                             "(or answer)")
        image = images / fields["image"]
        if not image.is_file():
            raise ValueError(f"{path}, line {number}: {fields['image']!r} is not in {images} (--images names the folder)")
        questions.append(Question(image, fields["question"], None if missing else normalise(fields["answer"])))
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def _present(value: Optional[str]) -> bool:
    """A TSV cell with something in it (pandas writes a missing value as "nan")."""
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


def mmbench_prompt(row: dict[str, str]) -> str:
    """VLMEvalKit's multiple-choice prompt for a row: hint, question, options, instruction."""
    options = [(letter, row[letter]) for letter in string.ascii_uppercase if _present(row.get(letter))]
    prompt = f"Hint: {row['hint']}\n" if _present(row.get("hint")) else ""
    prompt += f"Question: {row['question']}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options)
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def _load_tsv(path: Path, answers: bool = True) -> list[Question]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    csv.field_size_limit(1 << 30)  # base64 pictures
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    columns = ("index", "question", "answer", "image", "A") if answers else ("index", "question", "image", "A")
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no rows, or no column {', '.join(missing)} (the MMBench / VLMEvalKit layout)")
    pictures = {row["index"]: row["image"] for row in rows}
    questions = []
    for number, row in enumerate(rows, 2):  # line 1 is the header
        encoded = row["image"]
        if len(encoded) <= 64 and encoded.isdigit():  # VLMEvalKit: the picture of the row with that index
            if encoded not in pictures:
                raise ValueError(f"{path}, line {number}: image refers to index {encoded}, which no row has")
            encoded = pictures[encoded]
        try:
            data = base64.b64decode(encoded, validate=True)
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
            raise ValueError(f"{path}, line {number}: the image column is not a base64 picture") from None
        answer = row.get("answer")
        if (answers or _present(answer)) and (not _present(answer) or not _present(row.get(answer.strip()))):
            raise ValueError(f"{path}, line {number}: answer {answer!r} is not one of the row's options")
        questions.append(Question(None, mmbench_prompt(row), normalise(answer) if _present(answer) else None, data=data))
    return questions


MODIFIERS = ("l2", "cosine", "adaptive")  # a method spec's variants of stage 1: "trimtokenator+cosine+adaptive"


def method_spec(spec: str, stage1_ratio: Stage1 = DEFAULT_STAGE1_RATIO) -> tuple[str, str, Stage1]:
    """(method, alignment, stage1_ratio) of a method spec: a method, then optionally ``+l2`` or
    ``+cosine`` (alignment; else the default) and ``+adaptive`` (stage-1 size); ValueError for
    anything else."""
    method, *modifiers = spec.split("+")
    if (method not in METHODS or any(m not in MODIFIERS for m in modifiers) or len(set(modifiers)) < len(modifiers)
            or {"l2", "cosine"} <= set(modifiers)):
        raise ValueError(f"unknown method {spec!r}: a method ({', '.join(METHODS)}), then optionally +l2 or "
                         "+cosine and +adaptive")
    alignment = next((m for m in modifiers if m in ("l2", "cosine")), DEFAULT_ALIGNMENT)
    return method, alignment, ADAPTIVE if "adaptive" in modifiers else stage1_ratio


def normalise(reply: str) -> str:
    """The first word of a reply, lower-cased, without punctuation."""
    words = re.findall(r"[\w']+", reply.lower())
    return words[0] if words else ""


def run(model: str, mmproj: str, questions: Sequence[Question], methods: Sequence[str], keeps: Sequence[int], *,
        chat_format: str = "llava-1-5", n_ctx: int = 2048, threads: Optional[int] = None, max_tokens: int = 4,
        encoder: Optional[dict[str, Any]] = None, on_step: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Asks every question under every (method, keep); `none` runs once (it keeps every row). A method
    may carry variants of stage 1 (:func:`method_spec`). `encoder`: the handler's encoder arguments.

    Per (method, keep): accuracy (None without answers), the replies, and ``seconds``, the mean time
    to the first token less the image encode (which pruning does not change; a picture is encoded
    once and then found in the image cache); with `none` among the methods also ``agreement``, the
    share of replies identical to keep-all's. Every call prefills its whole prompt (no KV reuse
    between calls, which would let a keep of every row skip the image), after one untimed call."""
    handler = HANDLERS[chat_format][1](clip_model_path=mmproj, verbose=False, reuse_kv=False, **(encoder or {}))
    specs = {m: method_spec(m) for m in methods}
    llama = load_llama(model, handler, n_ctx=n_ctx, threads=threads, seed=0)
    if questions:  # loads the mmproj and warms llama.cpp up
        llama.create_chat_completion(messages=image_messages(questions[0].picture(), questions[0].question), max_tokens=1)
    configs = [(m, None) if m == "none" else (m, k) for m in methods for k in ([None] if m == "none" else keeps)]
    right = {c: 0 for c in configs}
    kept = {c: 0 for c in configs}
    seconds = {c: 0.0 for c in configs}
    answers: dict[tuple, list[str]] = {c: [] for c in configs}
    replies: dict[tuple, list[str]] = {c: [] for c in configs}
    for q in questions:
        messages = image_messages(q.picture(), q.question)
        for method, keep in configs:
            handler.method, handler.alignment, handler.stage1_ratio = specs[method]
            handler.keep = keep
            began, first, parts = time.perf_counter(), None, []
            for chunk in llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                      stream=True):
                first = first or time.perf_counter()
                parts.append(chunk["choices"][0]["delta"].get("content") or "")
            seconds[(method, keep)] += first - began - sum(s.encode_seconds for s in handler.last_selection)
            text = "".join(parts).strip()
            replies[(method, keep)].append(text)
            answers[(method, keep)].append(normalise(text))
            right[(method, keep)] += answers[(method, keep)][-1] == q.answer
            kept[(method, keep)] += sum(s.kept for s in handler.last_selection)
            if on_step:
                on_step()
    n = len(questions)
    labelled = all(q.answer is not None for q in questions)
    base = right[("none", None)] / n if labelled and ("none", None) in right else None
    every = replies.get(("none", None))
    results = [{"method": m, "keep": k, "accuracy": right[(m, k)] / n if labelled else None,
                "mean_kept": kept[(m, k)] / n, "relative": right[(m, k)] / n / base if base else None,
                "agreement": None if every is None else sum(a == b for a, b in zip(replies[(m, k)], every)) / n,
                "seconds": seconds[(m, k)] / n, "answers": answers[(m, k)], "replies": replies[(m, k)]}
               for m, k in configs]
    return {"model": model, "mmproj": mmproj, "chat_format": chat_format, "questions": n, "keeps": list(keeps),
            "methods": list(methods), "max_tokens": max_tokens, "machine": machine(), "results": results}


def _grid(result: dict[str, Any], cell: Callable[[dict[str, Any]], str], footer: str) -> str:
    keeps = result["keeps"]
    cells = {(r["method"], r["keep"]): r for r in result["results"]}
    width = max(14, *(len(m) + 2 for m in result["methods"]))
    lines = [f"{'method':<{width}}" + "".join(f"{'keep ' + str(k):>16}" for k in keeps)]
    for method in result["methods"]:
        lines.append(f"{method:<{width}}" + "".join(cell(cells[(method, None if method == 'none' else k)]) for k in keeps))
    lines.append(footer)
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    """Accuracy (and relative to keep-all) per method and budget."""
    def cell(r):
        relative = "" if r["relative"] is None else f"({100 * r['relative']:.0f}%)"
        return f"{100 * r['accuracy']:>9.1f} {relative:>6}"

    relative = ", (relative to keeping every row, method none)" if "none" in result["methods"] else ""
    return _grid(result, cell, f"{result['questions']} questions; accuracy in %{relative}")


def agreement_table(result: dict[str, Any]) -> str:
    """Per method and budget: the share of replies unchanged against keep-all, and how many times
    sooner the first token came (keep-all's mean over this one's, image encodes left out)."""
    every = next(r for r in result["results"] if r["method"] == "none")

    def cell(r):
        return f"{100 * r['agreement']:>8.1f}% {every['seconds'] / r['seconds']:>5.2f}x"

    return _grid(result, cell, f"{result['questions']} questions; per cell: % of replies (greedy, up to "
                               f"{result['max_tokens']} tokens) the same as with every row, then how many times "
                               f"sooner the first token came (every row: {every['seconds']:.3f} s, encode left out)")
