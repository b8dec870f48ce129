"""The token ids of the stock LLaVA-1.5 prompt, taken from libmtmd itself, so training sees exactly
the sequence llama-cpp-python's handler builds."""

from __future__ import annotations

import io

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
from llama_cpp.llama_chat_format import Llava15ChatHandler
from PIL import Image

from ...images import image_messages
from ...llamacpp import MtmdView, input_chunks, is_image, quiet_logs, set_view, text_tokens
from .stages import MINI


class Captured(Exception):
    """Stops the stock handler once libmtmd has tokenised the prompt: the text ids around each image."""

    def __init__(self, parts: list[list[int]]):
        super().__init__("captured")
        self.parts = parts


class CaptureTokens(MtmdView):
    """libmtmd for a stock handler that only tokenises: the prompt's text ids, split at the images."""

    def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n_bitmaps):
        status = mtmd_cpp.mtmd_tokenize(ctx, chunks, text, bitmaps, n_bitmaps)
        if status != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({status})")
        parts: list[list[int]] = [[]]
        for chunk in input_chunks(chunks):
            if is_image(chunk):
                parts.append([])
            else:
                parts[-1] += text_tokens(chunk)
        raise Captured(parts)


class Template:
    """Token ids of the stock LLaVA-1.5 prompt around the image, as libmtmd tokenises it."""

    def __init__(self, llm_path: str, mmproj_path: str):
        quiet_logs(False)
        handler = Llava15ChatHandler(clip_model_path=mmproj_path, verbose=False)
        set_view(handler, CaptureTokens())
        self.llama = llama_cpp.Llama(model_path=llm_path, chat_handler=handler, n_ctx=1024, verbose=False)
        self._cache: dict[str, list[int]] = {}
        self.before, _ = self._capture("x")

    def _capture(self, question: str) -> tuple[list[int], list[int]]:
        buffer = io.BytesIO()
        Image.new("RGB", (MINI.image_size, MINI.image_size)).save(buffer, "PNG")
        try:
            self.llama.create_chat_completion(messages=image_messages(buffer.getvalue(), question), max_tokens=1)
        except Captured as done:
            before, after = done.parts
            return before, after
        raise RuntimeError("libmtmd's tokenisation was not captured")

    def after(self, question: str) -> list[int]:
        """The ids between the image rows and the answer: the question and the generation prompt."""
        if question not in self._cache:
            self._cache[question] = self._capture(question)[1]
        return self._cache[question]

    def answer(self, word: str) -> int:
        [token] = self.answer_tokens(word)
        return token

    def answer_tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode(), add_bos=False, special=False)
