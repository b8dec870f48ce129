"""trimcpp: keep the image rows a local vision LLM needs (TrimTokenator), so the first token comes sooner."""

from typing import TYPE_CHECKING, Any

from .selection import alignment_scores, available_backends, prune, split_budget

__all__ = [
    "ImageSelection",
    "Preloaded",
    "TrimGemma4ChatHandler",
    "TrimLlama3VisionAlphaChatHandler",
    "TrimLlava15ChatHandler",
    "TrimLlava16ChatHandler",
    "TrimMTMDChatHandler",
    "TrimMiniCPMv26ChatHandler",
    "TrimMoondreamChatHandler",
    "TrimNanoLlavaChatHandler",
    "TrimObsidianChatHandler",
    "TrimQwen25VLChatHandler",
    "alignment_scores",
    "available_backends",
    "prune",
    "split_budget",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .handlers import (
        ImageSelection,
        Preloaded,
        TrimGemma4ChatHandler,
        TrimLlama3VisionAlphaChatHandler,
        TrimLlava15ChatHandler,
        TrimLlava16ChatHandler,
        TrimMiniCPMv26ChatHandler,
        TrimMoondreamChatHandler,
        TrimMTMDChatHandler,
        TrimNanoLlavaChatHandler,
        TrimObsidianChatHandler,
        TrimQwen25VLChatHandler,
    )


def __getattr__(name: str) -> Any:
    # The handlers load llama-cpp-python's shared libraries: only when asked for.
    if name in __all__:
        from . import handlers

        return getattr(handlers, name)
    raise AttributeError(f"module 'trimcpp' has no attribute {name!r}")
