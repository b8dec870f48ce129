"""Qwen2.5-VL: the trimmed counterpart of llama-cpp-python's ``Qwen25VLChatHandler``.

Its LLM uses M-RoPE: the kept rows keep their original (t, y, x) positions and the prompt goes on
where the stock handler's does (see :mod:`.mechanism`); nothing here is specific to that, libmtmd
says so at run time."""

from __future__ import annotations

from typing import Any

from llama_cpp.llama_chat_format import Llava15ChatHandler, Qwen25VLChatHandler

from ..selection import KEEP_SHARE
from .mechanism import Trimming


class TrimQwen25VLChatHandler(Trimming, Qwen25VLChatHandler):
    """Qwen2.5-VL with pruned image rows (default 1/9 of each image's rows: a picture gives one row
    per 28 x 28 pixels, so the count follows its size). Arguments as
    :class:`trimcpp.TrimLlava15ChatHandler`."""

    DEFAULT_KEEP = KEEP_SHARE

    def stock_call(self, **kwargs: Any) -> Any:
        # Qwen25VLChatHandler.__call__ only empties the KV cache and the Llama's token ids before
        # Llava15ChatHandler's (the stock code never writes ids at image positions); trimcpp writes
        # them and empties the cache itself unless it can reuse it.
        return Llava15ChatHandler.__call__(self, **kwargs)
