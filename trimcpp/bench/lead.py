"""Time to first token against the lead: how long before the question the picture was attached.

``trimcpp bench --attach-lead 0,5,10,20,40``. For each lead, the picture is attached
(``handler.attach``: encode, then, policy allowing, the background prefill), the question comes
`lead` seconds later, and the time runs from the question to the first answer token. Policies
(:attr:`Trimming.attach_policy`):

- ``pruned``: attach only encodes; the question takes the pruned path (the smallest ``--keep``);
- ``full``: the question waits for the background prefill of every row;
- ``auto``: the sooner of the two, decided when the question comes.

The stock rows do nothing before the question, so they do not depend on the lead: ``stock, plain
Llama()`` (the defaults a user gets), ``stock`` (the benchmark's Llama) and ``stock, our encoder``
(the same settings as the trimmed handler's encoder) are measured once per round. Every request is a
new conversation (image cache emptied, nothing reusable in the KV cache). Rounds are interleaved.
Each trimmed request also records which path answered and whether its first token is stock's.
Before the rounds, :func:`batch_costs` measures what the background prefill's small batches cost
per row against full-size ones.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any, Optional, Sequence

import llama_cpp
import numpy as np

from ..handlers import HANDLERS
from ..handlers.decode import decode_rows
from ..handlers.encoder import EncoderSettings
from ..llamacpp import configure_encoder, load_llama, load_mmproj
from . import machine
from .ttft import Step, request, timed_stock

POLICIES = ("pruned", "full", "auto")


def attached(messages: list[dict]) -> list[dict]:
    """The conversation at attach time: the last user message without its text (the question)."""
    *before, last = messages
    return before + [{**last, "content": [p for p in last["content"] if p.get("type") == "image_url"]}]


def ask(llama: llama_cpp.Llama, handler: Any, messages: list[dict], lead: float) -> dict[str, Any]:
    """Attach, wait `lead` seconds, ask: the time from the question to the first token, and what answered."""
    handler.image_cache.clear()
    llama.reset()  # a new conversation: the handler forgets what it left in the KV cache
    llama.chat_handler = handler
    future = handler.attach(attached(messages), llama=llama)
    time.sleep(lead)
    progress = future.progress()
    began = time.perf_counter()
    response = llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
    ttft = time.perf_counter() - began
    [image] = handler.last_selection
    attached_ = future.result()
    return {"ttft_s": ttft, "path": image.path, "kept": image.kept, "rows": image.rows,
            "at_question": progress, "answer": response["choices"][0]["message"]["content"],
            "attach": {"state": attached_.state, "encode_s": attached_.encode_seconds,
                       "prefill_s": attached_.prefill_seconds}}


BATCHES = (8, 16, 32, 64, 128)  # background batch sizes whose cost per row is measured, with n_batch


def batch_costs(llama: llama_cpp.Llama, rows: int = 128, sizes: Sequence[int] = BATCHES) -> dict[int, float]:
    """Seconds per row of decoding `rows` image rows (random values: speed does not depend on them)
    into an empty KV cache in batches of each size (and of n_batch): what the background prefill's
    small batches cost. Leaves the KV cache empty."""
    vectors = np.random.default_rng(0).standard_normal((rows, llama.n_embd()), dtype=np.float32)
    memory = llama_cpp.llama_get_memory(llama.ctx)
    costs = {}
    for size in sorted({*sizes, llama.n_batch}):
        llama.reset()
        llama_cpp.llama_memory_clear(memory, True)
        began = time.perf_counter()
        decode_rows(llama.ctx, vectors, np.arange(rows, dtype=np.int32), 0, size)
        costs[size] = (time.perf_counter() - began) / rows
    llama.reset()
    llama_cpp.llama_memory_clear(memory, True)
    return costs


def run(model: str, mmproj: str, messages: list[dict], keep: int, leads: Sequence[float], *, repeat: int = 2,
        chat_format: str = "llava-1-5", method: str = "trimtokenator", n_ctx: int = 2048,
        threads: Optional[int] = None, encoder: Optional[EncoderSettings] = None,
        on_step: Optional[Step] = None) -> dict[str, Any]:
    """Every lead x policy, and the three stock rows, `repeat` interleaved rounds; medians."""
    encoder = encoder or EncoderSettings()
    llama = load_llama(model, None, n_ctx=n_ctx, threads=threads)
    plain_threads = max(multiprocessing.cpu_count() // 2, 1)  # a default Llama(...)'s n_threads, as in .ttft
    off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    stocks = {"stock-plain": {"flash_attn_type": off, "n_threads": plain_threads},
              "stock": {"flash_attn_type": off, "n_threads": llama.n_threads},
              "stock-encoder": encoder.fields(llama)}
    stock = timed_stock(chat_format, mmproj, verbose=False)
    trimmed = HANDLERS[chat_format][1](clip_model_path=mmproj, keep=keep, method=method, verbose=False,
                                       encoder_flash_attn=encoder.flash_attn, encoder_threads=encoder.threads,
                                       image_min_tokens=encoder.image_min_tokens,
                                       image_max_tokens=encoder.image_max_tokens)
    load_mmproj(trimmed, llama)
    # Warm-up: page the model files in, and let the trimmed handler measure this Llama's speeds
    # (a pruned request, and a background prefill) as a user's first requests would.
    configure_encoder(stock, llama, **stocks["stock"])
    request(llama, stock, messages)
    trimmed.attach_policy = "pruned"
    ask(llama, trimmed, messages, 0.0)
    trimmed.attach_policy = "full"
    ask(llama, trimmed, messages, 0.0)
    costs = batch_costs(llama)
    if on_step:
        on_step("warm-up")
    samples: dict[str, list[float]] = {name: [] for name in stocks}
    answers: dict[str, str] = {}
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {(p, lead): [] for p in POLICIES for lead in leads}
    for round_ in range(repeat):
        for name, fields in stocks.items():
            configure_encoder(stock, llama, **fields)
            llama.chat_handler = stock
            began = time.perf_counter()
            response = llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)
            samples[name].append(time.perf_counter() - began)
            answers[name] = response["choices"][0]["message"]["content"]
            if on_step:
                on_step(f"{name}, round {round_ + 1}/{repeat}")
        for lead in leads:
            for policy in POLICIES:
                trimmed.attach_policy = policy
                runs[(policy, lead)].append(ask(llama, trimmed, messages, lead))
                if on_step:
                    on_step(f"{policy}, {lead:g} s lead, round {round_ + 1}/{repeat}")
    stock_s = {name: statistics.median(values) for name, values in samples.items()}
    entries = []
    for lead in leads:
        entry: dict[str, Any] = {"lead_s": lead, **{f"{name}_s": value for name, value in stock_s.items()}}
        for policy in POLICIES:
            got = runs[(policy, lead)]
            entry[policy] = {"ttft_s": statistics.median(r["ttft_s"] for r in got),
                             "paths": [r["path"] for r in got], "kept": [r["kept"] for r in got],
                             "rows": got[0]["rows"],
                             "first_token_as_stock": [r["answer"] == answers["stock-encoder"] for r in got],
                             "first_token_as_stock_defaults": [r["answer"] == answers["stock"] for r in got],
                             "runs": got}
        best = min(entry["pruned"]["ttft_s"], entry["full"]["ttft_s"])
        entry["auto_over_best"] = entry["auto"]["ttft_s"] / best
        entries.append(entry)
    return {"model": model, "mmproj": mmproj, "chat_format": chat_format, "method": method, "keep": keep,
            "repeat": repeat, "n_ctx": n_ctx, "threads": llama.n_threads, "plain_threads": plain_threads,
            "n_batch": llama.n_batch, "encoder": {"flash_attn": encoder.flash_attn, "threads": encoder.threads,
                                                  "image_max_tokens": encoder.image_max_tokens},
            "machine": machine(), "batch_costs_s_per_row": costs, "leads": entries}


def table(result: dict[str, Any]) -> str:
    """Medians per lead: the stock rows, then each policy's time and speed-up over stock."""
    lines = [f"{'lead s':>6}  {'stock plain':>11}  {'stock':>7}  {'stock, our enc.':>15}  {'pruned':>7}  {'full':>7}  "
             f"{'auto':>7}  {'auto path':>9}  {'auto vs stock':>13}  {'vs same enc.':>12}  {'vs plain':>8}  "
             f"{'auto / best':>11}"]
    for e in result["leads"]:
        auto = e["auto"]
        paths = ",".join(sorted(set(p or "-" for p in auto["paths"])))
        lines.append(f"{e['lead_s']:6g}  {e['stock-plain_s']:11.2f}  {e['stock_s']:7.2f}  {e['stock-encoder_s']:15.2f}  "
                     f"{e['pruned']['ttft_s']:7.2f}  {e['full']['ttft_s']:7.2f}  {auto['ttft_s']:7.2f}  {paths:>9}  "
                     f"{e['stock_s'] / auto['ttft_s']:12.2f}x  {e['stock-encoder_s'] / auto['ttft_s']:11.2f}x  "
                     f"{e['stock-plain_s'] / auto['ttft_s']:7.2f}x  {e['auto_over_best']:11.2f}")
    lines.append("(seconds from the question to the first token; pruned keeps "
                 f"{result['keep']} rows; stock does nothing before the question: one value for every lead)")
    costs = result.get("batch_costs_s_per_row") or {}
    if costs:
        lines.append("decoding 128 image rows, seconds per row by batch size: "
                     + ", ".join(f"{size} rows {1e3 * cost:.0f} ms" for size, cost in costs.items()))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str, title: str) -> None:
    """Time to first token against the lead, one line per policy and stock, as a PNG (Pillow)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 440, 70, 150, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    leads = [e["lead_s"] for e in result["leads"]]
    series = {"stock": ([e["stock_s"] for e in result["leads"]], (120, 120, 120)),
              "pruned": ([e["pruned"]["ttft_s"] for e in result["leads"]], (31, 119, 180)),
              "full": ([e["full"]["ttft_s"] for e in result["leads"]], (44, 160, 44)),
              "auto": ([e["auto"]["ttft_s"] for e in result["leads"]], (214, 39, 40))}
    top_s = max(max(values) for values, _ in series.values()) * 1.05
    x_max = max(leads) or 1.0
    x = lambda lead: left + (width - left - right) * lead / x_max  # noqa: E731
    y = lambda s: height - bottom - (height - top - bottom) * s / top_s  # noqa: E731
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for tick in range(0, int(top_s) + 1, max(1, int(top_s // 8) or 1)):
        draw.line([(left - 4, y(tick)), (left, y(tick))], fill="black")
        draw.text((left - 36, y(tick) - 6), f"{tick:>3}", fill="black")
    for lead in leads:
        draw.line([(x(lead), height - bottom), (x(lead), height - bottom + 4)], fill="black")
        draw.text((x(lead) - 6, height - bottom + 8), f"{lead:g}", fill="black")
    draw.text((left + (width - left - right) // 2 - 120, height - 22), "lead: seconds from attach to question",
              fill="black")
    draw.text((8, top - 28), "first token, s after the question", fill="black")
    draw.text((left + 120, 8), title, fill="black")
    for i, (name, (values, colour)) in enumerate(series.items()):
        points = [(x(lead), y(value)) for lead, value in zip(leads, values)]
        draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.line([(width - right + 20, top + 20 + 22 * i), (width - right + 50, top + 20 + 22 * i)], fill=colour, width=3)
        draw.text((width - right + 56, top + 14 + 22 * i), name, fill="black")
    image.save(path)
