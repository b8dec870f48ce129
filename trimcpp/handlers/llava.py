"""LLaVA-1.5 and LLaVA-1.6 (NeXT): the trimmed counterparts of llama-cpp-python's handlers."""

from __future__ import annotations

from llama_cpp.llama_chat_format import Llava15ChatHandler, Llava16ChatHandler

from .mechanism import Trimming


class TrimLlava15ChatHandler(Trimming, Llava15ChatHandler):
    """LLaVA-1.5 with pruned image rows: ``keep`` rows per image (default 64 of 576).

    Args:
        clip_model_path: the mmproj GGUF.
        keep: rows kept per image: an int, a float share of the image's rows in (0, 1], or None
            to keep every row.
        method: a selection method of :func:`trimcpp.prune` ("trimtokenator" by default).
        stage1_ratio: share of the rows that survive TrimTokenator's alignment stage.
        backend: selection backend ("cpu", "cuda", "metal"), None to choose by size (see prune).
        verbose: as the stock handler (libmtmd's log and the rendered prompt).
        **kwargs: passed to the stock handler.

    After each call, ``last_selection`` holds one :class:`ImageSelection` per image.
    """

    DEFAULT_KEEP = 64


class TrimLlava16ChatHandler(Trimming, Llava16ChatHandler):
    """LLaVA-1.6 (NeXT) with pruned image rows: ``keep`` rows per image (default 320), split over the
    image's overview and slices with :func:`trimcpp.split_budget`. Arguments as
    :class:`TrimLlava15ChatHandler`."""

    DEFAULT_KEEP = 320


# LLaVA version (as trimcpp.layout reads it from the mmproj) -> (stock handler, trimmed handler).
HANDLERS = {"1.5": (Llava15ChatHandler, TrimLlava15ChatHandler), "1.6": (Llava16ChatHandler, TrimLlava16ChatHandler)}
