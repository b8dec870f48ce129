"""Time to first token over a conversation (``trimcpp bench --turns N``): the stock handler against
the trimmed one in each follow-up mode, turn by turn.

Every handler has its own ``Llama`` (so each keeps its own KV cache between its turns) and plays
the same conversation: one picture, N questions, each answer (the handler's own, up to
``answer_tokens`` tokens, greedy) appended as the assistant message before the next question. The
turns are interleaved (turn 1 of every handler, then turn 2, ...) and the rounds repeated, so drifts
in machine speed hit all of them alike; the table holds medians. The time to first token is the
time from the call to the first streamed chunk (the prompt's processing, then one token).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable, Optional, Sequence

from ..handlers import HANDLERS
from ..images import image_messages
from ..llamacpp import load_llama, load_mmproj
from ..selection import DEFAULT_STAGE1_RATIO, Stage1
from . import machine

QUESTIONS = ("What is in the image?", "What colour is the largest shape?", "How many shapes are there?",
             "Which shape is on the left?", "Is there a circle?", "What is at the top?")
MODES = ("keep-rows", "reselect")

Step = Callable[[str], None]


def turn(llama: Any, messages: list[dict], answer_tokens: int) -> tuple[float, str]:
    """One request, streamed: (time to the first chunk, the answer's text)."""
    began = time.perf_counter()
    first: Optional[float] = None
    parts = []
    for chunk in llama.create_chat_completion(messages=messages, stream=True, max_tokens=answer_tokens,
                                              temperature=0.0):
        if first is None:
            first = time.perf_counter() - began
        parts.append(chunk["choices"][0]["delta"].get("content") or "")
    return (time.perf_counter() - began if first is None else first), "".join(parts)


def run(model: str, mmproj: str, image: bytes, turns: int, *, keep: int, chat_format: str = "llava-1-5",
        method: str = "trimtokenator", stage1_ratio: Stage1 = DEFAULT_STAGE1_RATIO, repeat: int = 3,
        answer_tokens: int = 16, n_ctx: int = 4096, threads: Optional[int] = None, encoder: Optional[dict[str, Any]] = None,
        on_step: Optional[Step] = None) -> dict[str, Any]:
    """Plays the conversation `repeat` times through the stock handler and the trimmed one in each
    follow-up mode (KV reuse and image cache on); returns the settings, the machine and, per handler,
    the median time to first token of each turn and every run. `encoder`: the trimmed handlers' encoder
    arguments (the stock handler keeps its own)."""
    if not 1 <= turns <= len(QUESTIONS):
        raise ValueError(f"turns must be in 1..{len(QUESTIONS)}, got {turns}")
    stock, trimmed = HANDLERS[chat_format]
    names = ["stock", *MODES]
    samples: dict[str, list[list[float]]] = {name: [[] for _ in range(turns)] for name in names}
    kept: dict[str, list[int]] = {name: [0] * turns for name in names}
    reused: dict[str, list[int]] = {name: [0] * turns for name in names}
    for round_ in range(repeat):
        handlers = {"stock": stock(clip_model_path=mmproj, verbose=False)}
        handlers.update({mode: trimmed(clip_model_path=mmproj, keep=keep, method=method, stage1_ratio=stage1_ratio,
                                       follow_ups=mode, verbose=False, **(encoder or {})) for mode in MODES})
        llamas = {name: load_llama(model, handler, n_ctx=n_ctx, threads=threads) for name, handler in handlers.items()}
        for name, handler in handlers.items():
            load_mmproj(handler, llamas[name])
        conversations = {name: image_messages(image, QUESTIONS[0]) for name in names}
        for t in range(turns):
            for name in names:
                seconds, answer = turn(llamas[name], conversations[name], answer_tokens)
                samples[name][t].append(seconds)
                handler = handlers[name]
                if name != "stock":
                    kept[name][t] = sum(s.kept for s in handler.last_selection)
                    reused[name][t] = handler.last_reused
                if t + 1 < turns:
                    conversations[name] = conversations[name] + [
                        {"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[t + 1]}]
                if on_step:
                    on_step(f"{name}, turn {t + 1}/{turns}, round {round_ + 1}/{repeat}")
        for llama in llamas.values():
            llama.close()  # frees the KV cache and the model before the next round's
        del llamas, handlers
        gc.collect()
    stock_median = [statistics.median(samples["stock"][t]) for t in range(turns)]
    entries = []
    for name in names:
        medians = [statistics.median(samples[name][t]) for t in range(turns)]
        entries.append({"handler": name, "ttft_s": medians, "speedup": [b / m for b, m in zip(stock_median, medians)],
                        "kept": None if name == "stock" else kept[name],
                        "reused": None if name == "stock" else reused[name], "runs": samples[name]})
    return {"model": model, "mmproj": mmproj, "chat_format": chat_format, "method": method, "keep": keep,
            "stage1_ratio": stage1_ratio,
            "turns": turns, "questions": list(QUESTIONS[:turns]), "answer_tokens": answer_tokens, "repeat": repeat,
            "n_ctx": n_ctx, "machine": machine(), "results": entries}


def table(result: dict[str, Any]) -> str:
    """Median time to first token per turn (seconds), and the speedup over stock at that turn."""
    turns = result["turns"]
    lines = [f"{'handler':<22}" + "".join(f"{'turn ' + str(t + 1):>16}" for t in range(turns))]
    for e in result["results"]:
        label = "stock" if e["handler"] == "stock" else f"trimmed, {e['handler']}"
        lines.append(f"{label:<22}" + "".join(f"{s:>8.2f} s {x:>5.1f}x" for s, x in zip(e["ttft_s"], e["speedup"])))
    lines.append(f"time to first token, medians of {result['repeat']} rounds; speedup over stock at the same turn; "
                 f"trimmed keep {result['keep']}, stage-1 share {result.get('stage1_ratio', DEFAULT_STAGE1_RATIO)}")
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> Sequence[str]:
    """Per trimmed mode: rows kept and prompt positions found in the KV cache, turn by turn."""
    return [f"{e['handler']}: kept rows {e['kept']}, positions reused {e['reused']}"
            for e in result["results"] if e["handler"] != "stock"]
