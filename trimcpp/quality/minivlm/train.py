"""Training the mini VLM: batches in the stock handler's token layout, the training aids' losses,
and the loop that runs one named stage (:mod:`.stages`) and exports the pair.

Training sees the same token sequence as the stock ``Llava15ChatHandler`` builds (the template's
text chunks are taken from libmtmd itself), with the image rows in place of the marker, and learns
the one-word answer token followed by ``</s>``. In a share of the steps the LLM sees fewer image
rows (every row that shows a figure, plus background rows drawn at random: :func:`kept_rows`), so
that a pruned image's shorter, shifted sequence is not new to it. Several questions share one
image: the system text and image rows are computed once and each question attends to them (exact,
since attention is causal). The other training aids (the encoder's patch classes, the rows'
readout as words, the attention supervision of one LLM head: see :class:`MiniVLM`) live only in
the loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import scenes
from .model import EOS, WATCH, MiniVLM, export, grid_positions, load_gguf, pixels, rms
from .stages import MINI, SEEDS, Stage
from .template import Template


def batch(template: Template, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, tokens B x Q x L, target ids B x Q x L, target mask) for a list of (image, [(q, a)...]):
    the answer's tokens (one for a one-word answer, more for a description), then </s>, are the targets."""
    q_count = max(len(pairs) for _, pairs in items)
    seqs = [[(template.after(q), template.answer_tokens(a)) for q, a in pairs] for _, pairs in items]
    length = max(len(p) + len(a) for group in seqs for p, a in group)
    tokens = torch.zeros(len(items), q_count, length, dtype=torch.long)
    targets = torch.zeros_like(tokens)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, group in enumerate(seqs):
        for j, (prompt, answer) in enumerate(group):
            n = len(prompt) + len(answer)
            tokens[i, j, :n] = torch.tensor(prompt + answer)
            targets[i, j, len(prompt) - 1: n] = torch.tensor(answer + [EOS])
            mask[i, j, len(prompt) - 1: n] = True
    return pixels([im for im, _ in items]), tokens, targets, mask


def description(figures: list[scenes.Figure]) -> list[tuple[str, str]]:
    """A training-only caption (LLaVA's first stage aligns image rows with captions): every figure's
    colour and kind, left to right; none for a crowded scene (its 24-40 figures would make every
    question of the batch as long as the caption)."""
    if len(figures) > 14:
        return []
    return [("Describe the image.", " ".join(f"{s.color} {s.kind}" for s in sorted(figures, key=lambda s: s.x)))]


def attention_loss(watched: torch.Tensor, mask: torch.Tensor, drawn: list, labels: torch.Tensor,
                   kept: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Training only: -log of the attention weight that head 0 of the watched layer gives, at the
    position that predicts each answer, to the rows showing the figures its question is about
    (`scenes.evidence`), averaged over the questions about something drawn. `offset`: prompt ids before
    the image rows. A training aid like the row readout: llama.cpp runs the plain model."""
    losses = []
    for i, (_, _, pairs) in enumerate(drawn):
        for j, (question, _) in enumerate(pairs):
            shown = scenes.evidence(question, labels[i].numpy())
            rows = np.flatnonzero(shown if kept is None else shown[kept[i].numpy()])  # among the rows seen
            if len(rows):
                position = int(mask[i, j].nonzero()[0])
                losses.append(-torch.log(watched[i, j, 0, position, offset + torch.from_numpy(rows)].sum() + 1e-6))
    return torch.stack(losses).mean() if losses else watched.sum() * 0


def kept_rows(labels: torch.Tensor, rng: np.random.Generator, share: float = 0.6) -> torch.Tensor | None:
    """Training only, for robustness to fewer rows: None (all rows) in 1 - `share` of the steps, else
    B x K row indices, ascending: every row that shows a figure plus background rows drawn at random
    up to one K for the batch (K between the most figure rows of any picture and all of them). The
    rows that answer the questions always stay, so no selection method is taught, only shorter
    and shifted image sequences."""
    if rng.random() >= share:
        return None
    shown = labels > 0
    n = labels.shape[1]
    k = int(rng.integers(max(32, int(shown.sum(1).max())), n + 1))
    out = []
    for row in shown.numpy():
        background = np.flatnonzero(~row)
        extra = rng.choice(background, k - int(row.sum()), replace=False)
        out.append(np.sort(np.concatenate([np.flatnonzero(row), extra])))
    return torch.from_numpy(np.stack(out)).long()


def predict(model: MiniVLM, template: Template, items: list, before: torch.Tensor) -> list[list[str]]:
    """Greedy one-token answers (as words) for each question of each item."""
    words = {template.answer(w): w for w in scenes.ANSWERS}
    x, tokens, _, mask = batch(template, [(im, [(q, "yes") for q in qs]) for im, qs in items])
    with torch.no_grad():
        h, _ = model.hidden(x, before, tokens)
        logits = model.llm.output(h)
    out = []
    for i, (_, qs) in enumerate(items):
        row = []
        for j in range(len(qs)):
            position = int(mask[i, j].nonzero()[0])
            token = int(logits[i, j, position].argmax())
            row.append(words.get(token, template.llama.detokenize([token]).decode(errors="replace").strip()))
        out.append(row)
    return out


def train(stage: Stage, out: Path, start: Path | None = None, images_per_step: int = 8, questions: int = 12,
          every: int = 100) -> None:
    """Runs `stage` and exports the pair to `out` (with ``minivlm.pt`` and ``training.json``).

    `start` is the folder of the stage it goes on from (its GGUF pair, or its ``minivlm.pt`` when
    ``stage.from_checkpoint``); None starts from random weights. ``stage.position_boost`` adds that
    multiple of :func:`grid_positions` to the encoder's position embeddings first (they are too
    weak next to the patch embeddings for the rows to learn their side and height)."""
    torch.manual_seed(stage.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = MiniVLM()
    if start is not None and stage.from_checkpoint:
        model.load_state_dict(torch.load(start / "minivlm.pt"))
    elif start is not None:
        load_gguf(model, start)
    if stage.position_boost:
        with torch.no_grad():
            model.vision.pos += stage.position_boost * grid_positions(MINI.image_size // MINI.patch_size, MINI.v_embd)
    print(f"{stage.name}: {stage.why}; parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
          flush=True)
    out.mkdir(parents=True, exist_ok=True)
    initial = export(model, out / "untrained")  # for the template's tokeniser (same vocabulary)
    template = Template(*map(str, initial))
    before = torch.tensor(template.before)
    colour_ids = torch.tensor([template.answer(c) for c in scenes.COLORS])
    kind_ids = torch.tensor([template.answer(k) for k in scenes.KINDS])
    # a row that shows a figure has at least one of its kind: "zero" (not an answer word) is never a target
    number_ids = torch.tensor([template.answer(n) if n != "zero" else 0 for n in scenes.NUMBERS])
    grid = MINI.image_size // MINI.patch_size  # a patch's half of the picture, as a word id
    column, line = torch.arange(grid * grid) % grid, torch.arange(grid * grid) // grid
    side_ids = torch.where(column < grid // 2, template.answer("left"), template.answer("right"))
    height_ids = torch.where(line < grid // 2, template.answer("top"), template.answer("bottom"))
    side_pair = torch.tensor([template.answer("left"), template.answer("right")])
    height_pair = torch.tensor([template.answer("top"), template.answer("bottom")])
    rng = np.random.default_rng(stage.seed)
    validation = {style: [(im, qa) for im, _, qa in scenes.split(SEEDS["validation"], 60, MINI.image_size, 4, style)]
                  for style in stage.styles()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.01, betas=(0.9, 0.98))
    began, step, log = time.time(), 0, []
    styles = {style: scenes.split(SEEDS["train"] + stage.seed, 10**9, MINI.image_size, questions, style)  # seed < 1000
              for style in scenes.STYLES}
    style_rng = np.random.default_rng([stage.seed, 1])  # its own stream: the other draws stay as they were
    while (elapsed := time.time() - began) < stage.minutes * 60 and (stage.steps is None or step < stage.steps):
        fraction = elapsed / (stage.minutes * 60)
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * fraction))
        drawn = [next(styles[stage.style(style_rng)]) for _ in range(images_per_step)]
        x, tokens, targets, mask = batch(template, [(im, qa + description(figures)) for im, figures, qa in drawn])
        labels = torch.from_numpy(np.stack([scenes.patch_labels(figures, MINI.image_size, MINI.patch_size)
                                            for _, figures, _ in drawn]))
        features = model.vision.features(x)
        kept = kept_rows(labels, rng, stage.row_share)
        hidden, watched = model.hidden(x, before, tokens, features, kept, watch=WATCH if stage.attend else None)
        answer_loss = F.cross_entropy(model.llm.output(hidden[mask]), targets[mask])
        flat = labels.flatten()
        loss = answer_loss + stage.aux * F.cross_entropy(model.vision.aux(features).flatten(0, 1), flat)
        shown = flat > 0
        if shown.any():
            row_logits = model.llm.output(rms(model.vision.project(features).flatten(0, 1)[shown], model.llm.norm))
            words, at = torch.zeros_like(row_logits), torch.arange(len(row_logits))
            flat_rows = torch.arange(len(flat))[shown]
            where = flat_rows % (grid * grid)
            kinds = (flat[shown] - 1) % 3
            how_many = torch.tensor([[sum(s.kind == k for s in figures) for k in scenes.KINDS]
                                     for _, figures, _ in drawn])
            count = how_many[flat_rows // (grid * grid), kinds]
            colours = (flat[shown] - 1) // 3
            readout = {"colour": colour_ids[colours], "kind": kind_ids[kinds], "side": side_ids[where],
                       "height": height_ids[where]}
            for name, ids in readout.items():
                if name in stage.readout:
                    words[at, ids] = 1.0
            countable = count <= 4
            if "count" in stage.readout:
                words[at[countable], number_ids[count[countable]]] = 1.0
            loss = loss + stage.aux * F.cross_entropy(row_logits, words / words.sum(1, keepdim=True))
            # and each attribute among its own words, a sharper signal for the ones the encoder
            # must work out (side and height from its position codes, the count from the picture)
            for options, truth, rows in ((colour_ids, colours, at), (kind_ids, kinds, at),
                                         (side_pair, (side_ids[where] == side_pair[1]).long(), at),
                                         (height_pair, (height_ids[where] == height_pair[1]).long(), at),
                                         (number_ids[1:], count[countable] - 1, at[countable])):
                if stage.attributes and len(rows):
                    loss = loss + stage.attributes * F.cross_entropy(row_logits[rows][:, options], truth)
        if stage.attend:
            attend_loss = attention_loss(watched, mask, drawn, labels, kept, len(before))
            loss = loss + stage.attend * attend_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % every == 0:
            model.eval()
            scores = {}
            for style, items in validation.items():
                got = predict(model, template, [(im, [q for q, _ in qa]) for im, qa in items], before)
                right = [(scenes.question_kind(q), g == a) for row, (_, qa) in zip(got, items)
                         for g, (q, a) in zip(row, qa)]
                suffix = "" if style == "plain" else "_" + style
                scores["validation" + suffix] = float(np.mean([ok for _, ok in right]))
                scores.update({k + suffix: float(np.mean([ok for kind, ok in right if kind == k]))
                               for k in scenes.QUESTION_KINDS if any(kind == k for kind, _ in right)})
            model.train()
            log.append({"step": step, "minutes": elapsed / 60, "loss": answer_loss.item(),
                        "attend_loss": attend_loss.item() if stage.attend else None, **scores})
            print(json.dumps(log[-1]), flush=True)
            torch.save(model.state_dict(), out / "minivlm.pt")
    torch.save(model.state_dict(), out / "minivlm.pt")
    export(model, out)
    (out / "training.json").write_text(json.dumps({"stage": dataclasses.asdict(stage), "steps": step,
                                                   "images_per_step": images_per_step, "questions_per_image": questions,
                                                   "log": log}, indent=1))
