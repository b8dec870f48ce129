"""trimcpp: keep the image rows a local LLaVA needs (TrimTokenator), so the first token comes sooner."""

from typing import TYPE_CHECKING, Any

from .selection import alignment_scores, available_backends, prune, split_budget

__all__ = [
    "ImageSelection",
    "TrimLlava15ChatHandler",
    "TrimLlava16ChatHandler",
    "alignment_scores",
    "available_backends",
    "prune",
    "split_budget",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .handlers import ImageSelection, TrimLlava15ChatHandler, TrimLlava16ChatHandler

_HANDLERS = ("ImageSelection", "TrimLlava15ChatHandler", "TrimLlava16ChatHandler")


def __getattr__(name: str) -> Any:
    # The handlers load llama-cpp-python's shared libraries: only when asked for.
    if name in _HANDLERS:
        from . import handlers

        return getattr(handlers, name)
    raise AttributeError(f"module 'trimcpp' has no attribute {name!r}")
