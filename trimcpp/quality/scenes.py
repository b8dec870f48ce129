"""Synthetic scenes and one-word questions whose evidence sits in a few patches.

A scene is a square picture with 3-8 coloured figures (circle, square, triangle) of several sizes,
some small, at random places that do not overlap. Questions, each answered by one word:

- colour:  "What color is the triangle?"            (a kind that occurs once)   -> red
- exists:  "Is there a blue circle?"                                              -> yes / no
- count:   "How many squares are there?"            (1 to 4)                      -> two
- side:    "Is the red circle on the left or right?"  (a unique colour + kind)   -> left / right
- height:  "Is the red circle at the top or bottom?"                              -> top / bottom

Three styles of scene (:data:`STYLES`): ``plain``, the figures on a flat background; ``cluttered``:
9-14 figures, most of them sharing the colour or the kind of the one a question names (one kind
occurs only once, so that colour questions still have an answer), on a textured background strewn
with small marks of every colour that are not figures; ``crowded``: 24-40 figures of about one size
(more than 16-32 kept rows can cover), each look (colour and kind) drawn 1-4 times, several looks
sharing each colour and each kind, and every question names its figures by colour and kind
("How many red circles are there?", "Is the blue square on the left or right?"), so only the rows of
those figures answer it; crowded scenes have no colour questions (each kind is drawn many times).

Everything follows from a seed, so train / validation / test splits come from disjoint seed
ranges. :func:`write_split` writes a split as PNG files plus ``questions.json``, the format
``trimcpp eval`` reads: a list of ``{"image": "00000.png", "question": ..., "answer": ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 210, 40),
          "white": (245, 245, 245), "black": (20, 20, 20)}
KINDS = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
ANSWERS = (*COLORS, "yes", "no", *NUMBERS[1:], "left", "right", "top", "bottom")
QUESTION_KINDS = ("colour", "exists", "count", "side", "height")
STYLES = ("plain", "cluttered", "crowded")


@dataclasses.dataclass(frozen=True)
class Figure:
    kind: str
    color: str
    x: float  # centre, pixels
    y: float
    r: float  # half the side / radius


def scene(rng: np.random.Generator, size: int = 224, style: str = "plain") -> tuple[Image.Image, list[Figure]]:
    """A picture and the figures drawn on it (`style`: one of :data:`STYLES`)."""
    if style == "cluttered":
        return _cluttered(rng, size)
    if style == "crowded":
        return _crowded(rng, size)
    if style != "plain":
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    background = tuple(int(c) for c in rng.integers(90, 170, 3))  # flat: the test split's PNGs stay small
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    figures = _place(rng, size, int(rng.integers(3, 9)), lambda: (str(rng.choice(KINDS)), str(rng.choice(list(COLORS)))))
    for s in figures:
        _draw(draw, s, COLORS[s.color])
    return image, figures


def _place(rng: np.random.Generator, size: int, count: int, look, radius=None, gap: float = 4) -> list[Figure]:
    """`count` figures at random places that do not overlap (one that finds no place in 50 tries is
    left out), each of the (kind, colour) that `look()` draws once it has its place; `radius()` draws
    a size (default: small or large, 6-26 px) and `gap` is the least space between two figures."""
    figures: list[Figure] = []
    for _ in range(count):
        for _attempt in range(50):
            r = float(radius() if radius else rng.choice([rng.uniform(6, 11), rng.uniform(11, 26)]))
            x, y = rng.uniform(r + 2, size - r - 2, 2)
            if all((x - s.x) ** 2 + (y - s.y) ** 2 > (r + s.r + gap) ** 2 for s in figures):
                figures.append(Figure(*look(), float(x), float(y), r))
                break
    return figures


def _cluttered(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[Figure]]:
    """The ``cluttered`` style: a textured background, small marks, 9-14 figures mostly alike."""
    base = rng.integers(90, 170, 3).astype(float)
    y, x = np.mgrid[0:size, 0:size] / size
    waves = np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(0, 1)))[..., None] * rng.uniform(-25, 25, 3)
    pixels = base + waves + (y[..., None] - 0.5) * rng.uniform(-40, 40, 3) + rng.normal(0, 8, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = list(COLORS)
    for _ in range(int(rng.integers(25, 45))):  # marks: dots and short strokes, 1-3 px, any colour
        mx, my = rng.uniform(0, size, 2)
        fill = COLORS[colours[int(rng.integers(len(colours)))]]
        if rng.random() < 0.5:
            r = float(rng.uniform(1.5, 3.5))
            draw.ellipse([mx - r, my - r, mx + r, my + r], fill=fill)
        else:
            dx, dy = rng.uniform(-9, 9, 2)
            draw.line([mx, my, mx + dx, my + dy], fill=fill, width=int(rng.integers(1, 4)))
    # Two colours and two kinds make most figures; one kind occurs once.
    rare, *common = [KINDS[i] for i in rng.permutation(len(KINDS))]
    palette = [colours[i] for i in rng.permutation(len(colours))]
    looks = [(rare, str(rng.choice(palette)))]
    for _ in range(int(rng.integers(8, 14))):
        color = palette[int(rng.integers(2))] if rng.random() < 0.7 else str(rng.choice(palette))
        looks.append((str(rng.choice(common)), color))
    looks = [looks[i] for i in rng.permutation(len(looks))]
    figures = _place(rng, size, len(looks), iter(looks).__next__)
    for s in figures:
        _draw(draw, s, COLORS[s.color])
    return image, figures


def _crowded(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[Figure]]:
    """The ``crowded`` style: 24-40 figures of radius 7-10 px on a flat background, each look (colour
    and kind) 1-4 times; the looks not drawn are the "no" answers."""
    background = tuple(int(c) for c in rng.integers(90, 170, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    every = [(k, c) for c in COLORS for k in KINDS]
    total, looks = int(rng.integers(24, 41)), []
    for i in rng.permutation(len(every)):
        if len(looks) >= total:
            break
        looks += [every[i]] * int(rng.integers(1, 5))
    looks = [looks[i] for i in rng.permutation(len(looks))][:total]
    figures = _place(rng, size, len(looks), iter(looks).__next__, radius=lambda: rng.uniform(7, 10), gap=3)
    for s in figures:
        _draw(draw, s, COLORS[s.color])
    return image, figures


def _draw(draw: ImageDraw.ImageDraw, s: Figure, fill) -> None:
    box = [s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r]
    if s.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif s.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)


def questions(rng: np.random.Generator, figures: list[Figure], size: int = 224, n: int = 8,
              style: str = "plain") -> list[tuple[str, str]]:
    """Up to `n` distinct (question, answer) pairs about `figures`, taking the five kinds in turn
    (in a random order) so that each kind is about equally frequent. ``crowded``: counts of a colour
    and kind ("How many red circles are there?") instead of a kind, and no colour questions."""
    kinds = [s.kind for s in figures]
    pairs = [(s.color, s.kind) for s in figures]
    unique = [s for s in figures if pairs.count((s.color, s.kind)) == 1]
    present = sorted(set(pairs))
    absent = sorted({(c, k) for c in COLORS for k in KINDS} - set(pairs))
    by_kind = {
        "colour": [(f"What color is the {s.kind}?", s.color) for s in figures if kinds.count(s.kind) == 1],
        "count": [(f"How many {k}s are there?", NUMBERS[kinds.count(k)]) for k in KINDS if 1 <= kinds.count(k) <= 4],
        "side": [(f"Is the {s.color} {s.kind} on the left or right?", "left" if s.x < size / 2 else "right")
                 for s in unique if abs(s.x - size / 2) > s.r + 6],
        "height": [(f"Is the {s.color} {s.kind} at the top or bottom?", "top" if s.y < size / 2 else "bottom")
                   for s in unique if abs(s.y - size / 2) > s.r + 6],
        "exists": [(f"Is there a {c} {k}?", "yes" if (c, k) in present else "no") for c, k in present + absent],
    }
    if style == "crowded":
        del by_kind["colour"]
        by_kind["count"] = [(f"How many {c} {k}s are there?", NUMBERS[pairs.count((c, k))]) for c, k in present]
    for name in by_kind:
        by_kind[name] = [by_kind[name][i] for i in rng.permutation(len(by_kind[name]))]
    yes = [qa for qa in by_kind["exists"] if qa[1] == "yes"]
    no = [qa for qa in by_kind["exists"] if qa[1] == "no"]
    first = int(rng.integers(2))  # exists: yes and no alternate, starting at random
    by_kind["exists"] = [x for pair in zip(*((yes, no) if first else (no, yes))) for x in pair]
    chosen: list[tuple[str, str]] = []
    order = [list(by_kind)[i] for i in rng.permutation(len(by_kind))]
    while len(chosen) < n and any(by_kind.values()):
        for name in order:
            if by_kind[name] and len(chosen) < n:
                chosen.append(by_kind[name].pop(0))
    return chosen


def question_kind(question: str) -> str:
    """Which of `QUESTION_KINDS` a question of :func:`questions` is."""
    for start, name in (("What color", "colour"), ("How many", "count"), ("Is there", "exists")):
        if question.startswith(start):
            return name
    return "side" if question.endswith("left or right?") else "height"


def patch_labels(figures: list[Figure], size: int = 224, patch: int = 14) -> np.ndarray:
    """(size / patch)^2 class ids, row-major: 0 for background, else 1 + 3 * colour + kind of the
    figure with most pixels in that patch (dense labels for pretraining a vision tower)."""
    ids = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ids)
    colours = list(COLORS)
    for s in figures:
        _draw(draw, s, 1 + 3 * colours.index(s.color) + KINDS.index(s.kind))
    g = size // patch
    blocks = np.asarray(ids)[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    counts = np.stack([(blocks == c).sum(axis=1) for c in range(1 + 3 * len(colours))], axis=1)
    counts[:, 0] = 0
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), 0)


def evidence(question: str, labels: np.ndarray) -> np.ndarray:
    """Which patches (by `patch_labels` of the picture) show the figures that `question` is about:
    the named kind for colour and count questions, the named colour and kind for the others. All
    False for a question about nothing drawn (or not a question of :func:`questions`)."""
    words = question.rstrip("?").split()
    colours, shown = list(COLORS), labels > 0
    kind_of, colour_of = (labels - 1) % 3, (labels - 1) // 3
    if question.startswith("How many") and words[2] in COLORS:  # crowded: "How many red circles are there"
        return shown & (kind_of == KINDS.index(words[3][:-1])) & (colour_of == colours.index(words[2]))
    if question.startswith(("What color is the", "How many")):
        kind = words[-1] if words[0] == "What" else words[2][:-1]
        return shown & (kind_of == KINDS.index(kind))
    if question.startswith(("Is the", "Is there a")):
        colour, kind = (words[2], words[3]) if words[1] == "the" else (words[3], words[4])
        return shown & (kind_of == KINDS.index(kind)) & (colour_of == colours.index(colour))
    return np.zeros(labels.shape, dtype=bool)


Scene = tuple[Image.Image, list[Figure], list[tuple[str, str]]]  # picture, figures, (question, answer) pairs


def split(seed: int, images: int, size: int = 224, per_image: int = 8, style: str = "plain") -> Iterator[Scene]:
    """`images` scenes (picture, figures, questions); scene i comes from seed (seed, i) (``cluttered``:
    seed (seed, i, 1); ``crowded``: (seed, i, 2); so the styles never share a random stream)."""
    for i in range(images):
        rng = np.random.default_rng([seed, i] if style == "plain" else [seed, i, STYLES.index(style)])
        image, figures = scene(rng, size, style)
        yield image, figures, questions(rng, figures, size, per_image, style)


def write_split(folder: os.PathLike | str, seed: int, images: int, size: int = 224, per_image: int = 3,
                style: str = "plain") -> Path:
    """Writes `images` scenes as PNG files and their questions to ``questions.json`` in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, _, pairs) in enumerate(split(seed, images, size, per_image, style)):
        name = f"{i:05d}.png"
        image.save(folder / name, optimize=True)
        records += [{"image": name, "question": q, "answer": a} for q, a in pairs]
    (folder / "questions.json").write_text(json.dumps(records, indent=1))
    (folder / "split.json").write_text(json.dumps({"seed": seed, "images": images, "size": size, "per_image": per_image,
                                                   "style": style}))
    return folder


def split_of(folder: os.PathLike | str, default_seed: int) -> dict:
    """How a folder's split was written (``split.json``); for a folder without one, the plain split of
    `default_seed` (the bundled test split predates the file)."""
    meta = Path(folder) / "split.json"
    return json.loads(meta.read_text()) if meta.is_file() else {"seed": default_seed, "style": "plain"}
