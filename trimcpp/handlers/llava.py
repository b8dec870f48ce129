"""The LLaVA-template family: llama-cpp-python's ``Llava15ChatHandler`` and the handlers built on
it with their own prompt templates (LLaVA-1.6, Obsidian, Moondream, nanoLLaVA, Llama-3-Vision-Alpha,
MiniCPM-V 2.6), each with its trimmed counterpart. Qwen2.5-VL, also built on it, is in
:mod:`.qwen`."""

from __future__ import annotations

from llama_cpp.llama_chat_format import (
    Llama3VisionAlphaChatHandler,
    Llava15ChatHandler,
    Llava16ChatHandler,
    MiniCPMv26ChatHandler,
    MoondreamChatHandler,
    NanoLlavaChatHandler,
    ObsidianChatHandler,
)

from ..selection import KEEP_SHARE
from .mechanism import Trimming


class TrimLlava15ChatHandler(Trimming, Llava15ChatHandler):
    """LLaVA-1.5 with pruned image rows: ``keep`` rows per image (default 64 of 576).

    Args:
        clip_model_path: the mmproj GGUF.
        keep: rows kept per image: an int, a float share of the image's rows in (0, 1], or None
            to keep every row.
        method: a selection method of :func:`trimcpp.prune` ("trimtokenator" by default).
        stage1_ratio: share of the rows that survive TrimTokenator's alignment stage, or "adaptive".
        alignment: stage 1's score, "l2" (the paper's) or "cosine" (see trimcpp.prune).
        backend: selection backend ("cpu", "cuda", "metal"), None to choose by size (see prune).
        follow_ups, image_cache_bytes, reuse_kv: conversations (README, "Conversations").
        encoder_flash_attn: flash attention in the image encoder: "auto" (libmtmd's default: on where
            the backend supports it), True or False; the LLM's own is the Llama's ``flash_attn``.
        encoder_threads: the image encoder's CPU threads (None: the Llama's ``n_threads_batch``).
        image_min_tokens, image_max_tokens: fewest / most rows per image for dynamic-resolution
            encoders (Qwen2-VL, Qwen2.5-VL, ...; None: the model's own); an error for others.
        verbose: as the stock handler (libmtmd's log and the rendered prompt).
        **kwargs: passed to the stock handler.

    After each call, ``last_selection`` holds one :class:`ImageSelection` per image;
    :meth:`preload` encodes a picture before its question comes. Every trimmed handler takes these
    arguments; only the default ``keep`` differs.
    """

    DEFAULT_KEEP = 64


class TrimLlava16ChatHandler(Trimming, Llava16ChatHandler):
    """LLaVA-1.6 (NeXT) with pruned image rows: ``keep`` rows per image (default 320), split over the
    image's overview and slices with :func:`trimcpp.split_budget`. Arguments as
    :class:`TrimLlava15ChatHandler`."""

    DEFAULT_KEEP = 320


class TrimObsidianChatHandler(Trimming, ObsidianChatHandler):
    """Obsidian (LLaVA-style) with pruned image rows (default 1/9 of each image's rows)."""

    DEFAULT_KEEP = KEEP_SHARE


class TrimMoondreamChatHandler(Trimming, MoondreamChatHandler):
    """Moondream 2 with pruned image rows (default 1/9 of each image's rows)."""

    DEFAULT_KEEP = KEEP_SHARE


class TrimNanoLlavaChatHandler(Trimming, NanoLlavaChatHandler):
    """nanoLLaVA with pruned image rows (default 1/9 of each image's rows)."""

    DEFAULT_KEEP = KEEP_SHARE


class TrimLlama3VisionAlphaChatHandler(Trimming, Llama3VisionAlphaChatHandler):
    """Llama-3-Vision-Alpha with pruned image rows (default 1/9 of each image's rows)."""

    DEFAULT_KEEP = KEEP_SHARE


class TrimMiniCPMv26ChatHandler(Trimming, MiniCPMv26ChatHandler):
    """MiniCPM-V 2.6 with pruned image rows (default 1/9 of each image's rows, split over the
    image's overview and slices as for LLaVA-1.6)."""

    DEFAULT_KEEP = KEEP_SHARE
