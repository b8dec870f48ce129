"""Stock vLLM against vLLM with trimcpp's plugin (``trimcpp bench --vllm``): time to first token and
requests per minute at several request rates, the same model and the same requests.

Each server is ``vllm serve`` with vLLM's defaults (torch.compile included) and a 4 GiB KV cache, in its
own process, one after the other (they do not share the cores):
stock with no plugin loaded (``VLLM_PLUGINS=""``), then the plugin with ``--hf-overrides
'{"trim_keep": K}'`` for each K. Every server gets one untimed warm-up request, then, per rate, the
same ``requests`` requests (each a new picture, so no cache helps either server) sent at a fixed
interval of 60 / rate seconds, whatever the earlier ones are doing; each is streamed, greedy, with
answers of ``answer_tokens`` tokens. The time to first token runs from sending a request to its first
token's chunk; requests per minute are the requests over the time from the first send to the last
answer's end. A rate above what stock vLLM serves makes its queue grow: the first-token times then
include the wait.

Needs vLLM (README, "vLLM"). The model is a random-weight LLaVA-1.5 checkpoint
(:func:`trimcpp.testing.hf.write_hf`): speed does not depend on the weight values.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..testing import cache_dir, demo_image
from . import machine

Step = Callable[[str], None]
QUESTION = "What is in the image?"
KV_CACHE_GIB = 4  # vLLM's CPU KV cache for both servers unless VLLM_CPU_KVCACHE_SPACE says otherwise (its own
# default takes most of the memory, which a 7B model's 13.5 GB of weights needs)


def checkpoint(shape: str) -> Path:
    """The random LLaVA-1.5 checkpoint of `shape`, written once into trimcpp's cache folder."""
    from ..testing.hf import write_hf

    folder = cache_dir() / f"hf-llava-{shape}"
    if not (folder / "trimcpp-testing.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_hf(partial, "llava", shape)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder


def picture(seed: int) -> str:
    out = io.BytesIO()
    demo_image(seed=seed).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


class VllmServer:
    """``vllm serve`` in a process of its own, stopped on exit."""

    def __init__(self, model: Path, args: Sequence[str], env: dict, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--port", str(self.port), *args]
        self.log, self.output = log, log.open("w")
        # In the log's folder: from a clone's root, vLLM's model-inspecting subprocesses would import the
        # clone's trimcpp/ (no built extension) instead of the installed one.
        self.process = subprocess.Popen(command, env=env, stdout=self.output, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=log.parent)

    def wait_ready(self, timeout: float = 900.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.process.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"vllm serve did not start in {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")

    def ask(self, url: str, answer_tokens: int) -> tuple[float, float]:
        """One streamed request: (seconds to its first chunk, which vLLM sends with the first token, seconds
        to its end)."""
        body = {"model": self.model_name(), "max_tokens": answer_tokens, "min_tokens": answer_tokens, "temperature": 0,
                "stream": True, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        began, first = time.perf_counter(), None
        with urllib.request.urlopen(request, timeout=3600) as reply:
            for line in reply:  # vLLM sends its first chunk once the first token exists
                if first is None and line.startswith(b"data: "):
                    first = time.perf_counter() - began
        total = time.perf_counter() - began
        return (total if first is None else first), total

    def model_name(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=10) as reply:
            return json.loads(reply.read())["data"][0]["id"]

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 2)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.output.close()


def at_rate(server: VllmServer, rate: float, requests: int, answer_tokens: int, seed: int) -> dict[str, Any]:
    """`requests` requests sent 60 / rate seconds apart (each in its own thread)."""
    results: list[Optional[tuple[float, float]]] = [None] * requests
    errors: list[BaseException] = []

    def one(i: int, url: str) -> None:
        try:
            results[i] = server.ask(url, answer_tokens)
        except BaseException as error:  # noqa: BLE001 - reported after the run
            errors.append(error)

    urls = [picture(seed + i) for i in range(requests)]
    threads, began = [], time.perf_counter()
    for i, url in enumerate(urls):
        delay = began + i * 60.0 / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(i, url))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]!r}")
    wall = time.perf_counter() - began
    ttft = [r[0] for r in results if r]
    return {"ttft_s": ttft, "wall_s": wall, "requests_per_min": 60.0 * requests / wall}


def run(*, shape: str = "1b", keeps: Sequence[int] = (64,), rates: Sequence[float] = (2.0, 12.0), requests: int = 8,
        answer_tokens: int = 8, on_step: Optional[Step] = None) -> dict[str, Any]:
    """Stock and each keep through every rate; returns the settings, the machine and per server and rate
    the first-token times, the wall time and requests per minute."""
    model = checkpoint(shape)
    config = json.loads((model / "config.json").read_text())
    common = ["--dtype", "auto", "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
              "--max-num-seqs", str(max(requests, 8))]
    servers = {"stock": ({"VLLM_PLUGINS": ""}, [])}
    servers.update({f"keep {k}": ({}, ["--hf-overrides", json.dumps({"trim_keep": k})]) for k in keeps})
    result: dict[str, Any] = {"model": f"random LLaVA-1.5 ({shape}: hidden {config['text_config']['hidden_size']}, "
                                       f"{config['text_config']['num_hidden_layers']} layers, vision "
                                       f"{config['vision_config']['num_hidden_layers']} layers at 336 px)",
                              "shape": shape, "rates_per_min": list(rates), "requests": requests,
                              "answer_tokens": answer_tokens, "machine": machine(), "vllm": _vllm_version(),
                              "servers": {}}
    with tempfile.TemporaryDirectory() as logs:
        for name, (env_extra, args) in servers.items():
            env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
            env.update(env_extra)
            with VllmServer(model, [*common, *args], env, Path(logs) / f"{name}.log") as server:
                server.wait_ready()
                server.ask(picture(10_000), answer_tokens)  # warm-up, untimed
                if on_step:
                    on_step(f"{name}: started")
                runs = {}
                for j, rate in enumerate(rates):
                    runs[str(rate)] = at_rate(server, rate, requests, answer_tokens, seed=1000 * (j + 1))
                    if on_step:
                        on_step(f"{name}: {rate:g}/min")
            result["servers"][name] = runs
    return result


def _vllm_version() -> Optional[str]:
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def table(result: dict[str, Any]) -> str:
    """Markdown: per rate and server, the median and worst first-token times and requests per minute,
    with the plugin's ratios to stock."""
    lines = ["| offered rate | server | TTFT median | TTFT max | req/min | TTFT vs stock | req/min vs stock |",
             "|---|---|---|---|---|---|---|"]
    stock = result["servers"]["stock"]
    for rate in map(str, result["rates_per_min"]):
        base = stock[rate]
        for name, runs in result["servers"].items():
            run = runs[rate]
            median = statistics.median(run["ttft_s"])
            ratios = ("| | |" if name == "stock" else
                      f"| {statistics.median(base['ttft_s']) / median:.2f}x sooner | "
                      f"{run['requests_per_min'] / base['requests_per_min']:.2f}x |")
            lines.append(f"| {float(rate):g}/min | {name} | {median:.2f} s | {max(run['ttft_s']):.2f} s | "
                         f"{run['requests_per_min']:.2f} {ratios}")
    return "\n".join(lines)
