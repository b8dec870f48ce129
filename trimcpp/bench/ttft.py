"""Time to first token: a llama-cpp-python stock handler against its trimmed counterpart, side by side.

One ``Llama`` serves both handlers. Each round runs the stock handler, then the trimmed handler at
every budget (interleaved, so drifts in machine speed hit all of them alike); the table holds the
medians over the rounds. A request is the user's image and question with ``max_tokens=1``, so its
wall time is the time to the first answer token. Its parts:

- encode: libmtmd's image encoder (the same work for both handlers);
- select: trimcpp's row selection (stock: none);
- prefill: the rest, i.e. the LLM's work on the text and image rows and the first token.

The stock handler runs unchanged except that its image step, libmtmd's
``mtmd_helper_eval_chunk_single``, is called as the two halves that function is made of
(``mtmd_encode_chunk``, then ``mtmd_helper_decode_image_chunk`` on the encoder's output), so the
encode can be timed; the test suite checks that its logits stay bit-identical to the plain stock call.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp

from ..handlers import HANDLERS
from ..llamacpp import MtmdView, is_image, load_llama, load_mmproj, set_view
from . import machine

Step = Callable[[str], None]  # called once per finished request, with what ran


class EncodeTimer(MtmdView):
    """``llama_cpp.mtmd_cpp`` for the stock handler, with the image step split to time the encode."""

    def __init__(self) -> None:
        self.encode_seconds = 0.0
        self.rows = 0

    def mtmd_helper_eval_chunk_single(self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past):
        if not is_image(chunk):
            return mtmd_cpp.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past)
        began = time.perf_counter()
        status = mtmd_cpp.mtmd_encode_chunk(ctx, chunk)
        self.encode_seconds += time.perf_counter() - began
        if status != 0:
            return status
        self.rows += mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        return mtmd_cpp.mtmd_helper_decode_image_chunk(
            ctx, lctx, chunk, mtmd_cpp.mtmd_get_output_embd(ctx), n_past, seq_id, n_batch, new_n_past,
            mtmd_cpp.mtmd_helper_post_decode_callback(), None,  # a NULL callback, as the helper passes
        )


class TimedStock:
    """Mixed in before a stock handler: its libmtmd calls go through an :class:`EncodeTimer`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timer = EncodeTimer()
        set_view(self, self.timer)


def timed_stock(chat_format: str, clip_model_path: str, **kwargs: Any) -> TimedStock:
    """The stock handler of `chat_format` (a key of trimcpp.handlers.HANDLERS) with its encode timed
    (see the module doc)."""
    stock = HANDLERS[chat_format][0]
    timed = type(f"Timed{stock.__name__}", (TimedStock, stock), {})
    return timed(clip_model_path=clip_model_path, **kwargs)


@dataclasses.dataclass
class Sample:
    """One request."""

    rows: int  # image rows libmtmd produced
    kept: int  # rows the LLM prefilled
    encode_s: float
    select_s: float
    ttft_s: float

    @property
    def prefill_s(self) -> float:
        return self.ttft_s - self.encode_s - self.select_s


def request(llama: llama_cpp.Llama, handler: Any, messages: list[dict]) -> Sample:
    """Runs `messages` through `handler` up to the first answer token and times it."""
    llama.chat_handler = handler
    stock = isinstance(handler, TimedStock)
    if stock:
        handler.timer.encode_seconds, handler.timer.rows = 0.0, 0
    began = time.perf_counter()
    llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    ttft = time.perf_counter() - began
    if stock:
        timer = handler.timer
        return Sample(timer.rows, timer.rows, timer.encode_seconds, 0.0, ttft)
    images = handler.last_selection
    return Sample(sum(i.rows for i in images), sum(i.kept for i in images), sum(i.encode_seconds for i in images),
                  sum(i.select_seconds for i in images), ttft)


def run(model: str, mmproj: str, messages: list[dict], keeps: Sequence[int], *, repeat: int = 3,
        chat_format: str = "llava-1-5",
        method: str = "trimtokenator", n_ctx: int = 2048, threads: Optional[int] = None,
        on_step: Optional[Step] = None) -> dict[str, Any]:
    """Measures the stock handler and the trimmed one at each of `keeps`, `repeat` rounds, interleaved.

    Before the rounds: both handlers load the mmproj, and one untimed trimmed request (the smallest
    budget) pages the model files in. Returns the settings, the machine, and one entry per handler
    with the medians and every run.
    """
    stock = timed_stock(chat_format, mmproj, verbose=False)
    # Every request is a first question: no image cache, no KV reuse (`--turns` measures those).
    trimmed = HANDLERS[chat_format][1](clip_model_path=mmproj, keep=min(keeps), method=method, image_cache_bytes=0,
                                       reuse_kv=False, verbose=False)
    llama = load_llama(model, stock, n_ctx=n_ctx, threads=threads)
    for handler in (stock, trimmed):
        load_mmproj(handler, llama)
    request(llama, trimmed, messages)
    if on_step:
        on_step("warm-up")
    configs: list[Optional[int]] = [None, *keeps]  # None: stock
    samples: dict[Optional[int], list[Sample]] = {c: [] for c in configs}
    for round_ in range(repeat):
        for keep in configs:
            if keep is not None:
                trimmed.keep = keep
            samples[keep].append(request(llama, stock if keep is None else trimmed, messages))
            if on_step:
                on_step(f"{'stock' if keep is None else f'keep {keep}'}, round {round_ + 1}/{repeat}")
    base = statistics.median(s.ttft_s for s in samples[None])
    entries = []
    for keep in configs:
        runs = samples[keep]
        ttft = statistics.median(s.ttft_s for s in runs)
        entries.append({
            "handler": "stock" if keep is None else "trimmed", "keep": keep,
            "rows": runs[0].rows, "kept": runs[0].kept,
            "encode_s": statistics.median(s.encode_s for s in runs),
            "select_ms": 1e3 * statistics.median(s.select_s for s in runs),
            "prefill_s": statistics.median(s.prefill_s for s in runs),
            "ttft_s": ttft, "speedup": base / ttft,
            "runs": [{"encode_s": s.encode_s, "select_ms": 1e3 * s.select_s, "prefill_s": s.prefill_s,
                      "ttft_s": s.ttft_s} for s in runs],
        })
    return {"model": model, "mmproj": mmproj, "chat_format": chat_format, "method": method, "repeat": repeat, "n_ctx": n_ctx,
            "threads": llama.n_threads, "machine": machine(), "results": entries}


def table(result: dict[str, Any]) -> str:
    """The medians as a text table."""
    lines = [f"{'image rows':>14}  {'encode s':>8}  {'select ms':>9}  {'prefill s':>9}  {'first token s':>13}  {'speedup':>7}"]
    for e in result["results"]:
        label = f"{e['kept']} (stock)" if e["handler"] == "stock" else f"{e['kept']} of {e['rows']}"
        lines.append(f"{label:>14}  {e['encode_s']:8.2f}  {e['select_ms']:9.1f}  {e['prefill_s']:9.2f}  "
                     f"{e['ttft_s']:13.2f}  {e['speedup']:6.2f}x")
    return "\n".join(lines)
