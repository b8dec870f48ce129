"""The vision encoder's settings of a trimmed handler: flash attention, threads and the image's token
budget, as libmtmd's ``mtmd_context_params`` takes them.

llama-cpp-python's handlers give libmtmd the Llama's ``n_threads`` (half the cores by default) and
turn the encoder's flash attention off unless the LLM's is on; libmtmd's own default, and
``llama-server``'s, is ``auto`` (on wherever the backend supports it, the CPU included). Here the
encoder's settings are its own, so that the LLM's are left alone (flash attention in the LLM can be
slower on a CPU while the encoder gains). ``image_min_tokens`` / ``image_max_tokens`` bound the rows
of dynamic-resolution encoders (Qwen2-VL / 2.5-VL: 8 to 4096 by default); fixed-resolution ones
(LLaVA, Gemma 3) ignore them, so setting them there is an error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import llama_cpp

from ..embeddings import GGUFHeader
from ..llamacpp import FLASH_ATTN

FlashAttn = Union[str, bool]
# Upper bounds (libmtmd takes C ints; beyond these a value is a mistake, not a setting).
MOST = {"threads": 1024, "image_min_tokens": 1 << 20, "image_max_tokens": 1 << 20}

# Projectors whose preprocessing honours image_min_tokens / image_max_tokens (vendored clip.cpp:
# those that call set_limit_image_tokens), with libmtmd's default (min, max) where it has one.
DYNAMIC_PROJECTORS: dict[str, Optional[tuple[int, int]]] = {
    "qwen2vl_merger": (8, 4096), "qwen2.5vl_merger": (8, 4096), "qwen3vl_merger": (8, 4096), "ling3vl": (8, 4096),
    "glm4v": (8, 4096), "pixtral": (8, 1024), "kimivl": (8, 1024), "lfm2": (64, 256), "gemma4v": (70, 1120),
    "gemma4uv": (70, 1120), "minimax_m3": (8, 576), "muse-glimmer": (1, 4096), "youtuvl": (1, 62500),
    "hunyuanvl": (256, 16384), "idefics3": None, "lightonocr": None, "kimik25": None, "glm5v": None, "deepseek4v": None,
}


def projector_type(mmproj: str) -> Optional[str]:
    """The mmproj GGUF's ``clip.projector_type`` (``clip.vision.projector_type`` in newer files)."""
    values = GGUFHeader.read(mmproj).values
    projector = values.get("clip.projector_type") or values.get("clip.vision.projector_type")
    return None if projector is None else str(projector)


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """How a handler's libmtmd context encodes images (see the module doc)."""

    flash_attn: FlashAttn = "auto"  # "auto", True or False
    threads: Optional[int] = None  # None: the Llama's n_threads_batch (every core by default)
    image_min_tokens: Optional[int] = None  # None: the model's own
    image_max_tokens: Optional[int] = None

    def check(self, owner: str, mmproj: str) -> EncoderSettings:
        """These settings, or a ValueError / TypeError naming the argument (`owner` first)."""
        if self.flash_attn not in FLASH_ATTN or not isinstance(self.flash_attn, (str, bool)):
            raise ValueError(f"{owner}: encoder_flash_attn must be 'auto', True or False, got {self.flash_attn!r}")
        for name in ("threads", "image_min_tokens", "image_max_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            argument = "encoder_threads" if name == "threads" else name
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{owner}: {argument} must be an int or None, got {value!r}")
            if not 1 <= value <= MOST[name]:
                raise ValueError(f"{owner}: {argument} must be >= 1 and <= {MOST[name]}, got {value}")
        if self.image_min_tokens is None and self.image_max_tokens is None:
            return self
        try:
            projector = projector_type(mmproj)
        except ValueError as error:
            raise ValueError(f"{owner}: cannot read the mmproj {mmproj!r}: {error}") from None
        if projector not in DYNAMIC_PROJECTORS:
            raise ValueError(f"{owner}: image_min_tokens / image_max_tokens apply to dynamic-resolution encoders "
                             f"(Qwen2-VL, Qwen2.5-VL, ...); this mmproj's projector {projector!r} makes a fixed number "
                             "of rows per image and ignores them")
        low, high = DYNAMIC_PROJECTORS[projector] or (None, None)
        low = self.image_min_tokens or low
        high = self.image_max_tokens or high
        if low is not None and high is not None and low > high:
            raise ValueError(f"{owner}: image_min_tokens {low} > image_max_tokens {high} "
                             f"({projector}'s defaults are {DYNAMIC_PROJECTORS[projector]}); libmtmd refuses that")
        return self

    def fields(self, llama: llama_cpp.Llama) -> dict[str, Any]:
        """The ``mtmd_context_params`` fields for `llama`'s context."""
        fields = {"flash_attn_type": FLASH_ATTN[self.flash_attn],
                  "n_threads": self.threads or llama.n_threads_batch or os.cpu_count() or 1}
        if self.image_min_tokens is not None:
            fields["image_min_tokens"] = self.image_min_tokens
        if self.image_max_tokens is not None:
            fields["image_max_tokens"] = self.image_max_tokens
        return fields

    def rows_key(self) -> tuple:
        """What of these settings changes the rows an encode makes (the image cache's key; not threads)."""
        return self.flash_attn, self.image_min_tokens, self.image_max_tokens
