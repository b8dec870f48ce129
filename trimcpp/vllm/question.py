"""Stage 1's text from a prompt vLLM rendered with the model's chat template (ALGORITHM.md: the text of
the user messages, without the template's boilerplate or special tokens).

vLLM's multimodal processor sees the whole templated prompt as token ids, not the messages. The
template tells where a user message starts and ends: rendered for a probe conversation (user, assistant,
user, with marker texts), the text right before each user marker that both user turns share is the
opener, the text right after that both share is the closer. In a real prompt, a user message is then
what lies between an opener and the next closer. A prompt that does not follow the template (a raw
prompt, the profiling run's dummy) counts as one user message.

Each image gets the user messages up to and including the one it came in (the handlers' "keep-rows"
rule): a later turn does not change the rows an earlier picture got, so vLLM's prefix cache still
holds for follow-ups.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

_MARKERS = ("TRIMCPPxUSERx0", "TRIMCPPxASSISTANTx0", "TRIMCPPxUSERx1")  # no white space: templates trim


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def _common_suffix(a: str, b: str) -> str:
    return os.path.commonprefix([a[::-1], b[::-1]])[::-1]


def turn_markers(tokenizer: Any) -> Optional[tuple[str, str]]:
    """(opener, closer) of a user message in the tokenizer's chat template, or None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for parts in (True, False):
        messages = [{"role": role, "content": [{"type": "text", "text": text}] if parts else text}
                    for role, text in zip(("user", "assistant", "user"), _MARKERS)]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that rejects this content form: try the other
            continue
        if not isinstance(rendered, str) or not all(rendered.count(m) == 1 for m in _MARKERS):
            continue
        u0, a0, u1 = (rendered.index(m) for m in _MARKERS)
        before = (rendered[:u0], rendered[a0 + len(_MARKERS[1]):u1])
        after = (rendered[u0 + len(_MARKERS[0]):a0], rendered[u1 + len(_MARKERS[2]):])
        opener, closer = _common_suffix(*before), _common_prefix(*after)
        if opener and closer:
            return opener, closer
    return None


def user_spans(text: str, markers: Optional[tuple[str, str]]) -> list[tuple[int, int]]:
    """[start, end) character spans of the user messages in `text` (the whole text without markers)."""
    if markers is None:
        return [(0, len(text))]
    opener, closer = markers
    spans, at = [], 0
    while (start := text.find(opener, at)) >= 0:
        start += len(opener)
        end = text.find(closer, start)
        end = len(text) if end < 0 else end
        spans.append((start, end))
        at = end
    return spans or [(0, len(text))]


class QuestionReader:
    """Per-image stage-1 token ids from a templated prompt's token ids."""

    def __init__(self, tokenizer: Any, image_token: str):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.markers = turn_markers(tokenizer)
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special |= {i for i, token in added.items() if getattr(token, "special", False)}
        texts = {tokenizer.convert_ids_to_tokens(i) for i in self.special} | {image_token}
        self.special_texts = sorted((t for t in texts if t), key=len, reverse=True)

    def ids(self, text: str) -> list[int]:
        """`text` without special tokens (an image's placeholders are special) and the white space around
        them at its ends, tokenised."""
        for token in self.special_texts:
            text = text.replace(token, "")
        ids = self.tokenizer.encode(text.strip(), add_special_tokens=False)
        return [i for i in ids if i not in self.special]

    def per_image(self, prompt_ids: Sequence[int], images: int) -> list[list[int]]:
        """For each of the prompt's `images` images (in order), the token ids of the user messages up
        to and including the one it is in. An image whose placeholder is not found gets all of them."""
        text = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
        spans = user_spans(text, self.markers)
        places, at = [], 0
        while len(places) < images and (hit := text.find(self.image_token, at)) >= 0:
            places.append(hit)
            at = hit + len(self.image_token)
        messages = [self.ids(text[a:b]) for a, b in spans]
        result = []
        for k in range(images):
            last = len(spans) - 1
            if k < len(places):
                last = next((i for i, (_, b) in enumerate(spans) if places[k] < b), last)
            result.append([i for message in messages[:last + 1] for i in message])
        return result
