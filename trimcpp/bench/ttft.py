"""Time to first token: a llama-cpp-python stock handler against its trimmed counterpart, side by side.

Each round runs every configuration once (interleaved, so drifts in machine speed hit all of them
alike); the table holds the medians over the rounds. A request is the user's image and question with
``max_tokens=1``, so its wall time is the time to the first answer token. The configurations:

- stock, plain ``Llama(...)``: the stock handler as on a Llama made with llama-cpp-python's defaults,
  as a user gets it: its encoder on ``n_threads``, half the cores, flash attention off (the LLM's
  prefill runs on ``n_threads_batch``, every core, as on the benchmark's Llama, which it shares);
- stock: the stock handler on the benchmark's Llama (every core; the stock handler's encoder
  settings: flash attention off, ``n_threads``); the ratio trimcpp claims is against this one;
- stock, trimcpp's encoder settings: the same, with the encoder settings the trimmed handler uses
  (flash attention ``auto``, every core): what pruning alone earns is the ratio against this one;
- trimmed at each budget (every request a first question: no image cache, no KV reuse);
- with ``image_max_tokens``: stock with trimcpp's encoder settings and trimmed at the smallest
  budget, both with that token budget for the encoder.

One stock and one trimmed handler serve every row, set up before each request (untimed), so that the
process holds two mmproj contexts (a 7B Qwen tower's is over a GB). Before the rounds, the first
request of the fresh stock and trimmed handlers are timed (``cold``: loading the mmproj and, for
trimmed, opening the token-embedding table included).
A request's parts:

- encode: libmtmd's image encoder;
- select: trimcpp's row selection (stock: none);
- prefill: the rest, i.e. the LLM's work on the text and image rows and the first token.

The stock handler runs unchanged except that its image step, libmtmd's
``mtmd_helper_eval_chunk_single``, is called as the two halves that function is made of
(``mtmd_encode_chunk``, then ``mtmd_helper_decode_image_chunk`` on the encoder's output), so the
encode can be timed; the test suite checks that its logits stay bit-identical to the plain stock call.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp

from ..handlers import HANDLERS
from ..handlers.encoder import EncoderSettings
from ..llamacpp import EncoderParams, configure_encoder, free_encoder, is_image, load_llama, load_mmproj, set_view
from . import machine

Step = Callable[[str], None]  # called once per finished request, with what ran


class EncodeTimer(EncoderParams):
    """``llama_cpp.mtmd_cpp`` for the stock handler, with the image step split to time the encode."""

    def __init__(self) -> None:
        super().__init__()
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
    return Sample(sum(i.rows for i in images), sum(i.kept for i in images),
                  sum(i.encode_seconds + i.wait_seconds for i in images), sum(i.select_seconds for i in images), ttft)


@dataclasses.dataclass
class Config:
    """One row of the table: which handler, set up how (before the request, untimed)."""

    name: str  # stock-plain, stock, stock-encoder, trimmed
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # a stock handler's encoder fields
    keep: Optional[int] = None
    image_max_tokens: Optional[int] = None

    @property
    def stock(self) -> bool:
        return self.name.startswith("stock")

    def label(self) -> str:
        text = {"stock-plain": "stock, plain Llama()", "stock": "stock", "stock-encoder": "stock, our encoder",
                "trimmed": "trimmed"}[self.name]
        return text + ("" if self.image_max_tokens is None else f", max {self.image_max_tokens}")


class Bench:
    """One stock and one trimmed handler on one Llama, set up for each configuration in turn (a
    stock handler's context is made again when its settings change; so is the trimmed handler's):
    one mmproj context each, whatever the number of rows in the table."""

    def __init__(self, llama: llama_cpp.Llama, stock: TimedStock, trimmed: Any, messages: list[dict]):
        self.llama, self.stock, self.trimmed, self.messages = llama, stock, trimmed, messages
        self._fields: Optional[dict[str, Any]] = None

    def prepare(self, config: Config) -> None:
        if config.stock:
            if self._fields != config.fields:
                configure_encoder(self.stock, self.llama, **config.fields)
                self._fields = config.fields
            return
        handler = self.trimmed
        handler.keep, handler.image_max_tokens = config.keep, config.image_max_tokens
        load_mmproj(handler, self.llama)  # a new context now if the token limit changed
        handler.image_cache.clear()  # every request a first question

    def run(self, config: Config) -> Sample:
        self.prepare(config)
        if config.stock:
            return request(self.llama, self.stock, self.messages)
        return request(self.llama, self.trimmed, self.messages)


def run(model: str, mmproj: str, messages: list[dict], keeps: Sequence[int], *, repeat: int = 3,
        chat_format: str = "llava-1-5", method: str = "trimtokenator", n_ctx: int = 2048, threads: Optional[int] = None,
        encoder: Optional[EncoderSettings] = None, image_max_tokens: Optional[int] = None,
        on_step: Optional[Step] = None) -> dict[str, Any]:
    """Measures every configuration of the module doc, `repeat` rounds, interleaved. `encoder`: the
    trimmed handler's encoder settings (default: its defaults). Returns the settings, the machine, the cold
    requests and one entry per configuration with the medians and every run."""
    encoder = encoder or EncoderSettings()
    llama = load_llama(model, None, n_ctx=n_ctx, threads=threads)
    # A default Llama(...): n_threads half the cores, flash attention off; the stock handler gives its
    # encoder both. (Its LLM prefill runs on n_threads_batch, every core, as the benchmark's Llama.)
    plain_threads = max(multiprocessing.cpu_count() // 2, 1)
    off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    stock_fields = {"flash_attn_type": off, "n_threads": llama.n_threads}  # what the stock handler sets here
    configs = [Config("stock-plain", {"flash_attn_type": off, "n_threads": plain_threads}),
               Config("stock", stock_fields), Config("stock-encoder", encoder.fields(llama))]
    configs += [Config("trimmed", keep=keep, image_max_tokens=encoder.image_max_tokens) for keep in keeps]
    if image_max_tokens is not None:
        limited = dataclasses.replace(encoder, image_max_tokens=image_max_tokens)
        configs += [Config("stock-encoder", limited.fields(llama), image_max_tokens=image_max_tokens),
                    Config("trimmed", keep=min(keeps), image_max_tokens=image_max_tokens)]

    stock = timed_stock(chat_format, mmproj, verbose=False)
    trimmed = HANDLERS[chat_format][1](clip_model_path=mmproj, keep=min(keeps), method=method, verbose=False,
                                       reuse_kv=False, encoder_flash_attn=encoder.flash_attn,
                                       encoder_threads=encoder.threads, image_min_tokens=encoder.image_min_tokens,
                                       image_max_tokens=encoder.image_max_tokens)
    bench = Bench(llama, stock, trimmed, messages)
    # A throwaway stock handler's request pages the model files in; then the first requests of the
    # fresh stock and trimmed handlers (cold: their mmproj load, and the token table, included).
    throwaway = timed_stock(chat_format, mmproj, verbose=False)
    request(llama, throwaway, messages)
    free_encoder(throwaway)
    bench._fields = stock_fields  # the stock handler's own first load is the cold request's
    cold = {"stock": request(llama, stock, messages).ttft_s}
    trimmed.image_cache.clear()
    cold["trimmed"] = request(llama, trimmed, messages).ttft_s
    if on_step:
        on_step("warm-up and cold requests")
    samples: list[list[Sample]] = [[] for _ in configs]
    for round_ in range(repeat):
        for config, runs in zip(configs, samples):
            runs.append(bench.run(config))
            if on_step:
                on_step(f"{config.label()}{'' if config.keep is None else f' {config.keep}'}, round {round_ + 1}/{repeat}")
    median = lambda runs, key: statistics.median(getattr(s, key) for s in runs)  # noqa: E731
    base = median(samples[1], "ttft_s")
    same = {c.image_max_tokens: median(runs, "ttft_s") for c, runs in zip(configs, samples) if c.name == "stock-encoder"}
    plain_s = median(samples[0], "ttft_s")
    entries = []
    for config, runs in zip(configs, samples):
        ttft = median(runs, "ttft_s")
        entries.append({
            "handler": config.name, "label": config.label(), "keep": config.keep,
            "image_max_tokens": config.image_max_tokens,
            "rows": runs[0].rows, "kept": runs[0].kept,
            "encode_s": median(runs, "encode_s"), "select_ms": 1e3 * median(runs, "select_s"),
            "prefill_s": statistics.median(s.prefill_s for s in runs), "ttft_s": ttft,
            "speedup": base / ttft, "speedup_same_settings": same[config.image_max_tokens] / ttft,
            "speedup_plain": plain_s / ttft,
            "runs": [{"encode_s": s.encode_s, "select_ms": 1e3 * s.select_s, "prefill_s": s.prefill_s,
                      "ttft_s": s.ttft_s} for s in runs],
        })
    warm_trimmed = next(e["ttft_s"] for e in entries if e["handler"] == "trimmed" and e["keep"] == min(keeps)
                        and e["image_max_tokens"] == encoder.image_max_tokens)
    return {"model": model, "mmproj": mmproj, "chat_format": chat_format, "method": method, "repeat": repeat, "n_ctx": n_ctx,
            "threads": llama.n_threads, "plain_threads": plain_threads,
            "encoder": dataclasses.asdict(encoder), "machine": machine(),
            "cold": {"stock_s": cold["stock"], "stock_warm_s": base, "trimmed_s": cold["trimmed"],
                     "trimmed_warm_s": warm_trimmed, "keep": min(keeps)},
            "results": entries}


def table(result: dict[str, Any]) -> str:
    """The medians as a text table, then the cold requests."""
    lines = [f"{'':<28} {'image rows':>11}  {'encode s':>8}  {'select ms':>9}  {'prefill s':>9}  {'first token s':>13}  "
             f"{'vs stock':>8}  {'vs same encoder':>15}"]
    for e in result["results"]:
        rows = f"{e['kept']} of {e['rows']}"
        lines.append(f"{e['label']:<28} {rows:>11}  {e['encode_s']:8.2f}  {e['select_ms']:9.1f}  {e['prefill_s']:9.2f}  "
                     f"{e['ttft_s']:13.2f}  {e['speedup']:7.2f}x  {e['speedup_same_settings']:14.2f}x")
    c = result["cold"]
    lines.append(f"\nfirst request of a fresh handler (cold) vs the median above: stock {c['stock_s']:.2f} s "
                 f"({c['stock_warm_s']:.2f} s), trimmed keep {c['keep']} {c['trimmed_s']:.2f} s ({c['trimmed_warm_s']:.2f} s)")
    return "\n".join(lines)
