"""Chat handlers for llama-cpp-python that hand the LLM fewer image rows.

- :mod:`.mechanism`: what every trimmed handler shares (encode, select, decode the kept rows);
- :mod:`.decode`: the kept rows into the LLM, and the token ids that stand for them;
- one module per model family (:mod:`.llava`: LLaVA-1.5 and 1.6).
"""

from .llava import HANDLERS, TrimLlava15ChatHandler, TrimLlava16ChatHandler
from .mechanism import ImageSelection

__all__ = ["HANDLERS", "ImageSelection", "TrimLlava15ChatHandler", "TrimLlava16ChatHandler"]
