"""The generic handler: llama-cpp-python's ``MTMDChatHandler`` (the GGUF's own chat template, for
any model libmtmd runs: Gemma 3, Qwen2/2.5/3-VL, SmolVLM, InternVL, ...) and ``Gemma4ChatHandler``
on it, with their trimmed counterparts.

Gemma 3 decodes an image's rows non-causally (every row sees every other one): the kept rows go in
together, in one ubatch (see :mod:`.mechanism`)."""

from __future__ import annotations

from llama_cpp.llama_chat_format import Gemma4ChatHandler, MTMDChatHandler

from ..selection import KEEP_SHARE
from .mechanism import Trimming


class TrimMTMDChatHandler(Trimming, MTMDChatHandler):
    """Any libmtmd model with pruned image rows (default 1/9 of each image's rows). Arguments as
    :class:`trimcpp.TrimLlava15ChatHandler`, plus the stock handler's ``use_gpu``."""

    DEFAULT_KEEP = KEEP_SHARE


class TrimGemma4ChatHandler(Trimming, Gemma4ChatHandler):
    """Gemma 4 with pruned image rows (default 1/9 of each image's rows)."""

    DEFAULT_KEEP = KEEP_SHARE
