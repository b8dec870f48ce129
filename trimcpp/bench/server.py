"""Requests per minute and time to first token through a server (``trimcpp bench --server``):
llama-cpp-python's own server with the stock handler against ``trimcpp serve`` with the trimmed one.

Each server runs in its own process (one after the other, so that they do not share the cores), is
sent the same requests by one client, streamed, greedy, answers of up to ``answer_tokens`` tokens:

- ``new pictures``: ``pictures`` requests, each one question about a picture the server has not seen;
- ``follow-ups``: one picture and ``turns`` questions, the client sending the whole conversation
  each time (its own earlier answers included), as chat apps do.

The time to first token is from sending the request to its first streamed chunk, which both servers
send with the first token (as ``trimcpp bench --turns`` measures it); requests per minute count
whole answers over the workload's wall time. The first request of each server
includes loading its mmproj, alike for both.
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from ..serve.process import Server, launch
from ..testing import demo_image
from . import machine
from .turns import QUESTIONS

Step = Callable[[str], None]


def picture(seed: int) -> str:
    """A synthetic picture (trimcpp.testing.demo_image) as a data: URI."""
    out = io.BytesIO()
    demo_image(seed=seed).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def ask(server: Server, messages: list[dict], answer_tokens: int) -> tuple[float, float, str]:
    """One streamed request: (time to the first chunk, time to the end, the answer). Both servers send
    the first chunk with the first token (a random-weight model's tokens may print as nothing)."""
    first: Optional[float] = None
    parts = []
    began = time.perf_counter()
    for seconds, chunk in server.stream({"messages": messages, "max_tokens": answer_tokens, "temperature": 0.0}):
        first = seconds if first is None else first
        parts.append(chunk["choices"][0]["delta"].get("content") or "")
    total = time.perf_counter() - began
    return (total if first is None else first), total, "".join(parts)


def workloads(server: Server, *, pictures: int, turns: int, answer_tokens: int,
              on_step: Optional[Step]) -> dict[str, dict[str, Any]]:
    """Both workloads through `server`: per workload the TTFT of each request and the wall time."""
    result: dict[str, dict[str, Any]] = {}
    began, ttft = time.perf_counter(), []
    for i in range(pictures):
        question = [{"type": "image_url", "image_url": {"url": picture(seed=100 + i)}},
                    {"type": "text", "text": QUESTIONS[0]}]
        ttft.append(ask(server, [{"role": "user", "content": question}], answer_tokens)[0])
        if on_step:
            on_step(f"new picture {i + 1}")
    result["new pictures"] = {"ttft_s": ttft, "wall_s": time.perf_counter() - began}
    began, ttft, messages = time.perf_counter(), [], []
    for turn in range(turns):
        content: Any = QUESTIONS[turn]
        if turn == 0:
            content = [{"type": "image_url", "image_url": {"url": picture(seed=200)}}, {"type": "text", "text": content}]
        messages.append({"role": "user", "content": content})
        seconds, _, answer = ask(server, messages, answer_tokens)
        ttft.append(seconds)
        messages.append({"role": "assistant", "content": answer})
        if on_step:
            on_step(f"turn {turn + 1}")
    result["follow-ups"] = {"ttft_s": ttft, "wall_s": time.perf_counter() - began}
    return result


def run(model: str, mmproj: str, *, keep: int, chat_format: str = "llava-1-5", pictures: int = 3, turns: int = 3,
        answer_tokens: int = 16, n_ctx: int = 4096, threads: Optional[int] = None, trim_args: Sequence[str] = (),
        on_step: Optional[Step] = None) -> dict[str, Any]:
    """Both servers through both workloads; returns the settings, the machine and per server and
    workload the times of every request, the wall time and requests per minute. `trim_args`: more
    flags for trimcpp serve (its encoder settings)."""
    common = ["--model", model, "--clip_model_path", mmproj, "--n_ctx", str(n_ctx), "--verbose", "false"]
    if threads:
        common += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    servers = {"stock": ("llama_cpp.server", ["--chat_format", chat_format]),
               "trimcpp": ("trimcpp.serve", ["--chat_format", "trim-" + chat_format, "--keep", str(keep), *trim_args])}
    result: dict[str, Any] = {"model": os.path.basename(model), "mmproj": os.path.basename(mmproj), "keep": keep,
                              "chat_format": chat_format, "answer_tokens": answer_tokens, "machine": machine(),
                              "servers": {}}
    with tempfile.TemporaryDirectory() as logs:
        for name, (module, args) in servers.items():
            with launch(module, [*common, *args], log=os.path.join(logs, name + ".log")) as server:
                loads = workloads(server, pictures=pictures, turns=turns, answer_tokens=answer_tokens,
                                  on_step=on_step and (lambda label, name=name: on_step(f"{name}: {label}")))
            for load in loads.values():
                load["requests_per_min"] = 60 * len(load["ttft_s"]) / load["wall_s"]
            result["servers"][name] = loads
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: each server's time to first token (new pictures: median; the conversation: its first
    turn, then the median of the follow-ups) and requests per minute, with the ratios."""
    stock, trimmed = result["servers"]["stock"], result["servers"]["trimcpp"]
    lines = ["| workload | stock TTFT | trimcpp TTFT | ratio | stock req/min | trimcpp req/min | ratio |",
             "|---|---|---|---|---|---|---|"]

    def row(label: str, a: list[float], b: list[float], load: Optional[str]) -> None:
        ta, tb = statistics.median(a), statistics.median(b)
        rates = "| | |" if load is None else (f"| {stock[load]['requests_per_min']:.2f} | "
                                               f"{trimmed[load]['requests_per_min']:.2f} | "
                                               f"{trimmed[load]['requests_per_min'] / stock[load]['requests_per_min']:.2f}x |")
        lines.append(f"| {label} | {ta:.2f} s | {tb:.2f} s | {ta / tb:.2f}x {rates}")

    pictures, turns = stock["new pictures"]["ttft_s"], stock["follow-ups"]["ttft_s"]
    row(f"{len(pictures)} new pictures (median)", pictures, trimmed["new pictures"]["ttft_s"], "new pictures")
    row("conversation: turn 1", turns[:1], trimmed["follow-ups"]["ttft_s"][:1], "follow-ups")
    if len(turns) > 1:
        row(f"conversation: turns 2-{len(turns)} (median)", turns[1:], trimmed["follow-ups"]["ttft_s"][1:], None)
    return "\n".join(lines)
