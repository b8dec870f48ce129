"""Random-weight Qwen2.5-VL-style and Gemma-3-style pairs that libmtmd loads as the real families.

- Qwen2.5-VL: LLM architecture ``qwen2vl`` (M-RoPE: ``rope.dimension_sections``), a byte-level
  BPE vocabulary generated here (``gpt2`` model, ``qwen2`` pre-tokenizer, merges spelled from the
  same words as the LLaVA vocabulary) with Qwen's control tokens; mmproj projector
  ``qwen2.5vl_merger``: two patch convolutions, RMS norms, gated SiLU FFNs, window attention
  (``n_wa_pattern``), 2x2 patch merging into ``mm.0``/``mm.2``. Rows per image follow the picture's
  size (libmtmd rounds it to multiples of 28 pixels).
- Gemma 3: LLM architecture ``gemma3`` (sliding-window attention, q/k norms, post norms, tied
  output; token embeddings scaled by sqrt(n_embd) inside the model), a SentencePiece vocabulary with
  Gemma's control tokens and a Gemma-3 chat template in ``tokenizer.chat_template`` (what
  ``MTMDChatHandler`` renders); mmproj projector ``gemma3``: SigLIP encoder, average pooling of
  ``scale_factor`` x ``scale_factor`` patches, RMS norm and ``mm.input_projection``. Rows per image
  are fixed: (image_size / patch_size / scale_factor)^2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import gguf
import numpy as np

from . import WEIGHT_TYPES, WORDS, Q, Shape, Writer, random_blocks, vocabulary

# OpenAI CLIP normalisation (Qwen2.5-VL's preprocessor) and SigLIP's (Gemma 3).
QWEN_MEAN, QWEN_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]

# ChatML as Qwen2.5-VL's GGUFs carry it (images as <|vision_start|><|image_pad|><|vision_end|>).
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3's template (system text folded into the first user turn, "model" for the assistant).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte with one)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bpe_vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a small byte-level BPE vocabulary (Qwen's control tokens last).

    Every byte is a token; each word of the LLaVA vocabulary, with and without a leading space,
    is reachable by merging from the left, and every merge's result is a token."""
    byte = byte_chars()
    tokens: dict[str, None] = dict.fromkeys(byte)
    merges: dict[str, None] = {}
    for word in WORDS + [w.capitalize() for w in WORDS] + ["user", "assistant", "system", "You", "helpful"]:
        for spelled in ("".join(byte[b] for b in word.encode()), "".join(byte[b] for b in (" " + word).encode())):
            for end in range(2, len(spelled) + 1):
                merges.setdefault(f"{spelled[:end - 1]} {spelled[end - 1]}", None)
                tokens.setdefault(spelled[:end], None)
    words = list(tokens)
    types = [gguf.TokenType.NORMAL] * len(words)
    specials = QWEN_SPECIALS
    if len(words) + len(specials) > n_vocab:
        raise ValueError(f"n_vocab must be at least {len(words) + len(specials)} for the generated vocabulary, got {n_vocab}")
    filler = n_vocab - len(words) - len(specials)
    words += [f"<|unused_{i}|>" for i in range(filler)] + specials
    types += [gguf.TokenType.CONTROL] * (filler + len(specials))
    return words, [int(t) for t in types], list(merges)


def _matrix(rng: np.random.Generator, rows: int, cols: int, qtype: Q, scale: float = 0.02) -> Callable[[], np.ndarray]:
    return lambda: random_blocks(rng, rows, cols, qtype, scale)


def _vector(rng: np.random.Generator, n: int, scale: float = 0.02) -> Callable[[], np.ndarray]:
    return lambda: rng.standard_normal(n, dtype=np.float32) * scale


def _const(value: float, n: int) -> Callable[[], np.ndarray]:
    return lambda: np.full(n, value, np.float32)


def write_qwen_llm(path, shape: Shape, *, seed: int = 0,
                   progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Writes a random ``qwen2vl`` LLM (Qwen2.5-VL's text model: GQA with q/k/v biases, M-RoPE)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    wtype = WEIGHT_TYPES[shape.weight_type]
    out = Writer(path, "qwen2vl")
    w = out.gguf
    head = shape.n_embd // shape.n_head
    kv = shape.n_head_kv or shape.n_head
    out.llm_keys(shape, "qwen2vl", 1e-6)
    w.add_rope_freq_base(1000000.0)
    # Qwen2.5-VL's sections (16, 24, 24 of 64 rotary pairs), scaled to this head size.
    pairs = head // 2
    t = pairs // 4
    w.add_rope_dimension_sections([t, (pairs - t) // 2, pairs - t - (pairs - t) // 2, 0])
    tokens, types, merges = bpe_vocabulary(shape.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN_TEMPLATE)

    e, f, g = shape.n_embd, shape.n_ff, kv * head
    out.tensor("token_embd.weight", (shape.n_vocab, e), wtype, _matrix(rng, shape.n_vocab, e, wtype, 0.05))
    for i in range(shape.n_layer):
        out.tensor(f"blk.{i}.attn_norm.weight", (e,), Q.F32, _const(1.0, e))
        out.tensor(f"blk.{i}.attn_q.weight", (e, e), wtype, _matrix(rng, e, e, wtype))
        out.tensor(f"blk.{i}.attn_q.bias", (e,), Q.F32, _vector(rng, e))
        for name in ("attn_k", "attn_v"):
            out.tensor(f"blk.{i}.{name}.weight", (g, e), wtype, _matrix(rng, g, e, wtype))
            out.tensor(f"blk.{i}.{name}.bias", (g,), Q.F32, _vector(rng, g))
        out.tensor(f"blk.{i}.attn_output.weight", (e, e), wtype, _matrix(rng, e, e, wtype))
        out.tensor(f"blk.{i}.ffn_norm.weight", (e,), Q.F32, _const(1.0, e))
        out.tensor(f"blk.{i}.ffn_gate.weight", (f, e), wtype, _matrix(rng, f, e, wtype))
        out.tensor(f"blk.{i}.ffn_up.weight", (f, e), wtype, _matrix(rng, f, e, wtype))
        out.tensor(f"blk.{i}.ffn_down.weight", (e, f), wtype, _matrix(rng, e, f, wtype))
    out.tensor("output_norm.weight", (e,), Q.F32, _const(1.0, e))
    out.tensor("output.weight", (shape.n_vocab, e), wtype, _matrix(rng, shape.n_vocab, e, wtype))
    out.finish(progress)
    return path


class _Vision:
    """An mmproj being written: its writer, random stream and the tensor makers both towers use."""

    def __init__(self, path, shape: Shape, seed: int):
        self.out = Writer(Path(path), "clip")
        self.rng = np.random.default_rng(seed)
        self.vtype = WEIGHT_TYPES[shape.v_type]
        self.dtype = np.float16 if self.vtype == Q.F16 else np.float32

    def normal(self, *dims: int, scale: float = 0.02) -> Callable[[], np.ndarray]:
        return lambda: (self.rng.standard_normal(dims, dtype=np.float32) * scale).astype(self.dtype)

    def attention(self, i: int, v: int) -> None:
        """Layer i's q, k, v and output projections, with biases."""
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            self.out.tensor(f"v.blk.{i}.{name}.weight", (v, v), self.vtype, self.normal(v, v))
            self.out.tensor(f"v.blk.{i}.{name}.bias", (v,), Q.F32, _vector(self.rng, v))


def write_qwen_mmproj(path, shape: Shape, *, seed: int = 1,
                      progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Writes a random Qwen2.5-VL vision tower (projector ``qwen2.5vl_merger``) for the LLM of `shape`."""
    tower = _Vision(path, shape, seed)
    out, rng, vtype, normal, w = tower.out, tower.rng, tower.vtype, tower.normal, tower.out.gguf
    v, f, p, llm = shape.v_embd, shape.v_ff, shape.patch_size, shape.n_embd
    out.vision_keys(shape, f"qwen2.5-vl vision ({v}x{shape.v_layer})", "qwen2.5vl_merger", projection_dim=llm,
                    eps=1e-6, mean=QWEN_MEAN, std=QWEN_STD)
    w.add_vision_use_silu(True)
    w.add_uint32("clip.vision.n_wa_pattern", shape.v_window_pattern)
    w.add_uint32("clip.vision.spatial_merge_size", shape.v_merge)

    out.tensor("v.patch_embd.weight", (v, 3, p, p), vtype, normal(v, 3, p, p))
    out.tensor("v.patch_embd.weight.1", (v, 3, p, p), vtype, normal(v, 3, p, p))
    for i in range(shape.v_layer):
        tower.attention(i, v)
        out.tensor(f"v.blk.{i}.ln1.weight", (v,), Q.F32, _const(1.0, v))
        out.tensor(f"v.blk.{i}.ln2.weight", (v,), Q.F32, _const(1.0, v))
        for name, dims in (("ffn_gate", (f, v)), ("ffn_up", (f, v)), ("ffn_down", (v, f))):
            out.tensor(f"v.blk.{i}.{name}.weight", dims, vtype, normal(*dims))
            out.tensor(f"v.blk.{i}.{name}.bias", (dims[0],), Q.F32, _vector(rng, dims[0]))
    out.tensor("v.post_ln.weight", (v,), Q.F32, _const(1.0, v))
    m = v * shape.v_merge ** 2
    out.tensor("mm.0.weight", (m, m), vtype, normal(m, m, scale=1.0 / np.sqrt(m)))
    out.tensor("mm.0.bias", (m,), Q.F32, _vector(rng, m))
    out.tensor("mm.2.weight", (llm, m), vtype, normal(llm, m, scale=0.05 / np.sqrt(m)))
    out.tensor("mm.2.bias", (llm,), Q.F32, _vector(rng, llm, 0.05))
    out.finish(progress)
    return path


def write_gemma_llm(path, shape: Shape, *, seed: int = 0,
                    progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Writes a random ``gemma3`` LLM (Gemma 3's text model, sliding-window layers, tied output)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    wtype = WEIGHT_TYPES[shape.weight_type]
    out = Writer(path, "gemma3")
    w = out.gguf
    head = shape.head_dim or shape.n_embd // shape.n_head
    kv = shape.n_head_kv or shape.n_head
    out.llm_keys(shape, "gemma3", 1e-6)
    w.add_key_length(head)
    w.add_value_length(head)
    w.add_rope_freq_base(1000000.0)
    w.add_sliding_window(1024)
    # The LLaVA vocabulary's SentencePiece pieces, Gemma's control tokens after <unk> <s> </s>.
    tokens, scores, types = vocabulary(shape.n_vocab - len(GEMMA_SPECIALS))
    tokens = tokens[:3] + GEMMA_SPECIALS + tokens[3:]
    scores = scores[:3] + [0.0] * len(GEMMA_SPECIALS) + scores[3:]
    types = types[:3] + [int(gguf.TokenType.CONTROL)] * len(GEMMA_SPECIALS) + types[3:]
    out.spm_vocabulary(tokens, scores, types, eos=tokens.index("<end_of_turn>"))
    w.add_chat_template(GEMMA_TEMPLATE)

    e, f, q, g = shape.n_embd, shape.n_ff, shape.n_head * head, kv * head
    # Gemma scales token embeddings by sqrt(n_embd) in the graph: rows of about 1/sqrt(n_embd) here.
    out.tensor("token_embd.weight", (shape.n_vocab, e), wtype,
               _matrix(rng, shape.n_vocab, e, wtype, 1.0 / np.sqrt(e)))
    for i in range(shape.n_layer):
        for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            out.tensor(f"blk.{i}.{name}.weight", (e,), Q.F32, _const(1.0, e))
        out.tensor(f"blk.{i}.attn_q.weight", (q, e), wtype, _matrix(rng, q, e, wtype))
        out.tensor(f"blk.{i}.attn_k.weight", (g, e), wtype, _matrix(rng, g, e, wtype))
        out.tensor(f"blk.{i}.attn_v.weight", (g, e), wtype, _matrix(rng, g, e, wtype))
        out.tensor(f"blk.{i}.attn_output.weight", (e, q), wtype, _matrix(rng, e, q, wtype))
        out.tensor(f"blk.{i}.attn_q_norm.weight", (head,), Q.F32, _const(1.0, head))
        out.tensor(f"blk.{i}.attn_k_norm.weight", (head,), Q.F32, _const(1.0, head))
        out.tensor(f"blk.{i}.ffn_gate.weight", (f, e), wtype, _matrix(rng, f, e, wtype))
        out.tensor(f"blk.{i}.ffn_up.weight", (f, e), wtype, _matrix(rng, f, e, wtype))
        out.tensor(f"blk.{i}.ffn_down.weight", (e, f), wtype, _matrix(rng, e, f, wtype))
    out.tensor("output_norm.weight", (e,), Q.F32, _const(1.0, e))
    out.finish(progress)
    return path


def write_gemma_mmproj(path, shape: Shape, *, seed: int = 1,
                       progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Writes a random SigLIP encoder with Gemma 3's pooling projector (``gemma3``)."""
    tower = _Vision(path, shape, seed)
    out, rng, vtype, normal, w = tower.out, tower.rng, tower.vtype, tower.normal, tower.out.gguf
    v, f, p, llm = shape.v_embd, shape.v_ff, shape.patch_size, shape.n_embd
    out.vision_keys(shape, f"gemma3 vision ({v}x{shape.v_layer})", "gemma3", projection_dim=llm, eps=1e-6,
                    mean=SIGLIP_MEAN, std=SIGLIP_STD)
    w.add_vision_use_gelu(True)
    w.add_uint32("clip.vision.projector.scale_factor", shape.v_merge)

    patches = (shape.image_size // p) ** 2
    out.tensor("v.patch_embd.weight", (v, 3, p, p), vtype, normal(v, 3, p, p))
    out.tensor("v.patch_embd.bias", (v,), Q.F32, _vector(rng, v))
    # F32 as in converted SigLIP mmprojs (the graph adds it to F32 activations directly).
    out.tensor("v.position_embd.weight", (patches, v), Q.F32, _matrix(rng, patches, v, Q.F32))
    for i in range(shape.v_layer):
        tower.attention(i, v)
        for name in ("ln1", "ln2"):
            out.tensor(f"v.blk.{i}.{name}.weight", (v,), Q.F32, _const(1.0, v))
            out.tensor(f"v.blk.{i}.{name}.bias", (v,), Q.F32, _const(0.0, v))
        out.tensor(f"v.blk.{i}.ffn_up.weight", (f, v), vtype, normal(f, v))
        out.tensor(f"v.blk.{i}.ffn_up.bias", (f,), Q.F32, _vector(rng, f))
        out.tensor(f"v.blk.{i}.ffn_down.weight", (v, f), vtype, normal(v, f))
        out.tensor(f"v.blk.{i}.ffn_down.bias", (v,), Q.F32, _vector(rng, v))
    out.tensor("v.post_ln.weight", (v,), Q.F32, _const(1.0, v))
    out.tensor("v.post_ln.bias", (v,), Q.F32, _const(0.0, v))
    out.tensor("mm.soft_emb_norm.weight", (v,), Q.F32, _const(1.0, v))
    # Image rows come out at about the size of the scaled token embeddings (entries of about 1).
    out.tensor("mm.input_projection.weight", (v, llm), vtype, normal(v, llm, scale=1.0 / np.sqrt(v)))
    out.finish(progress)
    return path
