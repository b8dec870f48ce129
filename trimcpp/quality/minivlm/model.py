"""The mini VLM in PyTorch, as libmtmd and llama.cpp compute it, and its export to a GGUF pair."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...testing import CLIP_MEAN, CLIP_STD, Shape, write_llm, write_mmproj
from .. import scenes
from .stages import MINI

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
EOS = 2
WATCH = 1  # the LLM layer whose head 0 training teaches to look at a question's figures


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


class VisionTower(nn.Module):
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


class LanguageModel(nn.Module):
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
    each patch's figure class (`VisionTower.aux`, not exported), standing in for CLIP's pretraining; asks
    each projected row that shows a figure to read, through the LLM's (tied) output head, as that
    figure's colour, kind, side, height and count words, standing in for LLaVA's caption
    pretraining; and teaches head 0 of LLM layer `WATCH` to look, from the position that predicts
    the answer, at the rows of the figures the question names (`attention_loss`)."""

    def __init__(self, shape: Shape = MINI):
        super().__init__()
        self.shape = shape
        self.vision, self.llm = VisionTower(shape), LanguageModel(shape)

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
