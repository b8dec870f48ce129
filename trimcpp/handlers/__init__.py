"""Chat handlers for llama-cpp-python that hand the LLM fewer image rows.

- :mod:`.mechanism`: what every trimmed handler shares (encode, select, place and decode the kept rows);
- :mod:`.decode`: the kept rows into the LLM, and the token ids that stand for them;
- :mod:`.encoder`: the image encoder's settings (flash attention, threads, image token budget);
- one module per family of stock handlers: :mod:`.llava` (``Llava15ChatHandler`` and the handlers
  that only change its template), :mod:`.qwen` (Qwen2.5-VL), :mod:`.mtmd` (the GGUF's own template:
  Gemma 3 and any other model libmtmd runs).
"""

from llama_cpp import llama_chat_format as stock

from ..selection import KEEP_SHARE
from .encoder import EncoderSettings
from .llava import (
    TrimLlama3VisionAlphaChatHandler,
    TrimLlava15ChatHandler,
    TrimLlava16ChatHandler,
    TrimMiniCPMv26ChatHandler,
    TrimMoondreamChatHandler,
    TrimNanoLlavaChatHandler,
    TrimObsidianChatHandler,
)
from .mechanism import ImageSelection, Preloaded
from .mtmd import TrimGemma4ChatHandler, TrimMTMDChatHandler
from .qwen import TrimQwen25VLChatHandler

# llama-cpp-python's chat_format name (server and Llama(chat_format=...)) -> (stock, trimmed).
HANDLERS = {
    "llava-1-5": (stock.Llava15ChatHandler, TrimLlava15ChatHandler),
    "llava-1-6": (stock.Llava16ChatHandler, TrimLlava16ChatHandler),
    "obsidian": (stock.ObsidianChatHandler, TrimObsidianChatHandler),
    "moondream": (stock.MoondreamChatHandler, TrimMoondreamChatHandler),
    "nanollava": (stock.NanoLlavaChatHandler, TrimNanoLlavaChatHandler),
    "llama-3-vision-alpha": (stock.Llama3VisionAlphaChatHandler, TrimLlama3VisionAlphaChatHandler),
    "minicpm-v-2.6": (stock.MiniCPMv26ChatHandler, TrimMiniCPMv26ChatHandler),
    "qwen2.5-vl": (stock.Qwen25VLChatHandler, TrimQwen25VLChatHandler),
    "mtmd": (stock.MTMDChatHandler, TrimMTMDChatHandler),
    "gemma4": (stock.Gemma4ChatHandler, TrimGemma4ChatHandler),
}

__all__ = [
    "HANDLERS",
    "KEEP_SHARE",
    "EncoderSettings",
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
]
