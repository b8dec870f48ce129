"""Random-weight LLaVA model pairs for tests and benchmarks, written with the ``gguf`` package.

No real VLM weights are needed (or reachable) to test and time trimcpp: speed does not depend on
the weight values, and correctness of the plumbing does not either. This module writes

- an LLM GGUF (llama architecture, its own SentencePiece-style vocabulary written here), and
- a CLIP mmproj GGUF with the keys and tensor names libmtmd's ``clip.cpp`` loads: projector
  ``mlp`` (LLaVA-1.5), plus grid pinpoints and ``spatial_unpad`` for LLaVA-1.6 (NeXT).

    from trimcpp.testing import write_pair
    llm, mmproj = write_pair("models/", shape="tiny", version="1.5")

Shapes: ``tiny`` (seconds, for tests), ``small`` (a quick look), ``7b`` (LLaMA-7B in Q4_0 with a
ViT-L/14-336 F16 mmproj: the real LLaVA-1.5-7B shape, about 3.9 GB). The answers of these models
are noise; what they are good for is timing and checking what reaches the LLM.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# Types the token-embedding table (and the LLM's other weights) may be written in.
WEIGHT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K, "q8_0": Q.Q8_0}

# CLIP's pixel normalisation (OpenAI CLIP, which every LLaVA mmproj uses), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.6's grid pinpoints for a 336-pixel encoder (llava-v1.6 config), scaled for other sizes.
_PINPOINTS_336 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Dimensions of an LLM + mmproj pair."""

    n_embd: int  # LLM width (= the projector's output size)
    n_layer: int
    n_head: int
    n_ff: int
    n_vocab: int  # padded with unused control tokens beyond the generated vocabulary
    weight_type: str  # LLM matrices (and token_embd unless embd_type says otherwise)
    image_size: int  # vision encoder input (pixels, square)
    patch_size: int
    v_embd: int
    v_layer: int
    v_head: int
    v_ff: int
    v_type: str = "f16"  # vision matrices: "f16" or "f32"
    n_ctx_train: int = 4096
    n_head_kv: int = 0  # 0: n_head (no grouped-query attention)
    head_dim: int = 0  # 0: n_embd / n_head (Gemma 3 sets it)
    v_merge: int = 1  # patches merged per side into one row (Qwen: 2; Gemma 3: pooling 4)
    v_window_pattern: int = 0  # Qwen2.5-VL: every n-th vision layer attends globally

    @property
    def patches(self) -> int:
        """Image rows per encoded image (LLaVA-1.5) or per slice (LLaVA-1.6)."""
        return (self.image_size // self.patch_size) ** 2


SHAPES = {
    # 36 image rows of width 256 (a multiple of 256, so every table type fits), 2 layers: seconds.
    "tiny": Shape(n_embd=256, n_layer=2, n_head=4, n_ff=512, n_vocab=2048, weight_type="f16",
                  image_size=84, patch_size=14, v_embd=64, v_layer=3, v_head=4, v_ff=128),
    # A look at real row counts (576 rows) on a small LLM: under a minute per run.
    "small": Shape(n_embd=1024, n_layer=8, n_head=16, n_ff=2816, n_vocab=32000, weight_type="q4_0",
                   image_size=336, patch_size=14, v_embd=256, v_layer=6, v_head=4, v_ff=1024),
    # LLaVA-1.5-7B: LLaMA-7B in Q4_0 (token_embd Q4_0 too) and a ViT-L/14-336 mmproj in F16.
    "7b": Shape(n_embd=4096, n_layer=32, n_head=32, n_ff=11008, n_vocab=32000, weight_type="q4_0",
                image_size=336, patch_size=14, v_embd=1024, v_layer=23, v_head=16, v_ff=4096),
}

# Words the vocabulary spells whole (with every prefix, so the SentencePiece merges reach them):
# the stock LLaVA templates' boilerplate and the questions the tests and benchmarks ask.
WORDS = """
a an the and or of to in on at is are was be it this that what which who where how many
chat between curious human artificial intelligence assistant gives helpful detailed polite
answers answer question questions user describe image picture photo shown there color colour
left right top bottom red green blue yellow black white small large big shape shapes circle
square triangle object objects count number one two three four five six seven eight yes no
can you see do does with for from by as not any all some more than thing things cat dog car
tree sky water people person man woman text read write tell me about please look here
""".split()


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a small SentencePiece ("llama") vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces: dict[str, None] = {}
    for c in map(chr, range(32, 127)):
        pieces.setdefault(c.replace(" ", "\u2581"), None)
        pieces.setdefault("\u2581" + c, None)
    for word in WORDS + [w.capitalize() for w in WORDS] + ["USER", "ASSISTANT", "Answer", "'s"]:
        spelled = "\u2581" + word
        for end in range(2, len(spelled) + 1):
            pieces.setdefault(spelled[:end], None)
            pieces.setdefault(word[:end], None)
    words = list(pieces)
    tokens += words
    types += [gguf.TokenType.NORMAL] * len(words)
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab must be at least {len(tokens)} for the generated vocabulary, got {n_vocab}")
    filler = n_vocab - len(tokens)
    tokens += [f"<unused{i}>" for i in range(filler)]
    types += [gguf.TokenType.CONTROL] * filler
    # Longer pieces merge first; control and byte tokens never merge.
    scores = [float(len(t)) if ty == gguf.TokenType.NORMAL else 0.0 for t, ty in zip(tokens, types)]
    return tokens, scores, [int(t) for t in types]


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q, scale: float = 0.02) -> np.ndarray:
    """A rows x cols tensor of `qtype` as raw bytes (rows x bytes-per-row): random quants with
    finite float16 scales, so that every block dequantises to values of about +-scale."""
    if qtype in (Q.F32, Q.F16):
        values = rng.standard_normal((rows, cols), dtype=np.float32) * scale
        return values.astype(np.float16 if qtype == Q.F16 else np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"a {qtype.name} row needs a multiple of {block} columns, got {cols}")
    blocks = rows * (cols // block)
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    # Offsets of the float16 fields in each block (ggml-common.h), and their magnitude: the
    # dequantised value is about d * q with q up to 8 (4-bit), 32 (6-bit) or 127 (8-bit).
    halves = {Q.Q4_0: ([0], 8), Q.Q8_0: ([0], 127), Q.Q4_K: ([0, 2], 15 * 63), Q.Q6_K: ([208], 32 * 127)}
    offsets, q_max = halves[qtype]
    for offset in offsets:
        d = (rng.uniform(0.5, 1.0, size=blocks) * scale / q_max).astype(np.float16)
        raw[:, offset:offset + 2] = d.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, -1)


class Writer:
    """A GGUF file written tensor by tensor (the 7b shape does not fit in memory at once).

    With `weights` (name -> float array) every tensor's values come from there instead of `make`
    (trained models; float types only)."""

    def __init__(self, path: Path, arch: str, weights: Optional[Mapping[str, np.ndarray]] = None):
        self.path = path
        self.gguf = gguf.GGUFWriter(str(path), arch)
        self.tensors: list[tuple[str, Callable[[], np.ndarray]]] = []
        self.weights = weights

    def tensor(self, name: str, shape: Sequence[int], qtype: Q, make: Callable[[], np.ndarray]) -> None:
        """Declares tensor `name` of numpy-order `shape`; `make()` gives its data when written."""
        if self.weights is not None:
            value = np.asarray(self.weights[name], dtype=np.float32)
            if value.shape != tuple(shape) or qtype not in (Q.F32, Q.F16):
                raise ValueError(f"{name}: got {value.shape} for {tuple(shape)} {qtype.name} (float types only)")
            make = lambda: value.astype(np.float16 if qtype == Q.F16 else np.float32)  # noqa: E731
        if qtype in (Q.F32, Q.F16):
            dtype = np.float16 if qtype == Q.F16 else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self.gguf.add_tensor_info(name, list(shape), np.dtype(dtype), nbytes)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = list(shape[:-1]) + [shape[-1] // block * size]
            self.gguf.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        self.tensors.append((name, make))

    def llm_keys(self, shape: Shape, name: str, rms_eps: float) -> None:
        """The keys every LLM here has: its name and size."""
        w = self.gguf
        w.add_name(f"trimcpp random {name} ({shape.n_embd}x{shape.n_layer})")
        w.add_context_length(shape.n_ctx_train)
        w.add_embedding_length(shape.n_embd)
        w.add_block_count(shape.n_layer)
        w.add_feed_forward_length(shape.n_ff)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head_kv or shape.n_head)
        w.add_layer_norm_rms_eps(rms_eps)

    def spm_vocabulary(self, tokens: list[str], scores: list[float], types: list[int], *, eos: int) -> None:
        """A SentencePiece ("llama") vocabulary with <unk> 0 and BOS 1, BOS added to every prompt."""
        w = self.gguf
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(eos)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

    def vision_keys(self, shape: Shape, name: str, projector: str, *, projection_dim: int, eps: float,
                    mean: Sequence[float], std: Sequence[float]) -> None:
        """The keys every mmproj here has: libmtmd's vision encoder settings."""
        w = self.gguf
        w.add_name(f"trimcpp random {name}")
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(projector)
        w.add_vision_image_size(shape.image_size)
        w.add_vision_patch_size(shape.patch_size)
        w.add_vision_embedding_length(shape.v_embd)
        w.add_vision_feed_forward_length(shape.v_ff)
        w.add_vision_projection_dim(projection_dim)
        w.add_vision_head_count(shape.v_head)
        w.add_vision_attention_layernorm_eps(eps)
        w.add_vision_block_count(shape.v_layer)
        w.add_vision_image_mean(list(mean))
        w.add_vision_image_std(list(std))

    def finish(self, progress: Optional[Callable[[int, int], None]] = None) -> None:
        self.gguf.write_header_to_file()
        self.gguf.write_kv_data_to_file()
        self.gguf.write_ti_data_to_file()
        for done, (_, make) in enumerate(self.tensors):
            self.gguf.write_tensor_data(make())
            if progress:
                progress(done + 1, len(self.tensors))
        self.gguf.close()


def write_llm(path: os.PathLike | str, shape: Shape, *, embd_type: Optional[str] = None, seed: int = 0,
              weights: Optional[Mapping[str, np.ndarray]] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Writes a llama-architecture LLM, random unless `weights` (GGUF tensor name -> numpy-order
    float array) gives the values; token_embd in `embd_type` (default: the weight type)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    wtype = WEIGHT_TYPES[shape.weight_type]
    etype = WEIGHT_TYPES[embd_type or shape.weight_type]
    out = Writer(path, "llama", weights)
    w = out.gguf
    out.llm_keys(shape, "llama", 1e-5)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    tokens, scores, types = vocabulary(shape.n_vocab)
    out.spm_vocabulary(tokens, scores, types, eos=2)

    def ones() -> np.ndarray:
        return np.ones(shape.n_embd, np.float32)

    def matrix(rows: int, cols: int, qtype: Q, scale: float = 0.02) -> Callable[[], np.ndarray]:
        return lambda: random_blocks(rng, rows, cols, qtype, scale)

    e, f = shape.n_embd, shape.n_ff
    # Embedding rows of about unit size per entry, like real tables relative to the image rows.
    out.tensor("token_embd.weight", (shape.n_vocab, e), etype, matrix(shape.n_vocab, e, etype, 0.05))
    for i in range(shape.n_layer):
        out.tensor(f"blk.{i}.attn_norm.weight", (e,), Q.F32, ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            out.tensor(f"blk.{i}.{name}.weight", (e, e), wtype, matrix(e, e, wtype))
        out.tensor(f"blk.{i}.ffn_norm.weight", (e,), Q.F32, ones)
        out.tensor(f"blk.{i}.ffn_gate.weight", (f, e), wtype, matrix(f, e, wtype))
        out.tensor(f"blk.{i}.ffn_up.weight", (f, e), wtype, matrix(f, e, wtype))
        out.tensor(f"blk.{i}.ffn_down.weight", (e, f), wtype, matrix(e, f, wtype))
    out.tensor("output_norm.weight", (e,), Q.F32, ones)
    out.tensor("output.weight", (shape.n_vocab, e), wtype, matrix(shape.n_vocab, e, wtype))
    out.finish(progress)
    return path


def pinpoints(image_size: int) -> list[int]:
    """LLaVA-1.6's grid pinpoints (flattened width, height pairs) for an encoder of `image_size`."""
    return [x * image_size // 336 for pair in _PINPOINTS_336 for x in pair]


def write_mmproj(path: os.PathLike | str, shape: Shape, *, version: str = "1.5", n_embd_out: Optional[int] = None,
                 class_token: bool = True, seed: int = 1, weights: Optional[Mapping[str, np.ndarray]] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Writes a random CLIP ViT + 2-layer MLP projector (LLaVA-1.5, or 1.6 with grid pinpoints).

    The projector's output size is the LLM's width unless `n_embd_out` says otherwise (to test
    the mismatch error). `class_token=False` leaves out CLIP's class embedding (libmtmd then
    gives one row per patch, in order; see trimcpp.layout). `weights` as in :func:`write_llm`.
    """
    if version not in ("1.5", "1.6"):
        raise ValueError(f"version must be '1.5' or '1.6', got {version!r}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    vtype = WEIGHT_TYPES[shape.v_type]
    out = Writer(path, "clip", weights)
    w = out.gguf
    out.vision_keys(shape, f"clip ({shape.v_embd}x{shape.v_layer}, llava-{version})", "mlp",
                    projection_dim=n_embd_out or shape.n_embd, eps=1e-5, mean=CLIP_MEAN, std=CLIP_STD)
    w.add_vision_use_gelu(False)  # quick GELU, as CLIP
    if version == "1.6":
        w.add_array("clip.vision.image_grid_pinpoints", pinpoints(shape.image_size))
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")

    v, f, p = shape.v_embd, shape.v_ff, shape.patch_size
    llm = n_embd_out or shape.n_embd

    def normal(*dims: int, scale: float = 0.02, dtype: type = np.float32) -> Callable[[], np.ndarray]:
        return lambda: (rng.standard_normal(dims, dtype=np.float32) * scale).astype(dtype)

    def const(value: float, n: int) -> Callable[[], np.ndarray]:
        return lambda: np.full(n, value, np.float32)

    wdtype = np.float16 if vtype == Q.F16 else np.float32
    out.tensor("v.patch_embd.weight", (v, 3, p, p), vtype, normal(v, 3, p, p, dtype=wdtype))
    positions = shape.patches + class_token
    if class_token:
        out.tensor("v.class_embd", (v,), Q.F32, normal(v))
    out.tensor("v.position_embd.weight", (positions, v), vtype, normal(positions, v, dtype=wdtype))
    out.tensor("v.pre_ln.weight", (v,), Q.F32, const(1.0, v))
    out.tensor("v.pre_ln.bias", (v,), Q.F32, const(0.0, v))
    for i in range(shape.v_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            out.tensor(f"v.blk.{i}.{name}.weight", (v, v), vtype, normal(v, v, dtype=wdtype))
            out.tensor(f"v.blk.{i}.{name}.bias", (v,), Q.F32, normal(v))
        for name in ("ln1", "ln2"):
            out.tensor(f"v.blk.{i}.{name}.weight", (v,), Q.F32, const(1.0, v))
            out.tensor(f"v.blk.{i}.{name}.bias", (v,), Q.F32, const(0.0, v))
        out.tensor(f"v.blk.{i}.ffn_up.weight", (f, v), vtype, normal(f, v, dtype=wdtype))
        out.tensor(f"v.blk.{i}.ffn_up.bias", (f,), Q.F32, normal(f))
        out.tensor(f"v.blk.{i}.ffn_down.weight", (v, f), vtype, normal(v, f, dtype=wdtype))
        out.tensor(f"v.blk.{i}.ffn_down.bias", (v,), Q.F32, normal(v))
    # The projector: image rows come out at about the size of token-embedding entries.
    out.tensor("mm.0.weight", (llm, v), vtype, normal(llm, v, scale=1.0 / np.sqrt(v), dtype=wdtype))
    out.tensor("mm.0.bias", (llm,), Q.F32, normal(llm))
    out.tensor("mm.2.weight", (llm, llm), vtype, normal(llm, llm, scale=0.05 / np.sqrt(llm), dtype=wdtype))
    out.tensor("mm.2.bias", (llm,), Q.F32, normal(llm, scale=0.05))
    out.finish(progress)
    return path


# The other families' shapes: tiny ones for tests, and real sizes for benchmarks.
FAMILY_SHAPES = {
    "qwen2.5-vl": {
        # Rows follow the picture (one per 28 x 28 pixels); a 224 x 168 picture gives 8 x 6 = 48.
        "tiny": Shape(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=4096, weight_type="f16",
                      image_size=224, patch_size=14, v_embd=64, v_layer=2, v_head=4, v_ff=160, v_merge=2,
                      v_window_pattern=2),
        # Qwen2.5-VL-3B-Instruct: the LLM in Q4_0 and its 32-layer vision tower in F16.
        "3b": Shape(n_embd=2048, n_layer=36, n_head=16, n_head_kv=2, n_ff=11008, n_vocab=151936, weight_type="q4_0",
                    image_size=560, patch_size=14, v_embd=1280, v_layer=32, v_head=16, v_ff=3420, v_merge=2,
                    v_window_pattern=8, n_ctx_train=32768),
        # Qwen2.5-VL-7B-Instruct.
        "7b": Shape(n_embd=3584, n_layer=28, n_head=28, n_head_kv=4, n_ff=18944, n_vocab=152064, weight_type="q4_0",
                    image_size=560, patch_size=14, v_embd=1280, v_layer=32, v_head=16, v_ff=3420, v_merge=2,
                    v_window_pattern=8, n_ctx_train=32768),
    },
    "gemma3": {
        # 224 px, patch 14, pooled 2 x 2: 64 rows per image.
        "tiny": Shape(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=2048,
                      weight_type="f16", image_size=224, patch_size=14, v_embd=64, v_layer=2, v_head=4, v_ff=160,
                      v_merge=2),
        # Gemma-3-4B-it: the LLM in Q4_0 and SigLIP-so400m at 896 px (4096 patches pooled to 256 rows).
        "4b": Shape(n_embd=2560, n_layer=34, n_head=8, n_head_kv=4, head_dim=256, n_ff=10240, n_vocab=262208,
                    weight_type="q4_0", image_size=896, patch_size=14, v_embd=1152, v_layer=27, v_head=16,
                    v_ff=4304, v_merge=4, n_ctx_train=32768),
    },
}
FAMILIES = ("llava", *FAMILY_SHAPES)


def write_pair(directory: os.PathLike | str, shape: str | Shape = "tiny", *, version: str = "1.5",
               family: str = "llava", embd_type: Optional[str] = None, seed: int = 0,
               progress: Optional[Callable[[int, int], None]] = None) -> tuple[Path, Path]:
    """Writes an LLM and its mmproj into `directory` (skipping files already there) and returns
    their paths: for LLaVA ``llm-<name>.gguf`` (shared by both versions) and
    ``mmproj-<name>-llava<version>.gguf``; for ``family`` "qwen2.5-vl" or "gemma3"
    ``llm-<family>-<name>.gguf`` and ``mmproj-<family>-<name>.gguf`` (shapes in FAMILY_SHAPES)."""
    from . import families

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    table = SHAPES if family == "llava" else FAMILY_SHAPES[family]
    if isinstance(shape, str) and shape not in table:
        raise ValueError(f"{family} shapes are {', '.join(table)}, got {shape!r}")
    spec = table[shape] if isinstance(shape, str) else shape
    name = shape if isinstance(shape, str) else "custom"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if family == "llava":
        suffix = f"-{embd_type}" if embd_type else ""
        llm = directory / f"llm-{name}{suffix}.gguf"
        mmproj = directory / f"mmproj-{name}-llava{version}.gguf"
        write_l = lambda p: write_llm(p, spec, embd_type=embd_type, seed=seed, progress=progress)  # noqa: E731
        write_m = lambda p: write_mmproj(p, spec, version=version, seed=seed + 1, progress=progress)  # noqa: E731
    else:
        llm = directory / f"llm-{family}-{name}.gguf"
        mmproj = directory / f"mmproj-{family}-{name}.gguf"
        llm_writer, mmproj_writer = {"qwen2.5-vl": (families.write_qwen_llm, families.write_qwen_mmproj),
                                     "gemma3": (families.write_gemma_llm, families.write_gemma_mmproj)}[family]
        write_l = lambda p: llm_writer(p, spec, seed=seed, progress=progress)  # noqa: E731
        write_m = lambda p: mmproj_writer(p, spec, seed=seed + 1, progress=progress)  # noqa: E731
    for target, write in ((llm, write_l), (mmproj, write_m)):
        if not target.exists():
            partial = target.with_suffix(".partial")
            write(partial)
            partial.replace(target)
    return llm, mmproj


def cache_dir() -> Path:
    """Where generated models are kept: $TRIMCPP_CACHE, else the platform's user cache folder."""
    if os.environ.get("TRIMCPP_CACHE"):
        return Path(os.environ["TRIMCPP_CACHE"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "trimcpp"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "trimcpp" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trimcpp"


def demo_image(width: int = 640, height: int = 480, seed: int = 0):
    """A synthetic picture (PIL image): a few coloured shapes on a sky-and-ground background, for
    the benchmark's default request and for trying ``trimcpp show``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky, ground = np.array([110, 160, 230]), np.array([90, 140, 70])
    pixels = np.where(y < 0.6, sky * (1 - 0.4 * y), ground * (1.2 - 0.4 * y))
    pixels = pixels * np.ones((1, width, 1)) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = [(220, 40, 40), (250, 210, 40), (40, 60, 200), (250, 250, 250), (30, 30, 30), (160, 60, 200)]
    for i in range(6):
        r = int(rng.integers(min(width, height) // 20, min(width, height) // 7))
        cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
        box = [cx - r, cy - r, cx + r, cy + r]
        kind = i % 3
        if kind == 0:
            draw.ellipse(box, fill=colours[i])
        elif kind == 1:
            draw.rectangle(box, fill=colours[i])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colours[i])
    return image
