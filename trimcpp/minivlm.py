"""A LLaVA-1.5 in miniature, trained by the project on trimcpp.scenes, for the quality benchmark.

Not a dependency of trimcpp: rebuilding needs PyTorch (``pip install torch==2.13.0``, CPU).

    python -m trimcpp.minivlm train --out trimcpp/data/minivlm --minutes 35
    python -m trimcpp.minivlm agree --out trimcpp/data/minivlm --data trimcpp/data/scenes-test

The architecture is exactly what libmtmd and llama.cpp compute for a LLaVA-1.5 GGUF pair, so the
exported files load unchanged:

- vision: 14-pixel patches of a 224-pixel picture (256 rows), a CLIP ViT without class token
  (position embeddings, pre-layernorm, pre-norm blocks with biases and quick-GELU MLPs), then the
  ``mlp`` projector (linear, tanh-GELU, linear). libmtmd runs every layer of the file but the last,
  so the mmproj carries one unused layer more than the model has.
- LLM: llama (RMSNorm, rotary positions in ggml's "normal" pairing, SwiGLU), with the generated
  vocabulary of :mod:`trimcpp.testing`.

Training sees the same token sequence as the stock ``Llava15ChatHandler`` builds (the template's
text chunks are taken from libmtmd itself), with the image rows in place of the marker, and learns
the one-word answer token followed by ``</s>``. In 60% of the steps the LLM sees fewer image rows
(every row that shows a shape, plus background rows drawn at random: :func:`kept_rows`), so that a
pruned image's shorter, shifted sequence is not new to it. Several questions share one image: the
system text and image rows are computed once and each question attends to them (exact, since
attention is causal). The other training aids (the encoder's patch classes, the rows' readout as
words, the attention supervision of one LLM head: see :class:`MiniVLM`) live only in the loss.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import scenes
from .cli import _quiet, image_messages
from .testing import Shape, write_llm, write_mmproj

SHAPE = Shape(n_embd=192, n_layer=4, n_head=4, n_ff=512, n_vocab=2048, weight_type="f16",
              image_size=224, patch_size=14, v_embd=128, v_layer=5, v_head=4, v_ff=512, v_type="f16",
              n_ctx_train=1024)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
SEEDS = {"train": 1000, "validation": 2000, "test": 3000}  # scenes.split seeds: disjoint scene sets
EOS = 2
WATCH = 1  # the LLM layer whose head 0 training teaches to look at a question's shapes


class Block(nn.Module):
    """CLIP encoder layer as clip.cpp's llava graph runs it."""

    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width, eps=1e-5), nn.LayerNorm(width, eps=1e-5)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, ff), nn.Linear(ff, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        u = self.up(self.ln2(x))
        return x + self.down(u * torch.sigmoid(1.702 * u))


class Vision(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.patch = nn.Conv2d(3, s.v_embd, s.patch_size, s.patch_size, bias=False)
        self.pos = nn.Parameter(torch.randn(s.patches, s.v_embd) * 0.02)
        self.pre_ln = nn.LayerNorm(s.v_embd, eps=1e-5)
        self.blocks = nn.ModuleList(Block(s.v_embd, s.v_head, s.v_ff) for _ in range(s.v_layer - 1))
        self.mm0, self.mm2 = nn.Linear(s.v_embd, s.n_embd), nn.Linear(s.n_embd, s.n_embd)
        self.aux = nn.Linear(s.v_embd, 1 + 3 * len(scenes.COLORS))  # training only: patch labels

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalised pixels -> B x patches x v_embd encoder output."""
        x = self.pre_ln(self.patch(pixels).flatten(2).transpose(1, 2) + self.pos)
        for block in self.blocks:
            x = block(x)
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output -> image rows for the LLM (the ``mlp`` projector)."""
        return self.mm2(F.gelu(self.mm0(x), approximate="tanh"))


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """ggml's normal rotary mode: pairs (2i, 2i+1) turn by position * 10000^(-2i/d). x: ... x n x d."""
    d = x.shape[-1]
    angle = positions[:, None].float() * 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Layer(nn.Module):
    """llama block: RMSNorm, attention with rotary positions, RMSNorm, SwiGLU."""

    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ffn_norm = nn.Parameter(torch.ones(width)), nn.Parameter(torch.ones(width))
        self.attn_q, self.attn_k, self.attn_v, self.attn_output = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.ffn_gate, self.ffn_up = nn.Linear(width, ff, bias=False), nn.Linear(width, ff, bias=False)
        self.ffn_down = nn.Linear(ff, width, bias=False)

    def qkv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = rms(h, self.attn_norm)
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(-3, -2) for f in (self.attn_q, self.attn_k, self.attn_v))
        return rope(q, positions), rope(k, positions), v  # ... x heads x n x head size

    def finish(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        h = h + self.attn_output(attended.transpose(-3, -2).flatten(-2))
        x = rms(h, self.ffn_norm)
        return h + self.ffn_down(F.silu(self.ffn_gate(x)) * self.ffn_up(x))


class Llama(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.embed = nn.Embedding(s.n_vocab, s.n_embd)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(Layer(s.n_embd, s.n_head, s.n_ff) for _ in range(s.n_layer))
        self.norm = nn.Parameter(torch.ones(s.n_embd))
        self.output = nn.Linear(s.n_embd, s.n_vocab, bias=False)
        self.output.weight = self.embed.weight  # tied (exported as both token_embd and output)

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor,
                watch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prefix: B x P x e input rows; tokens: B x Q x L ids that follow the prefix (each of the Q
        continuations sees the prefix, not the others). Returns the final hidden states B x Q x L x e
        and, when `watch` names a layer, that layer's attention weights of the tokens, B x Q x heads x
        L x (P + L) (else None)."""
        b, p, _ = prefix.shape
        q_count, length = tokens.shape[1:]
        hp, hq = prefix, self.embed(tokens)
        pos_p, pos_q = torch.arange(p), p + torch.arange(length)
        mask = torch.cat([torch.ones(length, p, dtype=torch.bool), torch.ones(length, length, dtype=torch.bool).tril()], 1)
        watched = None
        for i, layer in enumerate(self.layers):
            qp, kp, vp = layer.qkv(hp, pos_p)
            qq, kq, vq = layer.qkv(hq, pos_q)
            keys = torch.cat([kp[:, None].expand(b, q_count, *kp.shape[1:]), kq], dim=-2)
            values = torch.cat([vp[:, None].expand(b, q_count, *vp.shape[1:]), vq], dim=-2)
            if i == watch:
                scores = (qq @ keys.transpose(-1, -2)) / math.sqrt(qq.shape[-1])
                watched = scores.masked_fill(~mask, float("-inf")).softmax(-1)
                attended = watched @ values
            else:
                attended = F.scaled_dot_product_attention(qq, keys, values, attn_mask=mask)
            hp, hq = (layer.finish(hp, F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)),
                      layer.finish(hq, attended))
        return rms(hq, self.norm), watched


class MiniVLM(nn.Module):
    """Vision tower + projector + LLM. Besides the answers, training supervises the encoder with
    each patch's shape class (`Vision.aux`, not exported), standing in for CLIP's pretraining; asks
    each projected row that shows a shape to read, through the LLM's (tied) output head, as that
    shape's colour, kind, side, height and count words, standing in for LLaVA's caption
    pretraining; and teaches head 0 of LLM layer `WATCH` to look, from the position that predicts
    the answer, at the rows of the shapes the question names (`attention_loss`)."""

    def __init__(self, shape: Shape = SHAPE):
        super().__init__()
        self.shape = shape
        self.vision, self.llm = Vision(shape), Llama(shape)

    def hidden(self, pixels: torch.Tensor, before: torch.Tensor, tokens: torch.Tensor,
               features: torch.Tensor | None = None, kept: torch.Tensor | None = None,
               watch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final LLM states for `tokens` after the prompt and the image rows (only rows `kept`, B x K
        ascending indices, when given: what a pruning handler hands the LLM), and layer `watch`'s
        attention weights (see `Llama.forward`)."""
        rows = self.vision.project(self.vision.features(pixels) if features is None else features)
        if kept is not None:
            rows = rows.gather(1, kept[..., None].expand(-1, -1, rows.shape[-1]))
        prefix = torch.cat([self.llm.embed(before).expand(rows.shape[0], -1, -1), rows], dim=1)
        return self.llm(prefix, tokens, watch)


def grid_positions(grid: int, width: int) -> torch.Tensor:
    """grid^2 x width fixed 2-D sine-cosine position codes (half the width for the column, half for
    the line), row-major like the patches, values in [-1, 1]."""
    frequencies = 1.0 / 100.0 ** (torch.arange(width // 4).float() / (width // 4))
    at = torch.arange(grid).float()[:, None] * frequencies
    axis = torch.cat([at.sin(), at.cos()], dim=1)  # grid x width / 2
    line, column = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([axis[column.flatten()], axis[line.flatten()]], dim=1)


def pixels(images: Sequence) -> torch.Tensor:
    """PIL pictures (already the encoder's size) as libmtmd normalises them."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float()
    return (x / 255.0 - MEAN) / STD


class Template:
    """Token ids of the stock LLaVA-1.5 prompt around the image, as libmtmd tokenises it."""

    def __init__(self, llm_path: str, mmproj_path: str):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd_cpp
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        _quiet(False)
        self._mtmd = mtmd_cpp
        handler = Llava15ChatHandler(clip_model_path=mmproj_path, verbose=False)
        self.llama = llama_cpp.Llama(model_path=llm_path, chat_handler=handler, n_ctx=1024, verbose=False)
        handler._mtmd_cpp = self
        self.handler, self._cache = handler, {}
        self.before, _ = self._capture("x")

    def __getattr__(self, name: str):
        return getattr(self._mtmd, name)

    def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n_bitmaps):
        status = self._mtmd.mtmd_tokenize(ctx, chunks, text, bitmaps, n_bitmaps)
        parts: list[list[int]] = [[]]
        for i in range(self._mtmd.mtmd_input_chunks_size(chunks)):
            chunk = self._mtmd.mtmd_input_chunks_get(chunks, i)
            if self._mtmd.mtmd_input_chunk_get_type(chunk) == self._mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                parts.append([])
                continue
            n = ctypes.c_size_t()
            ids = self._mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            parts[-1] += [ids[j] for j in range(n.value)]
        if status != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({status})")
        raise _Captured(parts)

    def _capture(self, question: str) -> tuple[list[int], list[int]]:
        buffer = io.BytesIO()
        Image.new("RGB", (SHAPE.image_size, SHAPE.image_size)).save(buffer, "PNG")
        try:
            self.llama.create_chat_completion(messages=image_messages(buffer.getvalue(), question), max_tokens=1)
        except _Captured as done:
            before, after = done.parts
            return before, after
        raise RuntimeError("libmtmd's tokenisation was not captured")

    def after(self, question: str) -> list[int]:
        """The ids between the image rows and the answer: the question and the generation prompt."""
        if question not in self._cache:
            self._cache[question] = self._capture(question)[1]
        return self._cache[question]

    def answer(self, word: str) -> int:
        [token] = self.answer_tokens(word)
        return token

    def answer_tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=False, special=False)


class _Captured(Exception):
    """Stops the stock handler once libmtmd has tokenised the prompt."""

    def __init__(self, parts: list[list[int]]):
        super().__init__("captured")
        self.parts = parts


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


def description(shapes: list[scenes.Figure]) -> tuple[str, str]:
    """A training-only caption (LLaVA's first stage aligns image rows with captions): every shape's
    colour and kind, left to right."""
    return "Describe the image.", " ".join(f"{s.color} {s.kind}" for s in sorted(shapes, key=lambda s: s.x))


def attention_loss(watched: torch.Tensor, mask: torch.Tensor, drawn: list, labels: torch.Tensor,
                   kept: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Training only: -log of the attention weight that head 0 of the watched layer gives, at the
    position that predicts each answer, to the rows showing the shapes its question is about
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
    B x K row indices, ascending: every row that shows a shape plus background rows drawn at random
    up to one K for the batch (K between the most shape rows of any picture and all of them). The
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


_VISION_BLOCK = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_out": "o", "ln1": "ln1", "ln2": "ln2",
                 "ffn_up": "up", "ffn_down": "down"}


def _names(s: Shape) -> dict[str, str]:
    """GGUF tensor name -> state_dict key, for every trained tensor (not the aux head; not the
    mmproj's last layer, which libmtmd never runs and which is written as zeros)."""
    names = {"token_embd.weight": "llm.embed.weight", "output_norm.weight": "llm.norm",
             "output.weight": "llm.output.weight", "v.patch_embd.weight": "vision.patch.weight",
             "v.position_embd.weight": "vision.pos", "v.pre_ln.weight": "vision.pre_ln.weight",
             "v.pre_ln.bias": "vision.pre_ln.bias", "mm.0.weight": "vision.mm0.weight", "mm.0.bias": "vision.mm0.bias",
             "mm.2.weight": "vision.mm2.weight", "mm.2.bias": "vision.mm2.bias"}
    for i in range(s.n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            names[f"blk.{i}.{name}.weight"] = f"llm.layers.{i}.{name}.weight"
        for name in ("attn_norm", "ffn_norm"):
            names[f"blk.{i}.{name}.weight"] = f"llm.layers.{i}.{name}"
    for i in range(s.v_layer - 1):
        for gguf_name, torch_name in _VISION_BLOCK.items():
            for part in ("weight", "bias"):
                names[f"v.blk.{i}.{gguf_name}.{part}"] = f"vision.blocks.{i}.{torch_name}.{part}"
    return names


def export(model: MiniVLM, folder: Path) -> tuple[Path, Path]:
    """Writes ``llm.gguf`` and ``mmproj.gguf`` (F16 matrices) into `folder`."""
    s = model.shape
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {g: sd[k] for g, k in _names(s).items()}
    llm = {g: v for g, v in tensors.items() if not g.startswith(("v.", "mm."))}
    vision = {g: v for g, v in tensors.items() if g.startswith(("v.", "mm."))}
    for gguf_name, torch_name in _VISION_BLOCK.items():  # the layer libmtmd skips
        for part in ("weight", "bias"):
            vision[f"v.blk.{s.v_layer - 1}.{gguf_name}.{part}"] = np.zeros_like(sd[f"vision.blocks.0.{torch_name}.{part}"])
    folder.mkdir(parents=True, exist_ok=True)
    return (write_llm(folder / "llm.gguf", s, weights=llm),
            write_mmproj(folder / "mmproj.gguf", s, class_token=False, weights=vision))


def load_gguf(model: MiniVLM, folder: Path) -> None:
    """Loads the weights of an exported pair (to go on training from it; the aux head stays as is)."""
    import gguf

    names, state = _names(model.shape), model.state_dict()
    for file in ("llm.gguf", "mmproj.gguf"):
        for tensor in gguf.GGUFReader(str(folder / file)).tensors:
            if tensor.name in names:
                key = names[tensor.name]
                state[key] = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(state[key].shape)
    model.load_state_dict(state)


def train(out: Path, minutes: float, images_per_step: int = 8, questions: int = 12, lr: float = 2e-3, seed: int = 0,
          aux_weight: float = 0.5, start: Path | None = None, row_share: float = 0.6, attend_weight: float = 0.5,
          position_boost: float = 0.0, attribute_weight: float = 0.5, steps: int | None = None,
          every: int = 100) -> None:
    """Trains for `minutes` (from the exported pair in `start`, or a ``minivlm.pt`` checkpoint, if
    given) and exports to `out`. `position_boost` adds that multiple of `grid_positions` to the
    encoder's position embeddings first (they are too weak next to the patch embeddings for the
    rows to learn their side and height). `steps` stops early (the learning rate still follows
    `minutes`)."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = MiniVLM()
    if start is not None and start.suffix == ".pt":
        model.load_state_dict(torch.load(start))
    elif start is not None:
        load_gguf(model, start)
    if position_boost:
        with torch.no_grad():
            model.vision.pos += position_boost * grid_positions(SHAPE.image_size // SHAPE.patch_size, SHAPE.v_embd)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    initial = export(model, out / "untrained")  # for the template's tokeniser (same vocabulary)
    template = Template(*map(str, initial))
    before = torch.tensor(template.before)
    colour_ids = torch.tensor([template.answer(c) for c in scenes.COLORS])
    kind_ids = torch.tensor([template.answer(k) for k in scenes.KINDS])
    # a row that shows a shape has at least one of its kind: "zero" (not an answer word) is never a target
    number_ids = torch.tensor([template.answer(n) if n != "zero" else 0 for n in scenes.NUMBERS])
    grid = SHAPE.image_size // SHAPE.patch_size  # a patch's half of the picture, as a word id
    column, line = torch.arange(grid * grid) % grid, torch.arange(grid * grid) // grid
    side_ids = torch.where(column < grid // 2, template.answer("left"), template.answer("right"))
    height_ids = torch.where(line < grid // 2, template.answer("top"), template.answer("bottom"))
    side_pair = torch.tensor([template.answer("left"), template.answer("right")])
    height_pair = torch.tensor([template.answer("top"), template.answer("bottom")])
    rng = np.random.default_rng(seed)
    validation = [(im, qa) for im, _, qa in scenes.split(SEEDS["validation"], 60, SHAPE.image_size, 4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    began, step, log = time.time(), 0, []
    train_scenes = scenes.split(SEEDS["train"] + seed, 10**9, SHAPE.image_size, questions)  # seed < 1000
    while (elapsed := time.time() - began) < minutes * 60 and (steps is None or step < steps):
        fraction = elapsed / (minutes * 60)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * fraction))
        drawn = [next(train_scenes) for _ in range(images_per_step)]
        x, tokens, targets, mask = batch(template, [(im, qa + [description(shapes)]) for im, shapes, qa in drawn])
        labels = torch.from_numpy(np.stack([scenes.patch_labels(shapes, SHAPE.image_size, SHAPE.patch_size)
                                            for _, shapes, _ in drawn]))
        features = model.vision.features(x)
        kept = kept_rows(labels, rng, row_share)
        hidden, watched = model.hidden(x, before, tokens, features, kept, watch=WATCH if attend_weight else None)
        answer_loss = F.cross_entropy(model.llm.output(hidden[mask]), targets[mask])
        flat = labels.flatten()
        loss = answer_loss + aux_weight * F.cross_entropy(model.vision.aux(features).flatten(0, 1), flat)
        shown = flat > 0
        if shown.any():
            row_logits = model.llm.output(rms(model.vision.project(features).flatten(0, 1)[shown], model.llm.norm))
            words, at = torch.zeros_like(row_logits), torch.arange(len(row_logits))
            flat_rows = torch.arange(len(flat))[shown]
            where = flat_rows % (grid * grid)
            kinds = (flat[shown] - 1) % 3
            how_many = torch.tensor([[sum(s.kind == k for s in shapes) for k in scenes.KINDS] for _, shapes, _ in drawn])
            count = how_many[flat_rows // (grid * grid), kinds]
            colours = (flat[shown] - 1) // 3
            for ids in (colour_ids[colours], kind_ids[kinds], side_ids[where], height_ids[where]):
                words[at, ids] = 1.0
            countable = count <= 4
            words[at[countable], number_ids[count[countable]]] = 1.0
            loss = loss + aux_weight * F.cross_entropy(row_logits, words / words.sum(1, keepdim=True))
            # and each attribute among its own words, a sharper signal for the ones the encoder
            # must work out (side and height from its position codes, the count from the picture)
            for options, truth, rows in ((colour_ids, colours, at), (kind_ids, kinds, at),
                                         (side_pair, (side_ids[where] == side_pair[1]).long(), at),
                                         (height_pair, (height_ids[where] == height_pair[1]).long(), at),
                                         (number_ids[1:], count[countable] - 1, at[countable])):
                if attribute_weight and len(rows):
                    loss = loss + attribute_weight * F.cross_entropy(row_logits[rows][:, options], truth)
        if attend_weight:
            attend_loss = attention_loss(watched, mask, drawn, labels, kept, len(before))
            loss = loss + attend_weight * attend_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % every == 0:
            model.eval()
            got = predict(model, template, [(im, [q for q, _ in qa]) for im, qa in validation], before)
            right = [(scenes.question_kind(q), g == a) for row, (_, qa) in zip(got, validation) for g, (q, a) in zip(row, qa)]
            model.train()
            log.append({"step": step, "minutes": elapsed / 60, "loss": answer_loss.item(),
                        "attend_loss": attend_loss.item() if attend_weight else None,
                        "validation": float(np.mean([ok for _, ok in right])),
                        **{k: float(np.mean([ok for kind, ok in right if kind == k])) for k in scenes.QUESTION_KINDS}})
            print(json.dumps(log[-1]), flush=True)
            torch.save(model.state_dict(), out / "minivlm.pt")
    torch.save(model.state_dict(), out / "minivlm.pt")
    export(model, out)
    (out / "training.json").write_text(json.dumps({"steps": step, "images_per_step": images_per_step,
                                                   "questions_per_image": questions, "lr": lr, "aux_weight": aux_weight,
                                                   "row_share": row_share, "attend_weight": attend_weight, "position_boost": position_boost,
                                                   "attribute_weight": attribute_weight, "seed": seed, "start": None if start is None else str(start),
                                                   "minutes": minutes, "log": log}, indent=1))


def trimmed_llama(out: Path):
    """The exported pair in `out` in llama.cpp, through a `TrimLlava15ChatHandler` keeping every row
    (set its method and keep per request). Returns (handler, llama)."""
    from llama_cpp import Llama

    from .handlers import TrimLlava15ChatHandler

    handler = TrimLlava15ChatHandler(clip_model_path=str(out / "mmproj.gguf"), keep=None, verbose=False)
    return handler, Llama(model_path=str(out / "llm.gguf"), chat_handler=handler, n_ctx=1024, verbose=False)


def agree(out: Path, data: Path) -> dict:
    """PyTorch's answers vs llama.cpp's (TrimLlava15ChatHandler, keep=None, greedy) on a split."""
    model = MiniVLM()
    model.load_state_dict(torch.load(out / "minivlm.pt"))
    model.eval()
    template = Template(str(out / "llm.gguf"), str(out / "mmproj.gguf"))
    before = torch.tensor(template.before)
    records = json.loads((data / "questions.json").read_text())
    _, llama = trimmed_llama(out)
    same = torch_right = cpp_right = 0
    for r in records:
        image = Image.open(data / r["image"])
        [[mine]] = predict(model, template, [(image, [r["question"]])], before)
        reply = llama.create_chat_completion(messages=image_messages((data / r["image"]).read_bytes(), r["question"]),
                                             max_tokens=3, temperature=0.0)
        theirs = reply["choices"][0]["message"]["content"].strip().lower().strip(".")
        same += mine == theirs
        torch_right += mine == r["answer"]
        cpp_right += theirs == r["answer"]
    n = len(records)
    return {"questions": n, "agreement": same / n, "pytorch_accuracy": torch_right / n, "llama_cpp_accuracy": cpp_right / n}


def coverage(out: Path, data: Path, methods: Sequence[str], keeps: Sequence[int]) -> dict:
    """For each (method, keep): over the test split's questions about something drawn, the mean
    share of their evidence rows (`scenes.evidence`) that `TrimLlava15ChatHandler` keeps, and the
    share of questions with at least one evidence row kept. The scenes are regenerated from the
    split's seed (this model has no class token, so row r shows patch r)."""
    _quiet(False)
    records = json.loads((data / "questions.json").read_text())
    per_image = sum(r["image"] == records[0]["image"] for r in records)
    drawn = list(scenes.split(SEEDS["test"], len(records) // per_image, SHAPE.image_size, per_image))
    handler, llama = trimmed_llama(out)
    shares: dict[tuple[str, int], list[float]] = {(m, k): [] for m in methods for k in keeps}
    for r in records:
        _, shapes, pairs = drawn[int(Path(r["image"]).stem)]
        if r["question"] not in [q for q, _ in pairs]:
            raise ValueError(f"{data} is not the split of seed {SEEDS['test']}: {r['image']} {r['question']!r}")
        shown = scenes.evidence(r["question"], scenes.patch_labels(shapes, SHAPE.image_size, SHAPE.patch_size))
        if not shown.any():
            continue
        messages = image_messages((data / r["image"]).read_bytes(), r["question"])
        for method, keep in shares:
            handler.method, handler.keep = method, keep
            llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
            [kept] = handler.last_selection[0].indices
            shares[(method, keep)].append(float(shown[kept].sum() / shown.sum()))
    return {f"{m} {k}": {"evidence_kept": float(np.mean(v)), "any_evidence_kept": float(np.mean(np.array(v) > 0)),
                         "questions": len(v)} for (m, k), v in shares.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trimcpp.minivlm")
    parser.add_argument("command", choices=("train", "agree", "split", "coverage"))
    parser.add_argument("--out", type=Path, default=Path("trimcpp/data/minivlm"))
    parser.add_argument("--data", type=Path, default=Path("trimcpp/data/scenes-test"))
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--images", type=int, default=200, help="split: scenes in the test split")
    parser.add_argument("--start", type=Path, help="train: go on from the pair exported in this folder (or a minivlm.pt)")
    parser.add_argument("--lr", type=float, default=2e-3, help="train: peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="train: torch seed (and the training scenes' offset)")
    parser.add_argument("--attend", type=float, default=0.5,
                        help="train: weight of the loss that teaches one attention head where the evidence is")
    parser.add_argument("--attributes", type=float, default=0.5,
                        help="train: weight of the per-attribute row readout (each attribute among its own words)")
    parser.add_argument("--steps", type=int, help="train: stop after this many steps (else at --minutes)")
    parser.add_argument("--position-boost", type=float, default=0.0,
                        help="train: add this multiple of fixed 2-D position codes to the encoder's positions first")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.out, args.minutes, lr=args.lr, seed=args.seed, start=args.start, attend_weight=args.attend,
              position_boost=args.position_boost, attribute_weight=args.attributes, steps=args.steps)
    elif args.command == "split":
        scenes.write_split(args.data, SEEDS["test"], args.images, SHAPE.image_size, per_image=2)
    elif args.command == "coverage":
        keeps = (192, 128, 64, 32)
        result = coverage(args.out, args.data, ("random", "uniform", "divprune", "align", "trimtokenator"), keeps)
        print(f"{'method':<14}" + "".join(f"{'keep ' + str(k):>16}" for k in keeps))
        for method in dict.fromkeys(name.split()[0] for name in result):
            cells = [result[f"{method} {k}"] for k in keeps]
            print(f"{method:<14}" + "".join(f"{100 * c['evidence_kept']:>9.0f} {100 * c['any_evidence_kept']:>5.0f}%" for c in cells))
        print(f"{next(iter(result.values()))['questions']} questions about a drawn shape; per cell: % of their evidence rows "
              "kept, then % of questions with at least one kept")
    else:
        print(json.dumps(agree(args.out, args.data), indent=1))


if __name__ == "__main__":
    main()
